"""`flexinfer synth OUT.gguf --preset llama2-7b`: write a synthetic model (cli.py wires it in).

"""

from __future__ import annotations

import argparse
import sys
import time

from flexinfer.bench import synth
from flexinfer.bench.synth_blocks import supported_types
from flexinfer.errors import FlexInferError

# flag -> SynthSpec field; a flag left out keeps the preset's value
SPEC_FLAGS = {"arch": "arch", "layers": "n_layer", "embd": "n_embd", "ff": "n_ff",
              "heads": "n_head", "kv_heads": "n_head_kv", "vocab": "n_vocab", "type": "type",
              "seed": "seed", "ctx": "ctx_len", "rope_base": "rope_base",
              "vocab_file": "vocab_file", "head_dim": "head_dim", "swa": "n_swa",
              "attn_factor": "attn_factor", "orig_ctx": "orig_ctx",
              "rope_scaling": "rope_scaling", "rope_factor": "rope_factor"}
SPEC_FLAGS.update({"experts": "n_expert", "experts_used": "n_expert_used",  # MoE archs
                   "expert_ff": "n_ff_exp", "shared_ff": "n_ff_shexp", "router": "router"})


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help="write a synthetic GGUF model (random weights, real "
                                            "shapes and tokenizer) for benchmarks and tests")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--preset", choices=sorted(synth.PRESETS), default="tiny",
                   help="model shape to start from (default tiny); flags below override it")
    p.add_argument("--arch", choices=synth.ARCHS)
    for flag in ("layers", "embd", "ff", "heads", "kv-heads", "vocab", "seed", "ctx"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--head-dim", type=int, help="attention.key_length (default n_embd / heads)")
    p.add_argument("--swa", type=int, help="gemma3: sliding window (5 layers of 6 slide); "
                                           "gpt-oss: required (every other layer slides)")
    p.add_argument("--rope-factors", action="store_true",
                   help="llama: rope_freqs.weight (Llama 3.1); phi3: LongRoPE long/short factors")
    p.add_argument("--biases", action="store_true",
                   help="llama: attn_output and ffn_gate/up/down biases")
    p.add_argument("--attn-factor", type=float, help="rope.scaling.attn_factor")
    p.add_argument("--orig-ctx", type=int, help="rope.scaling.original_context_length (phi3: the "
                                                  "long factors apply above it)")
    p.add_argument("--rope-scaling", choices=("none", "linear", "yarn"),
                   help="rope.scaling.type (yarn: with --rope-factor and --orig-ctx)")
    p.add_argument("--rope-factor", type=float, help="rope.scaling.factor")
    p.add_argument("--type", choices=[t.lower() for t in supported_types()],
                   help="type of every matrix (default q4_0); norms stay f32")
    p.add_argument("--override", action="append", default=[], metavar="ROLE=TYPE",
                   help="per-role type, e.g. output=q6_k or blk.0.ffn_down=q8_0 (repeatable)")
    p.add_argument("--tied", action="store_true", help="no output.weight: reuse token_embd")
    p.add_argument("--rope-base", type=float)
    p.add_argument("--vocab-file", help="vocab-only GGUF to copy the tokenizer from")
    moe = p.add_argument_group("mixture of experts (--arch qwen3moe, qwen2moe, mixtral, olmoe, "
                                "gpt-oss: MXFP4 experts unless --override, --swa required)")
    moe.add_argument("--experts", type=int, help="experts per layer")
    moe.add_argument("--experts-used", type=int, help="experts each token uses (top K)")
    moe.add_argument("--expert-ff", type=int, help="expert FFN width (qwen; mixtral's and olmoe's is --ff)")
    moe.add_argument("--shared-ff", type=int, help="qwen2moe's shared expert width (default --ff)")
    moe.add_argument("--router", help="uniform (default): every expert as likely; zipf:S: a few "
                                      "experts take most picks (S=1: 16 of 128 take 68%%)")
    p.set_defaults(func=synth_main)
    return p


def spec_from_args(args) -> synth.SynthSpec:
    changes = {field: getattr(args, flag) for flag, field in SPEC_FLAGS.items()
               if getattr(args, flag, None) is not None}
    if args.tied:
        changes["tied"] = True
    if args.rope_factors:
        changes["rope_factors"] = True
    if args.biases:
        changes["biases"] = True
    if args.override:
        changes["overrides"] = dict(parse_override(o) for o in args.override)
    return synth.preset(args.preset, **changes)


def parse_override(text: str) -> tuple[str, str]:
    name, sep, ttype = text.partition("=")
    if not sep or not name or not ttype:
        raise FlexInferError(f"--override {text!r}: expected ROLE=TYPE, e.g. output=q6_k")
    return name, ttype


class ProgressLine:
    """`synth: 1.21/3.79 GB  32%  2.1 s` on stderr, redrawn at most 10 times a second."""

    def __init__(self, stream=None):
        # sys.stderr when called, not when this module was imported (it may be replaced since)
        self.stream, self.start, self.last = stream or sys.stderr, time.monotonic(), 0.0

    def __call__(self, done: int, total: int):
        now = time.monotonic()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        pct = 100 * done / total if total else 100
        self.stream.write(f"\rsynth: {done / 1e9:.2f}/{total / 1e9:.2f} GB  {pct:3.0f}%  "
                          f"{now - self.start:.1f} s")
        self.stream.flush()


def synth_main(args) -> int:
    spec = spec_from_args(args)
    line = ProgressLine()
    path = synth.write_synthetic(args.out, spec, progress=line)
    seconds = time.monotonic() - line.start
    size = path.stat().st_size
    sys.stderr.write(f"\nsynth: wrote {path} ({size / 1e9:.2f} GB) in {seconds:.1f} s "
                     f"({size / 1e9 / max(seconds, 1e-9):.2f} GB/s)\n")
    return 0

