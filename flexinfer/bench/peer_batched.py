"""The llama.cpp peer for several sequences: B greedy sequences decoded together through
llama-cpp-python's low-level batch API (one llama_decode per step carrying one token of each
sequence id), reported like `flexinfer batch --json` so the bench puts both in one table.

    python -m flexinfer.bench.peer_batched MODEL --parallel B -n TOKENS -t THREADS -c CTX -p PROMPT
        [--repack]

-c is the context of each sequence, as in `flexinfer batch`: the llama.cpp context holds B times
that. Load modes are peer_llamacpp's (mmap unless --repack). The aggregate decode rate is the
tokens of the B sequences over the wall time of the decode steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from flexinfer.bench.peer_llamacpp import load, proc_counter, quiet_logs, tokenize


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flexinfer.bench.peer_batched")
    p.add_argument("model")
    p.add_argument("--parallel", "-np", type=int, default=4, help="sequences decoded together")
    p.add_argument("--tokens", "-n", type=int, default=32, help="tokens to generate per sequence")
    p.add_argument("--threads", "-t", type=int, default=2)
    p.add_argument("--ctx", "-c", type=int, default=256, help="context of each sequence")
    p.add_argument("--prompt", "-p", default="the")
    p.add_argument("--repack", action="store_true",
                   help="llama.cpp's default: repack weights into anonymous memory")
    return p.parse_args(argv)


def decode(L, ctx, batch, entries: list[tuple[int, int, int, bool]]) -> None:
    """One llama_decode of (token, seq, pos, wants logits) entries."""
    batch.n_tokens = len(entries)
    for i, (tok, seq, pos, want) in enumerate(entries):
        batch.token[i], batch.pos[i] = tok, pos
        batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
        batch.logits[i] = want
    rc = L.llama_decode(ctx, batch)
    if rc != 0:
        raise SystemExit(f"llama_decode returned {rc}")


def greedy(L, ctx, i: int, n_vocab: int) -> int:
    return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))


def run(L, ctx, vocab, prompt: list[int], n: int, B: int) -> dict:
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(max(len(prompt), B), 0, B)
    try:
        t0 = time.perf_counter()
        last = []
        for s in range(B):  # each prompt alone, as flexinfer's scheduler admits them
            decode(L, ctx, batch, [(t, s, p, p == len(prompt) - 1) for p, t in enumerate(prompt)])
            last.append(greedy(L, ctx, len(prompt) - 1, n_vocab))
        prefill_s = time.perf_counter() - t0
        out = [[t] for t in last]
        read0, t1 = proc_counter("/proc/self/io", "read_bytes"), time.perf_counter()
        for step in range(n - 1):
            pos = len(prompt) + step
            decode(L, ctx, batch, [(out[s][-1], s, pos, True) for s in range(B)])
            for s in range(B):
                out[s].append(greedy(L, ctx, s, n_vocab))
        decode_s, read = time.perf_counter() - t1, proc_counter("/proc/self/io", "read_bytes") - read0
    finally:
        L.llama_batch_free(batch)
    decoded = B * (n - 1)
    return {"tokens": out, "decode_tokens": decoded,
            "decode_tokens_per_s": decoded / decode_s if decode_s else None,
            "prefill_tokens_per_s": B * len(prompt) / prefill_s if prefill_s else None,
            "bytes_read_per_token": read / decoded if decoded else None,
            "io_gbps": read / decode_s / 1e9 if decode_s else None}


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
    per_seq = args.ctx
    args.ctx = per_seq * args.parallel  # llama.cpp's context holds every sequence's cells
    model, ctx = load(L, args, args.parallel)
    wall_load = time.perf_counter() - start
    vocab = L.llama_model_get_vocab(model)
    prompt = tokenize(L, vocab, args.prompt)
    if len(prompt) + args.tokens > per_seq:
        raise SystemExit(f"prompt + tokens ({len(prompt)} + {args.tokens}) exceed -c {per_seq}")
    result = run(L, ctx, vocab, prompt, args.tokens, args.parallel)
    result.update(sequences=args.parallel, parallel=args.parallel, load_s=wall_load,
                  peak_memory_bytes=proc_counter("/proc/self/status", "VmHWM"),
                  offload_mode="llama.cpp-repack" if args.repack else "llama.cpp-mmap")
    print(json.dumps(result))
    L.llama_free(ctx)
    L.llama_model_free(model)
    del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
