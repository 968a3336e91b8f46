"""The contract every transport keeps, as one mixin class run against each backend.

A test module subclasses `TransportContract`, names its transport and provides `make_owner()`:
an `Owner` is the peer that owns the remote memory (this process for `local`; a spawned child
for `shm` and `cma`). Each region starts filled with `region_contents(i, nbytes)`; the child
answers simple commands over a Pipe (`serve_regions`) so the parent can verify writes.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from typing import ClassVar, List

import pytest
import torch

from helpers import i64, pattern, raises_llm
from llm_datadist_torch.core.descriptors import Region
from llm_datadist_torch.status import LLMException, LLMStatusCode
from llm_datadist_torch.transport import (TRANSPORTS, Peer, TransferItem,
                                          choose_transport)

BLOCK = 16 << 10
REGION_SIZES = (4 << 20, (3 << 20) + 123)  # the second is odd-sized on purpose
SHM_REGION_GAP = 4096                      # regions of an shm arena start at non-zero offsets
REPLY_TIMEOUT_S = 20
PARAM = LLMStatusCode.LLM_PARAM_INVALID


def region_contents(index: int, nbytes: int) -> torch.Tensor:
    """The known contents of region `index`."""
    return pattern(nbytes, 1000 + index)


# ---- owners ---------------------------------------------------------------------------------

class Owner:
    """The process owning the remote regions."""

    peer: Peer
    regions: List[Region]
    can_die = False

    def read_back(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LocalOwner(Owner):
    """Regions are plain tensors of this process."""

    def __init__(self, device: str = "cpu"):
        self.tensors = [region_contents(i, n).to(device) for i, n in enumerate(REGION_SIZES)]
        self.regions = [Region(t.data_ptr(), t.numel(), str(t.device)) for t in self.tensors]
        self.peer = Peer(os.getpid(), same_process=True, same_host=True)

    def read_back(self, index: int) -> torch.Tensor:
        return self.tensors[index].cpu()

    def reset(self) -> None:
        for i, t in enumerate(self.tensors):
            t.copy_(region_contents(i, t.numel()))


class ChildOwner(Owner):
    """A spawned child that allocates the regions (`kind` "shm": one MemoryArena; "cma": plain
    private tensors) and serves commands until told to exit or its pipe closes."""

    can_die = True

    def __init__(self, kind: str):
        pid, self.regions = self._spawn(_child_main, kind, os.getpid())
        self.peer = Peer(pid, same_process=False, same_host=True)

    def _spawn(self, target, *args):
        """Start `target(conn, *args)` in a spawned child; its first answer (what it owns)."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=target, args=(child_conn, *args), daemon=True)
        self._process.start()
        child_conn.close()
        try:
            return self._reply()
        except BaseException:
            self.close()
            raise

    def _reply(self):
        if not self._conn.poll(REPLY_TIMEOUT_S):
            raise TimeoutError("transport test child did not answer")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"transport test child failed: {value}")
        return value

    def command(self, *cmd):
        self._conn.send(cmd)
        return self._reply()

    def read_back(self, index: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.command("read", index)), dtype=torch.uint8)

    def reset(self) -> None:
        self.command("reset")

    def unlink_files(self) -> None:
        self.command("unlink")

    def kill(self) -> None:
        """SIGKILL: no cleanup runs in the child, as in a crash."""
        if self._process.is_alive():
            os.kill(self._process.pid, signal.SIGKILL)
        self._process.join(REPLY_TIMEOUT_S)
        _sweep_files(self._process.pid)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("exit",))
            except OSError:
                pass
            self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()
        _sweep_files(self._process.pid)


def _sweep_files(pid: int) -> None:
    from llm_datadist_torch.memory.arena import SHM_DIR, owned_shm_files
    for name in owned_shm_files(pid):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass


def _child_main(conn, kind: str, parent_pid: int) -> None:
    torch.set_num_threads(1)
    arena = None
    try:
        if kind == "shm":
            from llm_datadist_torch.memory.arena import MemoryArena
            offsets, end = [], 0
            for n in REGION_SIZES:
                offsets.append(end + SHM_REGION_GAP)
                end = offsets[-1] + n
            arena = MemoryArena.create(torch.device("cpu"), end, "transport_test")
            tensors = [arena.slice(o, n) for o, n in zip(offsets, REGION_SIZES)]
            name = os.path.basename(arena.shm_path)
            regions = [Region(t.data_ptr(), t.numel(), "cpu", name, o)
                       for t, o in zip(tensors, offsets)]
        else:
            from llm_datadist_torch.transport.cma import grant_access
            tensors = [torch.empty(n, dtype=torch.uint8) for n in REGION_SIZES]
            regions = [Region(t.data_ptr(), t.numel()) for t in tensors]
            grant_access("owner", {parent_pid})
        for i, t in enumerate(tensors):
            t.copy_(region_contents(i, t.numel()))
        conn.send(("ok", (os.getpid(), regions)))
        serve_regions(conn, tensors, arena)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        conn.send(("error", repr(exc)))
    finally:
        if arena is not None:
            arena.close()


def serve_regions(conn, tensors: List[torch.Tensor], arena=None) -> None:
    """In an owner child: answer the parent's commands on `tensors` until it says "exit" or is
    gone. "read" sends a region's bytes, "reset" refills every region with its
    `region_contents`, "unlink" (shm: `arena` given) removes the arena file's name."""
    while True:
        try:
            cmd = conn.recv()
        except EOFError:  # the parent is gone
            return
        if cmd[0] == "exit":
            return
        if cmd[0] == "read":
            conn.send(("ok", tensors[cmd[1]].numpy().tobytes()))
        elif cmd[0] == "reset":
            for i, t in enumerate(tensors):
                t.copy_(region_contents(i, t.numel()))
            conn.send(("ok", None))
        elif cmd[0] == "unlink" and arena is not None:  # what finalize does to the name; the
            os.unlink(arena.shm_path)                    # pages stay mapped
            conn.send(("ok", None))
        else:
            conn.send(("error", f"unknown command {cmd!r}"))


# ---- segment plans ---------------------------------------------------------------------------

class Plan:
    """Random 16 KiB blocks plus odd-sized segments for every region, all into one local raw
    tensor; remote segments never overlap each other, local ones neither."""

    def __init__(self, regions: List[Region], seed: int, local_device: str = "cpu"):
        generator = torch.Generator().manual_seed(seed)
        per_region = []
        slot = 0
        for region in regions:
            n_blocks = region.nbytes // BLOCK
            # Blocks 0-1 and the last one are left to the odd segments below.
            blocks = torch.randperm(n_blocks - 3, generator=generator)[: n_blocks // 2] + 2
            per_region.append(blocks)
            slot += blocks.numel()
        local_slots = torch.randperm(slot, generator=generator)
        odd_at = slot * BLOCK + 1
        self.items: List[TransferItem] = []
        self.segments = []  # (region index, remote offset, local offset, length)
        start = 0
        self.local_size = odd_at + 8 * (BLOCK + 4096)
        self.local = pattern(self.local_size, 1900 + seed).to(local_device)
        for index, (region, blocks) in enumerate(zip(regions, per_region)):
            slots = local_slots[start:start + blocks.numel()]
            start += blocks.numel()
            odd = [(0, 1), (3, 4097), (BLOCK + 5, 3), (2 * BLOCK - 1, 0),
                   (region.nbytes - 777, 777)]  # the last one ends exactly at the region's end
            remote = [int(b) * BLOCK for b in blocks] + [o for o, _ in odd]
            lengths = [BLOCK] * blocks.numel() + [n for _, n in odd]
            local = [int(s) * BLOCK for s in slots]
            for _, n in odd:
                local.append(odd_at)
                odd_at += n + 1
            self.items.append(TransferItem(region, i64(remote), self.local, i64(local),
                                           i64(lengths)))
            self.segments += [(index, r, l, n) for r, l, n in zip(remote, local, lengths)]
        assert odd_at <= self.local_size
        self.nbytes = sum(n for *_, n in self.segments)

    def expected_local(self, remote_contents: List[torch.Tensor], base=None) -> torch.Tensor:
        out = (self.local if base is None else base).cpu().clone()
        for index, r, l, n in self.segments:
            out[l:l + n] = remote_contents[index][r:r + n]
        return out

    def expected_remote(self, remote_contents: List[torch.Tensor]) -> List[torch.Tensor]:
        out = [t.clone() for t in remote_contents]
        local = self.local.cpu()
        for index, r, l, n in self.segments:
            out[index][r:r + n] = local[l:l + n]
        return out


def original(regions: List[Region]) -> List[torch.Tensor]:
    return [region_contents(i, r.nbytes) for i, r in enumerate(regions)]


# ---- the contract ------------------------------------------------------------------------------

@pytest.mark.timeout(30)
class TransportContract:
    transport_name: ClassVar[str]
    mapped_survives_peer: ClassVar[bool] = False  # shm: pages mapped before the owner died
    local_device: ClassVar[str] = "cpu"

    @classmethod
    def make_owner(cls) -> Owner:
        raise NotImplementedError

    # -- fixtures --
    @pytest.fixture(scope="class")
    @classmethod
    def shared_owner(cls):
        owner = cls.make_owner()
        yield owner
        owner.close()

    @pytest.fixture
    def owner(self, shared_owner):
        yield shared_owner
        shared_owner.reset()  # undo whatever a test wrote

    @pytest.fixture
    def fresh_owner(self):
        owner = self.make_owner()
        yield owner
        owner.close()

    def new_transport(self, owner: Owner):
        return TRANSPORTS[self.transport_name](owner.peer)

    @pytest.fixture
    def transport(self, owner):
        transport = self.new_transport(owner)
        yield transport
        transport.close()

    def assert_remote_untouched(self, owner: Owner) -> None:
        for i, expected in enumerate(original(owner.regions)):
            assert torch.equal(owner.read_back(i), expected), f"region {i} changed"

    # -- copies --
    def test_read_blocks_and_odd_segments(self, owner, transport):
        plan = Plan(owner.regions, seed=1, local_device=self.local_device)
        expected = plan.expected_local(original(owner.regions))
        assert transport.read(plan.items, 10.0) == plan.nbytes
        assert torch.equal(plan.local.cpu(), expected)  # exact where copied, untouched elsewhere

    def test_write_blocks_and_odd_segments(self, owner, transport):
        plan = Plan(owner.regions, seed=2, local_device=self.local_device)
        expected = plan.expected_remote(original(owner.regions))
        local_before = plan.local.cpu().clone()
        assert transport.write(plan.items, 10.0) == plan.nbytes
        for i, region_expected in enumerate(expected):
            assert torch.equal(owner.read_back(i), region_expected)
        assert torch.equal(plan.local.cpu(), local_before)

    def test_repeated_reads_reuse_the_transport(self, owner, transport):
        for seed in (3, 4):
            plan = Plan(owner.regions, seed=seed, local_device=self.local_device)
            assert transport.read(plan.items, 10.0) == plan.nbytes
            assert torch.equal(plan.local.cpu(), plan.expected_local(original(owner.regions)))

    def test_concurrent_reads_then_close(self, owner, transport):
        plans = [Plan(owner.regions, seed=10 + i, local_device=self.local_device) for i in range(4)]
        before = [plan.local.cpu().clone() for plan in plans]
        done = [0] * len(plans)
        errors = []

        def run(index):
            try:
                for _ in range(3):
                    assert transport.read(plans[index].items, 10.0) == plans[index].nbytes
                    done[index] += 1
            except BaseException as exc:  # noqa: BLE001 - checked in the test thread
                errors.append(exc)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plans))]
        for thread in threads:
            thread.start()
        transport.close()  # waits for copies in flight; later reads fail cleanly
        for thread in threads:
            thread.join(20)
        for exc in errors:
            assert isinstance(exc, LLMException), exc
            assert exc.status_code == LLMStatusCode.LLM_NOT_YET_LINK
        for plan, old, count in zip(plans, before, done):  # each read whole or not at all
            expected = plan.expected_local(original(owner.regions), old) if count else old
            assert torch.equal(plan.local.cpu(), expected)

    # -- validation --
    @pytest.mark.parametrize("direction", ["read", "write"])
    @pytest.mark.parametrize("case", ["remote_end", "remote_negative", "remote_overflow",
                                      "local_end", "local_negative", "negative_length"])
    def test_out_of_bounds_copies_nothing(self, owner, transport, direction, case):
        plan = Plan(owner.regions, seed=5, local_device=self.local_device)
        region = owner.regions[1]
        remote, local, length = 0, 0, 16
        if case == "remote_end":
            remote, length = region.nbytes - 100, 101
        elif case == "remote_negative":
            remote = -1
        elif case == "remote_overflow":
            remote, length = 1 << 62, 1 << 62
        elif case == "local_end":
            local = plan.local_size - 15
        elif case == "local_negative":
            local = -16
        else:
            length = -1
        bad = TransferItem(region, i64([remote]), plan.local, i64([local]), i64([length]))
        local_before = plan.local.cpu().clone()
        with raises_llm(PARAM) as excinfo:
            getattr(transport, direction)(plan.items + [bad], 10.0)  # valid items come first
        assert str(owner.peer.pid) in str(excinfo.value)
        assert torch.equal(plan.local.cpu(), local_before)
        self.assert_remote_untouched(owner)

    def test_malformed_items(self, owner, transport):
        region = owner.regions[0]
        local = torch.zeros(BLOCK, dtype=torch.uint8, device=self.local_device)
        cases = [
            TransferItem(region, i64([0]), local.view(torch.int32), i64([0]), i64([4])),
            TransferItem(region, i64([0]), local, i64([0]).int(), i64([4])),
            TransferItem(region, i64([0, 8]), local, i64([0]), i64([4])),
            TransferItem(region, i64([[0]]), local, i64([[0]]), i64([[4]])),
        ]
        for item in cases:
            with raises_llm(PARAM):
                transport.read([item], 10.0)

    def test_zero_items_and_empty_segments(self, owner, transport):
        local = pattern(BLOCK, 1050).to(self.local_device)
        before = local.cpu().clone()
        region = owner.regions[0]
        assert transport.read([], 1.0) == 0
        assert transport.write([], 1.0) == 0
        empty = TransferItem(region, i64([]), local, i64([]), i64([]))
        zero_length = TransferItem(region, i64([region.nbytes]), local, i64([BLOCK]), i64([0]))
        assert transport.read([empty, zero_length], 1.0) == 0
        assert transport.write([empty, zero_length], 1.0) == 0
        assert torch.equal(local.cpu(), before)
        self.assert_remote_untouched(owner)

    def test_expired_deadline_copies_nothing(self, owner, transport):
        plan = Plan(owner.regions, seed=6, local_device=self.local_device)
        before = plan.local.cpu().clone()
        with raises_llm(LLMStatusCode.LLM_TIMEOUT):
            transport.read(plan.items, 0)
        assert torch.equal(plan.local.cpu(), before)

    # -- lifetime --
    def test_close_is_idempotent(self, owner):
        transport = self.new_transport(owner)
        plan = Plan(owner.regions, seed=7, local_device=self.local_device)
        transport.read(plan.items, 10.0)
        transport.close()
        transport.close()
        with raises_llm(LLMStatusCode.LLM_NOT_YET_LINK):
            transport.read(plan.items, 10.0)

    def test_peer_killed(self, fresh_owner):
        if not fresh_owner.can_die:
            pytest.skip("the peer is this process")
        plan = Plan(fresh_owner.regions, seed=8, local_device=self.local_device)
        used = self.new_transport(fresh_owner)
        try:
            assert used.read(plan.items, 10.0) == plan.nbytes  # maps what it needs (shm)
            fresh_owner.kill()  # SIGKILL, reaped, its shm files swept
            fresh = self.new_transport(fresh_owner)
            for direction in ("read", "write"):
                with raises_llm(LLMStatusCode.LLM_LINK_FAILED) as excinfo:
                    getattr(fresh, direction)(plan.items, 10.0)
                assert str(fresh_owner.peer.pid) in str(excinfo.value)
            fresh.close()
            if self.mapped_survives_peer:
                # Documented: pages mapped before the owner died stay readable here.
                plan.local.zero_()
                expected = plan.expected_local(original(fresh_owner.regions))
                assert used.read(plan.items, 10.0) == plan.nbytes
                assert torch.equal(plan.local.cpu(), expected)
            else:
                with raises_llm(LLMStatusCode.LLM_LINK_FAILED):
                    used.read(plan.items, 10.0)
        finally:
            used.close()

    # -- selection --
    def test_chosen_for_its_owner(self, owner):
        cls = TRANSPORTS[self.transport_name]
        for region in owner.regions:
            assert cls.can_serve(owner.peer, region)
            assert choose_transport(owner.peer, region, self.transport_name) is cls
            assert choose_transport(owner.peer, region, None) is cls
            assert choose_transport(owner.peer, region, "hixl") is cls
            assert choose_transport(owner.peer, region, "auto") is cls

    @pytest.mark.parametrize("same_process,same_host,device,shm,auto,allowed", [
        (True, True, "cpu", "", "local", {"local"}),
        (True, True, "cpu", "f", "local", {"local"}),
        (True, True, "cuda:0", "", "local", {"local"}),
        (False, True, "cpu", "f", "shm", {"shm", "cma"}),
        (False, True, "cpu", "", "cma", {"cma"}),
        (False, True, "cuda:0", "", None, set()),
        (False, False, "cpu", "f", None, set()),
    ])
    def test_choose_transport_rules(self, same_process, same_host, device, shm, auto, allowed):
        peer = Peer(4321, same_process, same_host)
        region = Region(0x10000, 4096, device, shm, 0)
        for forced in (None, "", "auto", "hixl"):
            if auto is None:
                with raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED):
                    choose_transport(peer, region, forced)
            else:
                assert choose_transport(peer, region, forced) is TRANSPORTS[auto]
        for forced in ("local", "shm", "cma", "mooncake", "bogus"):
            if forced in allowed:
                assert choose_transport(peer, region, forced) is TRANSPORTS[forced]
            else:
                with raises_llm(LLMStatusCode.LLM_FEATURE_NOT_ENABLED) as excinfo:
                    choose_transport(peer, region, forced)
                assert forced in str(excinfo.value)
