"""Real vLLM engines in child processes, for tests/integration/test_vllm_connector.py.

`Engine` starts `python vllm_harness.py <fd>` in a process group of its own; the child builds a
`vllm.LLM` when told to and answers commands over a pipe: generate, metrics, exit. Killing the
engine kills the whole group (the child, vLLM's engine-core and worker processes), like a crash.
`tiny_llama` writes a small random Llama (no download) that vLLM loads from disk.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection, Pipe

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONNECTOR = {"kv_connector": "LLMDataDistConnector",
             "kv_connector_module_path": "llm_datadist_torch.integrations.vllm"}
BLOCK_SIZE = 32


def tiny_llama(path, seed, layers=4, hidden=256, heads=4, kv_heads=2, vocab=1024,
               intermediate=512, max_positions=4096):
    """A random LlamaForCausalLM saved at `path` (float32). initializer_range 0.08 keeps the
    greedy tokens sensitive to the whole context (a different KV changes them)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                         initializer_range=0.08, torch_dtype="float32")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def llm_kwargs(model, kv_role=None, extra=None, policy="fail", **overrides):
    kwargs = dict(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
                  block_size=BLOCK_SIZE, max_model_len=2048, max_num_batched_tokens=2048,
                  kv_cache_memory_bytes=64 << 20, disable_log_stats=False, seed=0)
    if kv_role is not None:
        kwargs["kv_transfer_config"] = dict(CONNECTOR, kv_role=kv_role,
                                            kv_connector_extra_config=extra or {},
                                            kv_load_failure_policy=policy)
    kwargs.update(overrides)
    return kwargs


class EngineError(RuntimeError):
    pass


class Engine:
    """One vLLM engine in a child process group; `log` is its output file."""

    def __init__(self, name, log_dir, env=None):
        self.name = name
        self.log = pathlib.Path(log_dir) / f"{name}.log"
        ours, theirs = Pipe()
        child_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
            LLM_DATADIST_TORCH_DEVICE="cpu", VLLM_LOGGING_LEVEL="INFO")
        child_env.update(env or {})
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "vllm_harness.py"), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdout=log, stderr=subprocess.STDOUT, env=child_env,
                cwd=ROOT, start_new_session=True)
        theirs.close()
        self.conn = ours

    def begin(self, *command):
        self.conn.send(command)

    def end(self, timeout_s=120):
        deadline = time.monotonic() + timeout_s
        while not self.conn.poll(0.2):
            if self.process.poll() is not None:
                raise EngineError(f"{self.name} exited ({self.process.returncode}); log:\n"
                                  f"{self.tail()}")
            if time.monotonic() > deadline:
                raise EngineError(f"{self.name}: no answer within {timeout_s} s; log:\n"
                                  f"{self.tail()}")
        status, value = self.conn.recv()
        if status != "ok":
            raise EngineError(f"{self.name}: {value}\nlog:\n{self.tail()}")
        return value

    def call(self, *command, timeout_s=120):
        self.begin(*command)
        return self.end(timeout_s)

    def generate(self, prompts, params=None, max_tokens=8, timeout_s=120):
        """[{tokens, finish_reason, kv_transfer_params, seconds}] for token-id prompts; params:
        one kv_transfer_params dict per prompt (or None)."""
        return self.call("generate", prompts, params, max_tokens, timeout_s=timeout_s)

    def tail(self, lines=60):
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self):
        """SIGKILL the whole process group (the child and vLLM's processes)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(30)
        self.conn.close()

    def stop(self, timeout_s=30):
        if self.process.poll() is None:
            try:
                self.conn.send(("exit",))
                self.process.wait(timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:  # whatever vLLM left behind in the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        self.conn.close()


# ---- the child ---------------------------------------------------------------------------------
def _generate(llm, prompts, params, max_tokens):
    from vllm import SamplingParams
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]
    sampling = [SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False,
                               extra_args={"kv_transfer_params": dict(p)} if p else None)
                for p in (params or [None] * len(prompts))]
    started = time.perf_counter()
    outputs = llm.generate(inputs, sampling, use_tqdm=False)
    seconds = time.perf_counter() - started
    return [{"tokens": list(o.outputs[0].token_ids),
             "finish_reason": str(o.outputs[0].finish_reason),
             "kv_transfer_params": o.kv_transfer_params, "seconds": seconds} for o in outputs]


def _add_and_abort(llm, prompt, params, delay_s):
    """Add one request with `params`, abort it `delay_s` later, drain the engine."""
    from vllm import SamplingParams
    engine = llm.llm_engine
    request_id = f"aborted-{time.monotonic_ns()}"
    engine.add_request(request_id, {"prompt_token_ids": list(prompt)},
                       SamplingParams(temperature=0, max_tokens=500, detokenize=False,
                                      extra_args={"kv_transfer_params": dict(params)}))
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline and engine.has_unfinished_requests():
        engine.step()
    engine.abort_request([request_id])
    while engine.has_unfinished_requests():
        engine.step()
    return request_id


def _metrics(llm):
    found = []
    for metric in llm.get_metrics():
        if not metric.name.startswith("vllm:llmdd_"):
            continue
        value = getattr(metric, "value", None)
        if value is None:
            value = getattr(metric, "count", None)
        found.append((metric.name, dict(metric.labels), value))
    return found


def child(fd):
    conn = Connection(fd)
    llm = None
    while True:
        try:
            command = conn.recv()
        except EOFError:
            break
        try:
            if command[0] == "exit":
                break
            if command[0] == "start":
                from vllm import LLM
                llm = LLM(**command[1])
                conn.send(("ok", None))
            elif command[0] == "generate":
                conn.send(("ok", _generate(llm, *command[1:])))
            elif command[0] == "add_and_abort":
                conn.send(("ok", _add_and_abort(llm, *command[1:])))
            elif command[0] == "metrics":
                conn.send(("ok", _metrics(llm)))
            else:
                conn.send(("error", f"unknown command {command[0]!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()  # vLLM's engine-core process, then its workers
    os._exit(0)


if __name__ == "__main__":
    child(int(sys.argv[1]))
