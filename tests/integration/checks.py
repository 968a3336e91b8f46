"""Parent-side checks shared by the integration tests: byte models of caches, error codes in
children, a linked prompt/decoder pair."""
import types

import pytest
import torch

from agents import agent, as_slots, expected, key, new_cluster_id, tensor_bytes
from harness import ChildError
from helpers import assert_no_shm_files, raises_llm
from llm_datadist_torch import LLMStatusCode

SYNC_TIMEOUT_MS = 10_000         # long: "fails at once" must not mean "after a timeout"
FAST_S = 1.0                     # a failure that is not a timeout comes back within this
C_SHAPE = [4, 8, 16]             # contiguous: 4 batch slots of 256 bytes per tensor
D_C_SHAPE = [3, 8, 16]           # the decoder's contiguous cache: 3 slots, same stride
B_SHAPE = [8, 4, 2, 8]           # blocks: 8 blocks of 128 bytes per tensor
SLOT = tensor_bytes(C_SHAPE) // C_SHAPE[0]
BLOCK = tensor_bytes(B_SHAPE) // B_SHAPE[0]


class Model:
    """What a cache must contain: one [slots, bytes per slot] uint8 tensor per cache tensor."""

    def __init__(self, seed: int, num_tensors: int, shape):
        self.shape = list(shape)
        self.t = expected(seed, num_tensors, shape)

    def check(self, child, name: str) -> None:
        got = as_slots(child.call("read", name), self.shape[0])
        assert len(got) == len(self.t), f"{name}: {len(got)} tensors, expected {len(self.t)}"
        for index, (have, want) in enumerate(zip(got, self.t)):
            if not torch.equal(have, want):
                bad = (have != want).nonzero()[0].tolist()
                pytest.fail(f"{name}: tensor {index} differs first at slot/block {bad[0]} byte "
                            f"{bad[1]}: got {int(have[bad[0], bad[1]])}, expected "
                            f"{int(want[bad[0], bad[1]])}")


def raises_code(code: LLMStatusCode, within_s: float = None):
    """The block raises LLMException(code) in the child, within `within_s` seconds if given."""
    return raises_llm(code, within_s=within_s, raised=ChildError)


def push_blocks_and_check(pair, dst_seed: int, src_seed: int, model_id: int,
                          fast_s: float = FAST_S) -> None:
    """Both register a blocks cache "pb" (model `model_id`); the prompt pushes into the
    decoder's: blocks 0, 3, 1 -> 4, 5, 0 of every tensor, then 6 -> 7 of layer 1 only (one
    tensor per "layer": tensors 2, 3, positional like sglang), then a block out of range
    (LLM_PARAM_INVALID within `fast_s`). Byte-exact after each step, and the source untouched."""
    pair.d.call("register", "pb", 4, B_SHAPE, seed=dst_seed, model_id=model_id)
    pair.p.call("register", "pb", 4, B_SHAPE, seed=src_seed, model_id=model_id)
    dst, src = Model(dst_seed, 4, B_SHAPE), Model(src_seed, 4, B_SHAPE)
    dkey = key("BlocksCacheKey", pair.did, model_id)
    pair.p.call("push_blocks", dkey, "pb", [0, 3, 1], [4, 5, 0])
    for i in range(4):
        for s, d in ((0, 4), (3, 5), (1, 0)):
            dst.t[i][d] = src.t[i][s]
    dst.check(pair.d, "pb")
    pair.p.call("push_blocks", dkey, "pb", [6], [7], range(2, 4), range(2, 4), 1)
    dst.t[2][7], dst.t[3][7] = src.t[2][6], src.t[3][6]
    dst.check(pair.d, "pb")
    with raises_code(LLMStatusCode.LLM_PARAM_INVALID, fast_s):
        pair.p.call("push_blocks", dkey, "pb", [0], [8])
    dst.check(pair.d, "pb")
    src.check(pair.p, "pb")


def start_pair(h, prompt_kwargs=None, decoder_kwargs=None, link=True, prompt_env=None):
    """A prompt (listening) and a decoder in two processes, initialized in parallel, linked."""
    pid, did = new_cluster_id(), new_cluster_id()
    p, d = h.spawn(agent, name="prompt", env=prompt_env), h.spawn(agent, name="decoder")
    p.begin("init", pid, "PROMPT", **{"listen": True, "sync_kv_timeout": SYNC_TIMEOUT_MS,
                                      **(prompt_kwargs or {})})
    d.begin("init", did, "DECODER", **{"sync_kv_timeout": SYNC_TIMEOUT_MS, **(decoder_kwargs or {})})
    port = p.end(60)["port"]
    d.end(60)
    pair = types.SimpleNamespace(p=p, d=d, pid=pid, did=did, port=port, link_ms=None)
    if link:
        result = d.call("link", pid, port)
        assert result["overall"] == 0 and result["per"] == [0], result
        pair.link_ms = result["ms"]
    return pair


def stop_pair(pair) -> None:
    """Unlink, leave cleanly, and leave no shared-memory file behind."""
    pair.d.call("unlink", pair.pid, pair.port)
    for child in (pair.p, pair.d):
        child.finish()
        assert_no_shm_files(child.pid)
