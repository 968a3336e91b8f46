"""The transport contract for `shm`, plus what only shm files can get wrong."""
import msgspec
import pytest
import torch

from contract import BLOCK, PARAM, ChildOwner, Plan, TransportContract
from helpers import assert_code, i64
from llm_datadist_torch.status import LLMException, LLMStatusCode
from llm_datadist_torch.transport import ShmTransport, TransferItem


class TestShmTransport(TransportContract):
    transport_name = "shm"
    mapped_survives_peer = True

    @classmethod
    def make_owner(cls):
        return ChildOwner("shm")

    def test_unlinked_before_mapping_fails_link(self, fresh_owner):
        plan = Plan(fresh_owner.regions, seed=20)
        fresh_owner.unlink_files()  # what the owner's finalize does
        transport = ShmTransport(fresh_owner.peer)
        with pytest.raises(LLMException) as excinfo:
            transport.read(plan.items, 10.0)
        assert_code(excinfo, LLMStatusCode.LLM_LINK_FAILED)
        assert fresh_owner.regions[0].shm_name in str(excinfo.value)
        transport.close()

    @pytest.mark.parametrize("change", [
        {"shm_name": "../etc/passwd"},
        {"shm_name": ".."},
        {"shm_offset": 1 << 40},  # reaches past the end of the file: would SIGBUS
        {"shm_offset": -1},
    ])
    def test_bad_shm_location(self, owner, transport, change):
        region = msgspec.structs.replace(owner.regions[0], **change)
        local = torch.zeros(BLOCK, dtype=torch.uint8)
        with pytest.raises(LLMException) as excinfo:
            transport.read([TransferItem(region, i64([0]), local, i64([0]), i64([BLOCK]))], 10.0)
        assert_code(excinfo, PARAM)
        assert not local.any()
