"""The llama.cpp references the fidelity tests hold flexinfer to, for the kernels this ggml runs.

Bit-exactness holds between builds that compute with the same instruction sets: an AVX2 kernel
sums in another order than an AVX-512 one, and SmolLM2's greedy continuations part after a few
tokens. So scripts/make_reference.py writes one set of references per build of llama.cpp
(tests/data for AVX-512 with VNNI, BF16 and VBMI; tests/data/avx2 for AVX2 without AVX-512), and
scripts/test.sh builds ggml with the same flags as the set the CPU can run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flexinfer import ggml_ops

ROOT = Path(__file__).parent / "data"


def reference_dir(sets: tuple[str, ...] | None = None) -> Path:
    """The references' directory for a ggml computing with these instruction sets (this one's)."""
    sets = ggml_ops.instruction_sets() if sets is None else sets
    return ROOT / "avx2" if "AVX2" in sets and "AVX512" not in sets else ROOT


def llamacpp_sets(system_info: str) -> tuple[str, ...]:
    """The x86 instruction sets a llama.cpp system info line says its build uses."""
    return tuple(n for n in ggml_ops.X86_SETS if re.search(rf"\b{n} = 1\b", system_info))


def load_reference(name: str) -> dict:
    """A reference of this ggml's set; the test fails, saying why, when llama.cpp made it with
    other instruction sets than this ggml computes with."""
    ref = read_reference(name)
    check_sets(name, ref)
    return ref


def read_reference(name: str) -> dict:
    """A reference of this ggml's set, unchecked (a module's constant: check_sets in its tests)."""
    return json.loads((reference_dir() / name).read_text(encoding="utf-8"))


def check_sets(name: str, ref: dict) -> None:
    """Fail the test, saying why, when llama.cpp made `ref` with other instruction sets than this
    ggml computes with."""
    made, here = llamacpp_sets(ref["llama_cpp_system_info"]), ggml_ops.instruction_sets()
    if set(made) - {"BMI2"} != set(here) - {"BMI2"}:  # BMI2 changes no float result
        pytest.fail(f"{name}: llama.cpp made it computing with {', '.join(made)}; this ggml "
                    f"computes with {', '.join(here) or 'none of ' + ', '.join(ggml_ops.X86_SETS)}"
                    ": build ggml as scripts/test.sh does, or make references for these sets "
                    "(scripts/make_reference.py, with llama.cpp built as DEVELOPERS.md says)")
