"""The llama.cpp peer: one generation (greedy, or sampled with --temp) through llama-cpp-python, reported like
`flexinfer run --json` so the bench puts it in the same table.

    python -m flexinfer.bench.peer_llamacpp MODEL -n TOKENS -t THREADS -c CTX -p PROMPT [--repack]
        [--temp T --seed S]

The weights stay mmapped (llama.cpp's default load mode). Without --repack, use_extra_bufts is off,
so the CPU backend computes straight from the mapped file pages and the page cache is all the
memory the weights take ("llama.cpp-mmap"). With --repack (llama.cpp's default), Q4_0 weights are
copied into anonymous, interleaved buffers for faster kernels: the whole model becomes resident,
which a budget smaller than the model cannot hold ("llama.cpp-repack").
Speeds come from llama.cpp's own timings (llama_perf_context); bytes read from /proc/self/io.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time

import numpy as np

GGML_LOG_LEVEL_WARN = 3  # ggml_log_level: DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flexinfer.bench.peer_llamacpp")
    p.add_argument("model")
    p.add_argument("--tokens", "-n", type=int, default=32, help="tokens to generate")
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--ctx", "-c", type=int, default=256)
    p.add_argument("--prompt", "-p", default="the")
    p.add_argument("--temp", type=float, default=0.0,
                   help="0: greedy; else sample softmax(logits / temp) with --seed (numpy)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--repack", action="store_true",
                   help="llama.cpp's default: repack weights into anonymous memory")
    return p.parse_args(argv)


def proc_counter(path: str, key: str) -> int:
    """A 'key: value' line of a /proc/self file, as an int (kB values returned in bytes)."""
    with open(path) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                parts = value.split()
                return int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return 0


def quiet_logs(L):
    """Only warnings and errors reach stderr: the bench shows the last stderr line of a crash."""
    @L.llama_log_callback
    def log(level, text, _user):
        if level in (GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_WARN + 1):
            sys.stderr.write(text.decode("utf-8", "replace"))

    L.llama_log_set(log, ctypes.c_void_p(0))
    return log  # kept alive by the caller


def load(L, args, n_seq: int = 1):
    """The model (mmapped; repacked only with --repack) and a context of args.ctx cells for
    n_seq sequences, prompt batches of up to 512."""
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = args.repack
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(args.model.encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp could not load {args.model}")
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = args.ctx, args.ctx, min(args.ctx, 512)
    cp.n_seq_max = n_seq
    cp.n_threads = cp.n_threads_batch = args.threads
    cp.no_perf = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit(f"llama.cpp could not create a context of {args.ctx} for {args.model}")
    return model, ctx


def tokenize(L, vocab, text: str) -> list[int]:
    raw = text.encode()
    buf = (L.llama_token * (len(raw) + 8))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    if n < 0:
        raise SystemExit(f"prompt of {len(raw)} bytes does not tokenize")
    return list(buf[:n])


def step(L, ctx, tokens: list[int], n_vocab: int, pick=None) -> int:
    """Decodes tokens as one batch and returns the next token: greedy, or pick(logits)."""
    arr = (L.llama_token * len(tokens))(*tokens)
    rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc}")
    logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    return int(np.argmax(logits)) if pick is None else pick(logits)


def sampler(temp: float, seed: int):
    """None (greedy) for temp 0, else a seeded pick from softmax(logits / temp): the speed
    figures only need routing like varied text's, not flexinfer's exact tokens."""
    if temp <= 0:
        return None
    rng = np.random.default_rng(seed)

    def pick(logits):
        z = logits.astype(np.float64) / temp
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))
    return pick


def detokenize(L, vocab, tokens: list[int]) -> str:
    buf, out = ctypes.create_string_buffer(256), b""
    for t in tokens:
        n = L.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
        out += buf.raw[:max(n, 0)]
    return out.decode("utf-8", "replace")


def generate(L, ctx, vocab, prompt: list[int], n: int, pick=None) -> tuple[list[int], int]:
    """Decoding of n tokens, greedy unless pick (EOS does not stop it: the point is the speed)."""
    n_vocab = L.llama_vocab_n_tokens(vocab)
    out = [step(L, ctx, prompt, n_vocab, pick)]
    read0 = proc_counter("/proc/self/io", "read_bytes")
    while len(out) < n:
        out.append(step(L, ctx, [out[-1]], n_vocab, pick))
    return out, proc_counter("/proc/self/io", "read_bytes") - read0


def report(L, ctx, args, prompt, tokens, text, decode_read, wall_load) -> dict:
    perf = L.llama_perf_context(ctx)
    decode_s = perf.t_eval_ms / 1e3
    return {
        "prompt_tokens": prompt, "tokens": tokens, "text": text,
        "prefill_tokens_per_s": perf.n_p_eval / (perf.t_p_eval_ms / 1e3)
        if perf.t_p_eval_ms else None,
        "decode_tokens_per_s": perf.n_eval / decode_s if decode_s else None,
        "load_s": wall_load,
        "peak_memory_bytes": proc_counter("/proc/self/status", "VmHWM"),  # this mm's own peak
        "bytes_read_per_token": decode_read / perf.n_eval if perf.n_eval else None,
        "io_gbps": decode_read / decode_s / 1e9 if decode_s else None,
        "compute_s_per_token": None, "stall_fraction": None, "resident_bytes": None,
        "budget_bytes": None,
        "offload_mode": "llama.cpp-repack" if args.repack else "llama.cpp-mmap",
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp as L
    except ImportError:
        print("llama_cpp is not importable: pip install 'flexinfer[peers]'", file=sys.stderr)
        return 3
    keep = quiet_logs(L)
    L.llama_backend_init()
    start = time.perf_counter()
    model, ctx = load(L, args)
    wall_load = time.perf_counter() - start
    vocab = L.llama_model_get_vocab(model)
    prompt = tokenize(L, vocab, args.prompt)
    tokens, decode_read = generate(L, ctx, vocab, prompt, args.tokens,
                                   sampler(args.temp, args.seed))
    result = report(L, ctx, args, prompt, tokens, detokenize(L, vocab, tokens), decode_read,
                    wall_load)
    print(json.dumps(result))
    L.llama_free(ctx)
    L.llama_model_free(model)
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
