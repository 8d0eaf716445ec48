"""The command line and the Python API, end to end, as a user meets them."""

from __future__ import annotations

import errno
import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flexinfer
import flexinfer.direct_io as dio
from flexinfer.bench.synth import shared_dir
from flexinfer.errors import FlexInferError
from tests.test_engine import _squeeze_budget

SEP = "\n__ggml_vocab_test__\n"  # separates the strings of llama.cpp's .inp files


def cli(*args, stdin: str | None = None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flexinfer", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_run_streams_text_then_one_stats_line(smollm2_path):
    r = cli("run", smollm2_path, "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    line = r.stderr.strip().splitlines()[-1]
    for part in ("load", "prompt", "decode", "tok/s", "peak", "budget", "resident", "compute"):
        assert part in line


def test_run_json_has_every_field(smollm2_path):
    r = cli("run", smollm2_path, "-p", "Hello", "-n", "4", "--temp", "0", "--json", "-c", "256")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("prompt_tokens", "tokens", "text", "prefill_tokens_per_s", "decode_tokens_per_s",
                "load_s", "peak_memory_bytes", "bytes_read_per_token", "io_gbps",
                "compute_s_per_token", "stall_fraction", "resident_bytes", "budget_bytes",
                "offload_mode", "budget_source"):
        assert key in out, key
    assert out["prompt_tokens"][0] == 1 or isinstance(out["prompt_tokens"][0], int)
    assert 1 <= len(out["tokens"]) <= 4 and out["text"]
    assert out["budget_source"].startswith("auto: ")  # --memory-budget auto, the default


def test_same_seed_same_output(smollm2_path):
    args = ("run", smollm2_path, "-p", "Once upon a time", "-n", "12", "--temp", "0.9", "--json")
    a, b = cli(*args, "-s", "7"), cli(*args, "-s", "7")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_chat_one_shot_and_interactive(smollm2_path):
    r = cli("run", smollm2_path, "--chat", "--system", "Answer in one word.", "-p",
            "What is the capital of France?", "-n", "8", "--temp", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"]
    assert out["prompt_tokens"][:2] == [1, 9690]  # <|im_start|>system: the template was applied
    r = cli("run", smollm2_path, "--chat", "-n", "6", "--temp", "0",
            stdin="What is the capital of France?\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(replies) == 2, r.stdout  # one reply per line of input
    lines = r.stderr.splitlines()
    assert sum(" load " in line for line in lines) == 1, r.stderr  # loading is told once,
    assert lines[0].startswith("flexinfer: load ") and "budget" in lines[0]  # before the first turn
    turns = [line for line in lines if "decode" in line]  # then each turn has a line of its own
    assert [t.split(" | ")[0] for t in turns] == ["flexinfer: turn 1", "flexinfer: turn 2"], \
        r.stderr
    for t in turns:
        assert " load " not in t and "prompt" in t and "tok/s" in t and "resident" in t


def _vocab(name: str) -> Path:
    try:
        path = shared_dir() / "vocab" / f"ggml-vocab-{name}.gguf"
    except FlexInferError as e:
        pytest.skip(str(e))
    return path


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_tokenize_matches_llama_cpp_on_a_vocab_file(name):
    """The CLI reproduces llama.cpp's ids for the test strings of a vocabulary-only file."""
    vocab = _vocab(name)
    texts = vocab.with_name(vocab.name + ".inp").read_text(encoding="utf-8").split(SEP)
    outs = vocab.with_name(vocab.name + ".out").read_text(encoding="utf-8").split("\n")
    case = next(i for i, t in enumerate(texts) if len(t) > 10)
    r = cli("tokenize", vocab, "--no-bos", stdin=texts[case])
    assert r.returncode == 0, r.stderr
    assert [int(x) for x in r.stdout.split()] == [int(x) for x in outs[case].split()]
    r = cli("tokenize", vocab, "--json", "--no-bos", stdin=json.dumps(texts[:20]))
    assert json.loads(r.stdout) == [[int(x) for x in o.split()] for o in outs[:20]]


def test_tokenize_does_not_parse_control_tokens():
    vocab = _vocab("llama-spm")
    r = cli("tokenize", vocab, "--no-bos", stdin="<s>")
    assert 1 not in [int(x) for x in r.stdout.split()]


def test_plan_json(tiny_llama_path):
    r = cli("plan", tiny_llama_path, "--memory-budget", "4G", "--json", "-c", "64")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["budget_bytes"] == 4 * 10**9 and p["streamed_bytes_per_token"] == 0
    assert p["predicted_tokens_per_s"] > 0 and p["bound_tokens_per_s"] > 0
    assert len(p["layers"]) == 3 and p["layers"][-1]["layer"] == "head"


@pytest.mark.parametrize("args,frag", [
    (("run", "/nonexistent/model.gguf", "-p", "x"), "not found"),
    (("run", "{tiny}", "-p", "x", "--memory-budget", "lots"), "--memory-budget"),
    (("run", "{tiny}", "-p", "x", "--offload", "bogus"), "--offload"),
    (("run", "{tiny}", "-p", "x", "--top-p", "2"), "--top-p"),
    (("run", "{tiny}"), "give a prompt"),
    (("run", "{tiny}", "-f", "/nonexistent/prompt.txt"), "/nonexistent/prompt.txt"),
    (("tokenize", "{tiny}", "--json"), "JSON"),
    (("frobnicate",), "invalid choice"),
])
def test_errors_are_one_line_and_exit_2(tiny_llama_path, args, frag):
    r = cli(*[a.replace("{tiny}", str(tiny_llama_path)) for a in args], stdin="not json")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and frag in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,want", [
    (("models", "--bogus"), "flexinfer: unrecognized arguments: --bogus"),  # the top-level parser
    (("run", "-p", "x", "-n", "abc"),
     "flexinfer: run: argument -n/--max-tokens: invalid int value: 'abc'"),  # a subcommand's
    (("plan",), "flexinfer: plan: the following arguments are required: model"),
])
def test_argument_errors_name_the_program_once(args, want):
    r = cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == want + "\n"


def cli_tty_stderr(*args, env=None, timeout=300):
    """cli() with stderr on a pseudo-terminal, as a user's shell has it: (returncode, stdout,
    stderr)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "flexinfer", *map(str, args)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                         env={**os.environ, **(env or {})})
    os.close(slave)
    err = b""
    try:
        while chunk := os.read(master, 4096):
            err += chunk
    except OSError:  # EIO: the child closed the terminal (Linux)
        pass
    finally:
        os.close(master)
    out = p.communicate(timeout=timeout)[0]
    return p.returncode, out.decode(), err.decode()


BAR = "MB resident weights"
FAST = {"FLEXINFER_PROGRESS_AFTER": "0"}  # every load counts as slow


def test_load_progress_bar_only_on_a_terminal_and_never_with_json(tiny_llama_path):
    run = ("run", tiny_llama_path, "-p", "x", "-n", "2", "-c", "64")
    code, _, err = cli_tty_stderr(*run, env=FAST)
    assert code == 0, err
    assert BAR in err and "] 100% " in err and "\r\033[K[" in err, err  # drawn in place
    code, out, err = cli_tty_stderr(*run, "--json", env=FAST)
    assert code == 0 and json.loads(out)["tokens"] and BAR not in err, err
    code, _, err = cli_tty_stderr(*run, env={"FLEXINFER_PROGRESS_AFTER": "3600"})  # a quick load
    assert code == 0 and BAR not in err, err
    r = cli(*run, env=FAST)  # stderr a pipe, as in a log
    assert r.returncode == 0 and BAR not in r.stderr, r.stderr
    r = cli(*run, env={"FLEXINFER_PROGRESS_AFTER": "soon"})
    assert r.returncode == 2 and r.stderr == (
        "flexinfer: FLEXINFER_PROGRESS_AFTER: 'soon' is not a number of seconds >= 0\n")


def test_load_reports_progress_in_bytes(tiny_llama_path):
    calls = []
    with flexinfer.load(tiny_llama_path, n_ctx=64, progress=lambda *a: calls.append(a)) as m:
        resident = m.stats.resident_bytes
    done = [d for d, _ in calls]
    total = calls[-1][1]
    assert len(calls) > 2 and done == sorted(done) and {t for _, t in calls} == {total}
    assert calls[-1] == (total, total) and resident <= total  # matrices, and vectors besides


def test_demo_answers_alike_in_ram_and_under_a_budget_that_streams(smollm2_path):
    """scripts/demo.sh's first command: the same greedy answer twice, the first under a budget
    that holds the model (never the machine's, which memory pressure would squeeze), the second
    under a budget from the plan, with less resident and bytes read from disk for every token."""
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "scripts/demo.py", str(smollm2_path)], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    runs = [i for i, line in enumerate(out) if line.startswith("$ flexinfer run")]
    assert len(runs) == 2 and "--memory-budget" in out[runs[1]], r.stdout
    answers = [out[i + 1] for i in runs]
    assert answers[0] and answers[0] == answers[1], r.stdout
    stats = [line for line in r.stderr.splitlines() if line.startswith("flexinfer: load")]
    assert len(stats) == 2, r.stderr
    resident = [float(re.search(r"resident ([0-9.]+) GB", line)[1]) for line in stats]
    assert resident[1] < resident[0] and all("(--memory-budget)" in s for s in stats), stats
    assert ", read " not in stats[0]
    assert float(re.search(r"read ([0-9.]+) GB/token", stats[1])[1]) > 0


def test_python_api(smollm2_path):
    with flexinfer.load(smollm2_path, n_ctx=256, n_threads=2) as model:
        ids = model.tokenize("Hello world")
        assert model.detokenize(ids) == "Hello world"
        logits = model.logits(ids)
        assert logits.shape == (len(ids), model.cfg.n_vocab) and logits.dtype.name == "float32"
        pieces = list(model.generate("The capital of France is", max_tokens=6, temperature=0))
        assert all(isinstance(p.token, int) for p in pieces) and "Paris" in "".join(
            p.text for p in pieces)
        reply = "".join(p.text for p in model.chat(
            [{"role": "system", "content": "Answer in one word."},
             {"role": "user", "content": "What is the capital of France?"}], max_tokens=8,
            temperature=0))
        assert "Paris" in reply
    with pytest.raises(flexinfer.FlexInferError):
        model.logits(ids)


def test_direct_io_refused_falls_back_and_says_so(tiny_llama_path, monkeypatch):
    """A filesystem that refuses O_DIRECT (EINVAL at open, as tmpfs did before Linux 6.6): reads
    become buffered + posix_fadvise(DONTNEED), said once, with the same results."""
    with flexinfer.load(tiny_llama_path, n_ctx=64) as m:
        want = m.logits([1, 2, 3])
    real_open, fadvised = os.open, []

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)
    monkeypatch.setattr(dio.os, "open", refusing_open)
    monkeypatch.setattr(dio.os, "posix_fadvise", lambda *a: fadvised.append(a))
    _squeeze_budget(monkeypatch, 0.3)
    with flexinfer.load(tiny_llama_path, n_ctx=64) as m:
        got = m.logits([1, 2, 3])
        notes = m.stats.notes
    assert (got == want).all()
    assert len(notes) == 1 and "O_DIRECT refused" in notes[0]
    assert fadvised and all(a[-1] == os.POSIX_FADV_DONTNEED for a in fadvised)


def test_stats_line_names_the_kv_stage_reached():
    from flexinfer.cli_run import _stats_line
    from flexinfer.stats import RunTimes, Stats
    times = RunTimes(prompt_tokens=3, prefill_s=0.1, decode_tokens=2, decode_s=0.2)
    stats = Stats(offload_mode="flexinfer", stage=1, plan_summary={"stages": 3})
    assert "(KV stage 2/3)" in _stats_line(times, times.as_dict(stats))
    stats.plan_summary = {"stages": 1}
    assert "KV stage" not in _stats_line(times, times.as_dict(stats))
