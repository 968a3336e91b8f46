"""Prefill/decode disaggregated serving with vLLM and LLMDataDistConnector, on this host.

Two vLLM engines run in two processes: a prefill instance (kv_role="kv_producer") and a decode
instance ("kv_consumer"), both with the connector and no extra configuration (the prefill side
listens on free ports of 127.0.0.1). A minimal proxy routes each request the way a
disaggregation proxy does (the NIXL connector's protocol):

1. the prompt goes to the prefill instance with max_tokens=1 and
   kv_transfer_params={"do_remote_decode": True};
2. the prefill output's kv_transfer_params (remote_engine_id, remote_host, remote_port,
   remote_block_ids, ...) go with the same prompt to the decode instance, which pulls the
   prompt's KV blocks from the prefill engine's memory before it computes, then generates.

The decoded tokens are checked against the decode engine computing the prompts itself (greedy,
so they must be equal); the last line says MATCH or MISMATCH. With --bench, the time to the
first decode token is measured both ways for a few prompt lengths.

Run:   python examples/vllm_disagg.py                       # a small random Llama, 8 prompts
       python examples/vllm_disagg.py --size medium --bench 256,1024,2048
       python examples/vllm_disagg.py --model /path/to/hf/model   (a local HF checkpoint)
Needs: pip install "llm_datadist_torch[vllm]" (then pip uninstall -y torchvision torchaudio
torchcodec, see the README); about a minute to start the two engines on a small CPU machine.
"""
import argparse
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time

KV_CONNECTOR = {"kv_connector": "LLMDataDistConnector",
                "kv_connector_module_path": "llm_datadist_torch.integrations.vllm"}
SIZES = {  # random Llamas written with transformers (no download)
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=8, vocab_size=8192),
}


def write_random_llama(path, size, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=4096, initializer_range=0.08,
                         torch_dtype="float32", **SIZES[size])
    LlamaForCausalLM(config).save_pretrained(path)
    return config.vocab_size


# ---- an engine process ------------------------------------------------------------------------
def engine(conn, model, kv_role, kv_cache_bytes, cpus):
    """One vLLM instance: answers ("generate", prompts, kv_transfer_params, max_tokens),
    ("reset",) and ("exit",) over `conn`."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpus)
    from vllm import LLM, SamplingParams
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              block_size=32, max_model_len=4096, max_num_batched_tokens=4096,
              kv_cache_memory_bytes=kv_cache_bytes,
              kv_transfer_config=dict(KV_CONNECTOR, kv_role=kv_role))
    conn.send("ready")
    while True:
        command = conn.recv()
        if command[0] == "exit":
            break
        if command[0] == "reset":
            llm.reset_prefix_cache()
            conn.send(None)
            continue
        _, prompts, params, max_tokens = command
        sampling = [SamplingParams(temperature=0, max_tokens=max_tokens, detokenize=False,
                                   extra_args={"kv_transfer_params": p} if p else None)
                    for p in params]
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling,
                               use_tqdm=False)
        elapsed = time.perf_counter() - started
        conn.send([(list(o.outputs[0].token_ids), o.kv_transfer_params, elapsed)
                   for o in outputs])
    llm.llm_engine.engine_core.shutdown()  # else this process waits for vLLM's at exit
    conn.send("bye")


class Instance:
    def __init__(self, ctx, model, kv_role, kv_cache_bytes, cpus):
        self.conn, theirs = ctx.Pipe()
        # Not a daemon: vLLM starts processes of its own.
        self.process = ctx.Process(target=engine, args=(theirs, model, kv_role, kv_cache_bytes,
                                                        cpus), name=kv_role)
        self.process.start()

    def wait_ready(self, timeout_s=600):
        if not self.conn.poll(timeout_s) or self.conn.recv() != "ready":
            raise RuntimeError(f"{self.process.name} did not start")

    def generate(self, prompts, params=None, max_tokens=16):
        self.conn.send(("generate", prompts, params or [None] * len(prompts), max_tokens))
        return self.conn.recv()

    def reset_prefix_cache(self):
        self.conn.send(("reset",))
        self.conn.recv()

    def close(self):
        try:
            self.conn.send(("exit",))
            self.conn.poll(60) and self.conn.recv()
        except (OSError, EOFError):
            pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ---- the proxy --------------------------------------------------------------------------------
class Proxy:
    """Routes a request through prefill, then decode (what vLLM's disaggregation proxies do)."""

    def __init__(self, prefill, decode):
        self.prefill, self.decode = prefill, decode

    def generate(self, prompts, max_tokens):
        first = self.prefill.generate(prompts, [{"do_remote_decode": True}] * len(prompts), 1)
        params = [kv_transfer_params for _, kv_transfer_params, _ in first]
        return self.decode.generate(prompts, params, max_tokens), first


def cpu_halves():
    """Disjoint OpenMP core lists for the two engines ("nobind" on a single core)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "nobind", "nobind"
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))


def bench(proxy, decode, vocab, lengths, repeats, rng):
    """Median times over `repeats` fresh prompts per length (no prefix-cache hits)."""
    print(f"time to first token on the decode instance, median of {repeats}:")
    print("  prompt   prefill on P   TTFT, KV pulled   TTFT, prompt computed on D")
    for length in lengths:
        prefill_s, pulled, computed = [], [], []
        for _ in range(repeats):
            a = [rng.randrange(1, vocab) for _ in range(length)]
            b = [rng.randrange(1, vocab) for _ in range(length)]
            decoded, first = proxy.generate([a], max_tokens=1)
            prefill_s.append(first[0][2])
            pulled.append(decoded[0][2])
            computed.append(decode.generate([b], max_tokens=1)[0][2])
        print(f"  {length:6d}   {statistics.median(prefill_s) * 1000:9.1f} ms   "
              f"{statistics.median(pulled) * 1000:12.1f} ms   "
              f"{statistics.median(computed) * 1000:18.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local Hugging Face model folder (default: a random "
                                        "Llama written to a temporary folder)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--bench", help="prompt lengths to time, e.g. 256,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    args = parser.parse_args()

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        model, vocab = args.model, 1000
        if model is None:
            model = os.path.join(folder, "model")
            vocab = write_random_llama(model, args.size)
        ctx = multiprocessing.get_context("spawn")
        prefill_cpus, decode_cpus = cpu_halves()
        kv_bytes = args.kv_cache_mib << 20
        prefill = Instance(ctx, model, "kv_producer", kv_bytes, prefill_cpus)
        decode = Instance(ctx, model, "kv_consumer", kv_bytes, decode_cpus)
        try:
            prefill.wait_ready()
            decode.wait_ready()
            proxy = Proxy(prefill, decode)
            prompts = [[rng.randrange(1, vocab) for _ in range(rng.randrange(16, 600))]
                       for _ in range(args.prompts)]
            started = time.perf_counter()
            decoded, first = proxy.generate(prompts, args.max_tokens)
            served_s = time.perf_counter() - started
            params = first[0][1]
            print(f"prefill instance: engine {params['remote_engine_id'][:8]} at "
                  f"{params['remote_host']}:{params['remote_port']}; first request's blocks "
                  f"{params['remote_block_ids']}")
            decode.reset_prefix_cache()  # else the local run would reuse the pulled KV
            local = decode.generate(prompts, max_tokens=args.max_tokens)
            ok = [tokens for tokens, _, _ in decoded] == [tokens for tokens, _, _ in local]
            if args.bench:
                bench(proxy, decode, vocab, [int(n) for n in args.bench.split(",")],
                      args.repeats, rng)
        finally:
            decode.close()
            prefill.close()
    print(f"vllm_disagg: {len(prompts)} prompts ({sum(map(len, prompts))} tokens) prefilled on "
          f"one instance and decoded on the other in {served_s:.2f} s; decode tokens vs. the "
          f"decode instance computing the prompts itself: {'MATCH' if ok else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
