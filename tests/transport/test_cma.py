"""The transport contract for `cma`, plus its error mapping and ptrace grants."""
import errno
import logging
import os

import pytest
import torch

from contract import BLOCK, PARAM, ChildOwner, TransportContract
from helpers import assert_code, i64
from llm_datadist_torch.core.descriptors import Region
from llm_datadist_torch import _C
from llm_datadist_torch.status import LLMException, LLMStatusCode
from llm_datadist_torch.transport import CmaTransport, Peer, TransferItem, cma


class TestCmaTransport(TransportContract):
    transport_name = "cma"

    @classmethod
    def make_owner(cls):
        return ChildOwner("cma")

    def test_unmapped_remote_address_is_param_invalid(self, owner, transport):
        region = Region(0x1000, BLOCK)  # page 1 is never mapped
        local = torch.zeros(BLOCK, dtype=torch.uint8)
        with pytest.raises(LLMException) as excinfo:
            transport.read([TransferItem(region, i64([0]), local, i64([0]), i64([BLOCK]))], 10.0)
        assert_code(excinfo, PARAM)
        assert str(owner.peer.pid) in str(excinfo.value)
        assert not local.any()

    def test_device_local_tensor_is_refused(self, owner, transport):
        local = torch.empty(BLOCK, dtype=torch.uint8, device="meta")
        item = TransferItem(owner.regions[0], i64([0]), local, i64([0]), i64([BLOCK]))
        with pytest.raises(LLMException) as excinfo:
            transport.read([item], 10.0)
        assert_code(excinfo, LLMStatusCode.LLM_FEATURE_NOT_ENABLED)


@pytest.mark.parametrize("err,code", [
    (errno.EPERM, LLMStatusCode.LLM_FEATURE_NOT_ENABLED),
    (errno.ESRCH, LLMStatusCode.LLM_LINK_FAILED),
    (errno.EFAULT, LLMStatusCode.LLM_PARAM_INVALID),
    (errno.ENOMEM, LLMStatusCode.LLM_FAILED),
])
def test_errno_mapping(monkeypatch, err, code):
    def failing(*args):
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(_C, "cma_read", failing)
    transport = CmaTransport(Peer(4321, same_process=False, same_host=True))
    local = torch.zeros(BLOCK, dtype=torch.uint8)
    item = TransferItem(Region(0x10000, BLOCK), i64([0]), local, i64([0]), i64([BLOCK]))
    with pytest.raises(LLMException) as excinfo:
        transport.read([item], 10.0)
    assert_code(excinfo, code)
    assert "4321" in str(excinfo.value)
    if err == errno.EPERM:
        assert "/proc/sys/kernel/yama/ptrace_scope" in str(excinfo.value)


def test_grant_access_is_computed_for_the_whole_process(monkeypatch, caplog):
    """Two engines' peers together: one named ptracer, kept stable; never "any process"
    unless opted in; an engine leaving takes only its own peers away."""
    calls = []
    monkeypatch.setattr(_C, "allow_ptrace_from", calls.append)
    monkeypatch.setattr(cma, "_granted", None)
    monkeypatch.setattr(cma, "_peers_of", {})
    first, second = object(), object()
    with caplog.at_level(logging.INFO, logger="llm_datadist_torch.transport.cma"):
        cma.grant_access(first, {11})
        cma.grant_access(first, {11})  # unchanged: no second prctl
        cma.grant_access(second, {12})  # two peers in the process: 11 stays named
        cma.grant_access(first, set())  # the first engine goes: 12 alone is named
        cma.grant_access(second, set())
    assert calls == [11, 12, 0]
    assert any("11, 12" in record.getMessage() for record in caplog.records)


def test_any_ptracer_only_when_opted_in(monkeypatch):
    calls = []
    monkeypatch.setattr(_C, "allow_ptrace_from", calls.append)
    monkeypatch.setattr(cma, "_granted", None)
    monkeypatch.setattr(cma, "_peers_of", {})
    monkeypatch.setenv(cma.ANY_PTRACER_ENV, "1")
    holder = object()
    cma.grant_access(holder, {11, 12})
    cma.grant_access(holder, set())
    assert calls == [-1, 0]


def test_grant_access_for_real():
    """Harmless whether or not Yama is present; ends with no ptracer named."""
    holder = object()
    cma.grant_access(holder, {os.getppid()})
    cma.grant_access(holder, {os.getppid(), 1})
    cma.grant_access(holder, set())
