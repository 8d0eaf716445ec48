"""Which weight type makes flexinfer's logits differ from llama.cpp's (issue 13, the qwen2 gap).

    python scripts/type_gap.py [--no-tiled] [--n N] [--ubatch B] [NAME ...]   # default: every name in CASES

For each type, a synthetic qwen2 (4 layers, n_embd 256, n_ff 512, 8/2 heads, qwen2 vocab) whose
every matrix (token_embd and output too, unless the name says otherwise) has that type is written,
then 256 teacher-forced tokens are run through llama.cpp (flash attention on, as the fidelity
references) and through flexinfer, with repacking on (the default) and off. Prints top-1 agreement
and the largest logit difference over all ids. Needs llama-cpp-python (pip install .[peers]).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

import flexinfer.model as fm
from flexinfer.bench.synth import SynthSpec, write_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference import SETTINGS, TEXT, forced_logits, open_llama, tokenize  # noqa: E402

SHAPE = dict(n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, seed=31, norm_noise=0.1)
# Qwen2.5-0.5B's shapes: 896 wide (28 blocks of 32: no K-quant fits a row), 14/2 heads, n_ff 4864
# (ffn_down rows are 19 K-quant superblocks), tied Q8_0 embeddings, rope base 1e6
REAL = dict(n_layer=4, n_embd=896, n_ff=4864, n_head=14, n_head_kv=2, seed=32, norm_noise=0.1,
            tied=True, rope_base=1000000.0)
# llama.cpp's Q4_K_M choice for Qwen2.5-0.5B where rows allow it: Q5_0 q/k/o/gate/up, Q6_K v and
# down, Q4_K where K-quant rows fit, Q8_0 embeddings and output
MIX = {"token_embd": "q8_0", "output": "q8_0", "attn_q": "q5_0", "attn_k": "q5_0",
       "attn_v": "q6_k", "attn_output": "q5_0", "ffn_gate": "q4_k", "ffn_up": "q4_k",
       "ffn_down": "q6_k"}


CASES = {
    "q5_0": SynthSpec("qwen2", **SHAPE, type="q5_0"),
    "q4_k": SynthSpec("qwen2", **SHAPE, type="q4_k"),
    "q6_k": SynthSpec("qwen2", **SHAPE, type="q6_k"),
    "q8_0": SynthSpec("qwen2", **SHAPE, type="q8_0"),
    "mix": SynthSpec("qwen2", **SHAPE, type="q5_0", overrides=MIX),
    # the real model's shapes: Q5_0 everywhere rows are 896 wide, Q8_0 embeddings, and ffn_down
    # (4864 wide) in one K-quant or the other
    "real_q5_0": SynthSpec("qwen2", **REAL, type="q5_0", overrides={"token_embd": "q8_0"}),
    "real_down_q6_k": SynthSpec("qwen2", **REAL, type="q5_0",
                                overrides={"token_embd": "q8_0", "ffn_down": "q6_k"}),
    "real_down_q4_k": SynthSpec("qwen2", **REAL, type="q5_0",
                                overrides={"token_embd": "q8_0", "ffn_down": "q4_k"}),
}


def compare(ref: np.ndarray, got: np.ndarray) -> str:
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return f"top-1 {agree:.4f}, max |diff| {float(np.abs(ref - got).max()):.4g}"


def main() -> None:
    args = sys.argv[1:]
    if "--no-tiled" in args:  # llama.cpp's ggml >= 0.2x: turn its tiled K-quant matmul off
        os.environ["GGML_CPU_TILED_MM"] = "0"
        args.remove("--no-tiled")
    n, ubatch = 256, None
    if "--ubatch" in args:  # llama.cpp's batch size (default: all positions in one batch)
        i = args.index("--ubatch")
        ubatch = int(args[i + 1])
        del args[i:i + 2]
    if "--n" in args:  # teacher-forced positions (flexinfer computes them 64 at a time)
        i = args.index("--n")
        n = int(args[i + 1])
        del args[i:i + 2]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args or CASES:
            path = write_synthetic(Path(tmp) / f"{name}.gguf", CASES[name])
            llm = open_llama(path, flash_attn=True, **({"n_batch": ubatch, "n_ubatch": ubatch}
                                                        if ubatch else {}))
            ids = (tokenize(llm, TEXT, False) * 4)[:n]
            ref = forced_logits(llm, ids)
            llm.close()
            line = [f"{name:6s}"]
            for repack in (True, False):
                with fm.load(path, n_ctx=SETTINGS["n_ctx"], n_threads=SETTINGS["n_threads"],
                             repack=repack) as m:
                    line.append(f"repack={repack}: {compare(ref, m.logits(ids))}")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main()
