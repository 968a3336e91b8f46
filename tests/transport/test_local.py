"""The transport contract for `local`: the owner is this process."""
import pytest
import torch

from contract import LocalOwner, TransportContract


class TestLocalTransport(TransportContract):
    transport_name = "local"

    @classmethod
    def make_owner(cls):
        return LocalOwner()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestLocalTransportCuda(TransportContract):
    """Remote regions and local tensors in device memory: torch copies instead of memcpy."""

    transport_name = "local"
    local_device = "cuda"

    @classmethod
    def make_owner(cls):
        return LocalOwner("cuda")
