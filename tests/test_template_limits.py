"""Issue 17: a chat template cannot hang flexinfer or eat its memory.

The bombs run in one child process (each in turn, a 3 GiB address-space cap so that a broken guard
fails the test instead of the machine); the child reports, bomb by bomb, the error, the seconds and
its peak RSS. Each bomb must give our one-line error naming the file and the limit within 2 s, and
the child must never grow by 100 MB over its size after a warm-up render.
"""

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flexinfer import template_costs
from flexinfer.chat import _ENV, default_limits, render_chat
from flexinfer.errors import FlexInferError
from flexinfer.template_guard import LOOP_FILTER, OPERAND_FILTER, Limits

ROOT = Path(__file__).parent.parent
SMOLLM2 = (Path(__file__).parent / "data" / "smollm2_chat_template.jinja").read_text()
NS = "{% set ns = namespace(s='ab', l=[1], a=[1], b=[1], t=(1,), n=3) %}"


def doubling(step: str, then: str = "") -> str:
    """60 rounds of `step` on the namespace: 2**60 of anything unless something stops it."""
    return NS + "{% for i in range(60) %}" + step + "{% endfor %}" + then


# name -> (template, the limit it must cross; "loop" also allows "time": on a loaded machine the
# clock may run out before a million iterations do)
BOMBS = {
    "nested_ranges": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}"
                      "{% endfor %}", "loop"),
    "deep_loops_no_output": ("{% for a in range(100) %}{% for b in range(100) %}{% for c in "
                             "range(100) %}{% for d in range(100) %}{% for e in range(100) %}"
                             "{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}", "loop"),
    "loop_over_long_string": ("{% for c in 'x' * 5000000 %}{% endfor %}", "loop"),
    "range_huge": ("{% for i in range(10**9) %}{% endfor %}", "loop"),
    "range_huge_join": ("{{ range(10**9)|join }}", "loop"),
    "range_huge_sum": ("{{ range(10**9)|sum }}", "loop"),
    "recursive_loop_fanout": ("{% for x in range(10) recursive %}{% if loop.depth < 12 %}"
                              "{{ loop(range(10)) }}{% endif %}{% endfor %}", "loop"),
    "namespace_tilde_doubling": (doubling("{% set ns.s = ns.s ~ ns.s %}", "{{ ns.s|length }}"),
                                 "memory"),
    "namespace_plus_doubling": (doubling("{% set ns.s = ns.s + ns.s %}"), "memory"),
    "list_plus_doubling": (doubling("{% set ns.l = ns.l + ns.l %}", "{{ ns.l|length }}"), "memory"),
    "repeat_huge": ("{{ 'x' * 999999999 }}", "memory"),
    "repeat_near_limit_repeated": ("{% for i in range(1000) %}{% set x = 'x' * 30000000 %}"
                                   "{% endfor %}", "memory"),
    "list_repeat_huge": ("{{ ([1] * 999999999)|length }}", "memory"),
    "power_huge": ("{{ 2 ** 100000000 }}", "memory"),
    "int_squaring": (doubling("{% set ns.n = ns.n * ns.n %}"), "memory"),
    "join_big_range": ("{% set s = range(99999)|join('x' * 1000) %}", "memory"),
    "join_long_string": ("{{ ('x' * 4000000)|join(',') }}", "memory"),
    "join_doubling": (doubling("{% set ns.s = [ns.s, ns.s]|join %}"), "memory"),
    "str_join_method_doubling": (doubling("{% set ns.s = ns.s.join([ns.s, ns.s]) %}"), "memory"),
    "filter_center": (doubling("{% set ns.s = ns.s|center(ns.s|length * 2) %}"), "memory"),
    "filter_center_huge": ("{{ 'x'|center(10**9) }}", "memory"),
    "filter_replace": (doubling("{% set ns.s = ns.s|replace('a', ns.s) %}"), "memory"),
    "method_replace_empty": (doubling("{% set ns.s = ns.s.replace('', ns.s) %}"), "memory"),
    "filter_format": (doubling("{% set ns.s = '%s%s'|format(ns.s, ns.s) %}"), "memory"),
    "percent_width": ("{{ '%999999999d' % 1 }}", "memory"),
    "percent_star_width": ("{{ '%*d' % (999999999, 1) }}", "memory"),
    "str_format_width": ("{{ '{:>999999999}'.format(1) }}", "memory"),
    "str_format_nested_width": ("{{ '{:>{}}'.format(1, 999999999) }}", "memory"),
    "filter_indent": ("{{ ('x\\n' * 100000)|indent(100000) }}", "memory"),
    "filter_wordwrap": ("{{ ('x' * 200000)|wordwrap(1) }}", "memory"),
    "filter_tojson_indent": (NS + "{% for i in range(12) %}{% set ns.l = [ns.l, ns.l] %}"
                             "{% endfor %}{{ ns.l|tojson(indent=100000) }}", "memory"),
    "filter_in_map": ("{{ range(99999)|map('center', 10**6)|list|length }}", "memory"),
    "method_ljust": ("{{ 'x'.ljust(10**9) }}", "memory"),
    "method_expandtabs": ("{{ ('\\t' * 1000).expandtabs(10**6) }}", "memory"),
    "split_flood": ("{{ ('x,' * 5000000).split(',')|length }}", "memory"),
    "batch_fill": ("{{ [1]|batch(10**9, 'x')|list|length }}", "memory"),
    "lipsum": ("{{ lipsum(10**6) }}", "memory"),
    "to_bytes": ("{{ (1).to_bytes(10**9, 'big')|length }}", "memory"),
    "nested_list_as_text": (doubling("{% set ns.l = [ns.l, ns.l] %}", "{{ ns.l }}"), "memory"),
    "nested_list_equality": (doubling("{% set ns.a = [ns.a, ns.a] %}{% set ns.b = [ns.b, ns.b] %}",
                                      "{{ ns.a == ns.b }}"), "memory"),
    "nested_tuple_hash": (doubling("{% set ns.t = (ns.t, ns.t) %}", "{{ {ns.t: 1} }}"), "memory"),
    "macro_buffer_flood": ("{% macro m() %}{% for i in range(99999) %}{{ 'x' * 1000 }}"
                           "{% endfor %}{% endmacro %}{{ m()|length }}", "memory"),
    "macro_constant_flood": ("{% macro m() %}{% for i in range(99999) %}" + "z" * 1000 +
                             "{% endfor %}{% endmacro %}{{ m()|length }}", "memory"),
    "set_block_flood": ("{% set s %}{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}"
                        "{% endset %}{{ s|length }}", "memory"),
    "growing_string_in_loop": (NS + "{% for i in range(99999) %}{% set ns.s = ns.s ~ 'x' * 1000 %}"
                               "{% endfor %}", "memory"),
    "macro_recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
    "macro_fanout": ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                     "{% endmacro %}{{ f(40) }}", "time"),
    "slices_in_loop": ("{% set s = 'x' * 20000000 %}{% for i in range(2000) %}{% set t = s[i:] %}"
                       "{% endfor %}", "time"),
    "output_flood": ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "output"),
    "output_constant_flood": ("{% for i in range(99999) %}" + "z" * 1000 + "{% endfor %}",
                              "output"),
}

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from flexinfer.chat import render_chat
from flexinfer.errors import FlexInferError
bombs = json.loads(sys.stdin.read())
msgs = [{"role": "user", "content": "hi"}]
smol = open(sys.argv[1]).read()
render_chat(smol, msgs * 8, bos_token="", eos_token="", source="warm.gguf")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kb": base}), flush=True)
for name, template in bombs.items():
    t0 = time.monotonic()
    try:
        render_chat(template, msgs, bos_token="", eos_token="", source="bomb.gguf")
        error = None
    except FlexInferError as e:
        error = str(e)
    seconds = time.monotonic() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"name": name, "error": error, "seconds": seconds, "rss_kb": rss}), flush=True)
"""


def _run_child(pending: list, results: dict) -> None:
    """Run the pending bombs in one child, moving each reported one from `pending` to `results`;
    a bomb that hangs (nothing for 30 s) or kills the child is reported as None."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(Path(__file__).parent / "data" /
                             "smollm2_chat_template.jinja")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    proc.stdin.write(json.dumps({name: BOMBS[name][0] for name in pending}).encode())
    proc.stdin.close()
    buf, base = b"", None
    try:
        while pending:
            if not select.select([proc.stdout], [], [], 30)[0]:
                break
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                r = json.loads(line)
                if "base_kb" in r:
                    base = r["base_kb"]
                    continue
                results[r["name"]] = dict(r, growth_mb=(r["rss_kb"] - base) / 1024)
                pending.remove(r["name"])
    finally:
        proc.kill()
        proc.wait()
    if pending:
        results[pending.pop(0)] = None


@pytest.fixture(scope="module")
def bomb_results():
    """Every bomb's report, by name; after a bomb that hangs, a new child runs the rest."""
    pending, results = list(BOMBS), {}
    while pending:
        _run_child(pending, results)
    return results


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_stops_with_one_clear_error(bomb_results, name):
    r = bomb_results[name]
    assert r is not None, f"{name}: no result (the render hung or killed the child)"
    limits = ("loop", "time") if BOMBS[name][1] == "loop" else (BOMBS[name][1],)
    assert r["error"] is not None, f"{name} rendered without an error"
    assert r["error"].startswith(tuple(f"bomb.gguf: chat template exceeded the {limit} limit ("
                                       for limit in limits)), r["error"]
    assert "\n" not in r["error"]
    assert r["seconds"] < 2.0, f"{name}: {r['seconds']:.2f} s"
    assert r["growth_mb"] < 100, f"{name}: the child grew by {r['growth_mb']:.0f} MB"


# ---- real templates render exactly as before (strings made with the code before issue 17)

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
          " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5's chat template with its tool branches, as shipped.
QWEN25 = (Path(__file__).parent / "data" / "qwen25_chat_template.jinja").read_text()

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Weather in Paris? ünï 你好 "},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "21 C, sunny"},
        {"role": "assistant", "content": "Sunny, 21 C."},
        {"role": "user", "content": "Thanks!"}]
PLAIN = [m for m in CONV if m["role"] != "tool" and m["content"]]

BEFORE = {
    "smol": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Weather in Paris? ünï 你好 "
            "<|im_end|>\n<|im_start|>assistant\nSunny, 21 C.<|im_end|>\n<|im_start|>user\nThanks!"
            "<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris? ünï 你好<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nSunny, 21 C.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nThanks!<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen_tools": "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to "
                  "assist with the user query.\n\nYou are provided with function signatures within "
                  "<tools></tools> XML tags:\n<tools>\n{\"type\": \"function\", \"function\": "
                  "{\"name\": \"get_weather\", \"description\": \"Weather in a city.\", "
                  "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": "
                  "\"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\nFor each function call, "
                  "return a json object with function name and arguments within <tool_call>"
                  "</tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                  "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\n  Weather in "
                  "Paris? ünï 你好 <|im_end|>\n<|im_start|>assistant\n<tool_call>\n{\"name\": "
                  "\"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
                  "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response><|im_end|>\n"
                  "<|im_start|>assistant\nSunny, 21 C.<|im_end|>\n<|im_start|>user\nThanks!"
                  "<|im_end|>\n<|im_start|>assistant\n",
    "qwen_plain": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Weather in Paris? "
                  "ünï 你好 <|im_end|>\n<|im_start|>assistant\nSunny, 21 C.<|im_end|>\n"
                  "<|im_start|>user\nThanks!<|im_end|>\n",
}


def test_real_templates_render_exactly_as_before():
    im = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", source="m.gguf")
    assert render_chat(SMOLLM2, PLAIN, **im) == BEFORE["smol"]
    assert render_chat(LLAMA3, PLAIN, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>") \
        == BEFORE["llama3"]
    assert render_chat(QWEN25, CONV, tools=TOOLS, **im) == BEFORE["qwen_tools"]
    assert render_chat(QWEN25, PLAIN, add_generation_prompt=False, **im) == BEFORE["qwen_plain"]


def _plain_jinja(template, **variables):
    """The same template in jinja2's own sandbox, without any of our guards."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(template).render(**variables)


@pytest.mark.parametrize("n_turns", [1, 3, 40])
@pytest.mark.parametrize("template", ["smol", "llama3", "qwen"])
def test_real_templates_match_plain_jinja2(template, n_turns):
    t = {"smol": SMOLLM2, "llama3": LLAMA3, "qwen": QWEN25}[template]
    msgs = (CONV * n_turns) if template == "qwen" else (PLAIN * n_turns)
    tools = TOOLS if template == "qwen" else None
    extra = {"tools": tools} if tools else {}
    ours = render_chat(t, msgs, bos_token="<s>", eos_token="</s>", **extra)
    assert ours == _plain_jinja(t, messages=msgs, bos_token="<s>", eos_token="</s>",
                                add_generation_prompt=True, **extra)


def test_the_input_is_always_allowed_through():
    """A long conversation (here 200,000 characters, 6x the first output limit) renders: the
    limits grow by the size of what the caller gave."""
    msgs = [{"role": "user", "content": "word " * 40_000}]
    out = render_chat(SMOLLM2, msgs, bos_token="", eos_token="", n_ctx=4096)
    assert len(out) > 200_000


def test_output_limit_follows_the_context_length():
    t = "{% for i in range(50) %}{{ 'x' * 1000 }}{% endfor %}"  # 50,000 characters
    with pytest.raises(FlexInferError, match=r"^m: chat template exceeded the output limit \(32768 "):
        render_chat(t, [], bos_token="", eos_token="", source="m", n_ctx=4096)
    assert len(render_chat(t, [], bos_token="", eos_token="", n_ctx=8192)) == 50_000


def test_explicit_limits():
    tight = Limits(seconds=5, output_chars=100, memory_bytes=1 << 20, iterations=10, depth=3)
    with pytest.raises(FlexInferError, match=r"the loop limit \(10 iterations\)"):
        render_chat("{% for i in range(11) %}{% endfor %}", [], bos_token="", eos_token="",
                    limits=tight)
    assert render_chat("{% for i in range(10) %}{% endfor %}ok", [], bos_token="", eos_token="",
                       limits=tight) == "ok"
    with pytest.raises(FlexInferError, match=r"the recursion limit \(3 nested calls\)"):
        render_chat("{% macro f(n) %}{{ f(n + 1) if n < 5 }}{% endmacro %}{{ f(0) }}", [],
                    bos_token="", eos_token="", limits=tight)
    with pytest.raises(FlexInferError, match=r"the memory limit \(1.0 MiB: '\*' needs 2.0 MiB"):
        render_chat("{{ 'x' * 2097152 }}", [], bos_token="", eos_token="", limits=tight)


def test_default_limits():
    assert default_limits(4096) == Limits(1.0, 32768, 32 << 20, 1_000_000, 64)
    assert default_limits(131072, 100).output_chars == 8 * 131072 + 200
    assert default_limits(None, 10 << 20).memory_bytes == 8 * (32768 + (20 << 20))


@pytest.mark.parametrize("bad", ["nested_ranges", "macro_fanout"])
def test_a_bad_render_in_one_thread_leaves_a_good_one_in_another_alone(bad):
    """The server renders on worker threads: a template running into its loop or time limit
    (about a second of work) on one thread must not fail or change the renders on another thread
    meanwhile. The good renders have a tight loop limit (1000 iterations, 500 used), so a single
    iteration of the bad template counted against them (a budget shared between threads) fails
    them."""
    good_msgs = [{"role": "user", "content": "hi"}] * 500
    tight = Limits(seconds=10, output_chars=1 << 20, memory_bytes=32 << 20, iterations=1000)
    expected = render_chat(SMOLLM2, good_msgs, bos_token="", eos_token="", limits=tight)
    bad_result, good_results, started = [], [], threading.Event()

    def run_bad():
        started.set()
        try:
            render_chat(BOMBS[bad][0], [], bos_token="", eos_token="", source="bad.gguf")
        except FlexInferError as e:
            bad_result.append(str(e))

    def run_good():
        started.wait()
        while (bad_thread.is_alive() or not good_results) and len(good_results) < 100_000:
            try:
                good_results.append(render_chat(SMOLLM2, good_msgs, bos_token="", eos_token="",
                                                limits=tight))
            except FlexInferError as e:
                good_results.append(str(e))

    # daemons: with a guard broken, the bad render never ends and must not hold pytest's exit
    bad_thread = threading.Thread(target=run_bad, daemon=True)
    good_thread = threading.Thread(target=run_good, daemon=True)
    good_thread.start()
    bad_thread.start()
    bad_thread.join(10)
    good_thread.join(10)
    assert not bad_thread.is_alive(), "the bad render is still running after 10 s"
    assert bad_result and bad_result[0].startswith("bad.gguf: chat template exceeded the "), bad_result
    assert len(good_results) >= 2
    assert all(r == expected for r in good_results), [r for r in good_results if r != expected][:1]


def test_every_filter_and_global_is_priced():
    """A jinja2 upgrade that adds a filter or global must add its rule to template_costs."""
    ours = {LOOP_FILTER, OPERAND_FILTER}
    assert set(_ENV.filters) - ours == set(template_costs.FILTERS)
    assert set(jinja2.defaults.DEFAULT_FILTERS) <= set(template_costs.FILTERS)
    assert set(_ENV.globals) <= set(template_costs.GLOBALS)


def _model_with_template(path: Path, template: str) -> Path:
    """A tiny synthetic llama (2 layers, 64 wide) whose tokenizer.chat_template is `template`."""
    from flexinfer.bench.synth import (SynthSpec, model_metadata, resolve_vocab, tensor_chunks,
                                       tensor_plan, tokenizer_metadata, vocab_path)
    from flexinfer.bench.synth_writer import write_gguf
    spec = SynthSpec("llama", 2, 64, 128, 4, 2, seed=17)
    tok = tokenizer_metadata(vocab_path(spec))
    tok["tokenizer.chat_template"] = template
    n_vocab = resolve_vocab(spec, tok["tokenizer.ggml.tokens"], vocab_path(spec))
    write_gguf(path, "llama", model_metadata(spec, n_vocab, "bomb"), tok,
               tensor_plan(spec, n_vocab), lambda i, t: tensor_chunks(spec, i, t), None)
    return path


@pytest.mark.parametrize("name", ["nested_ranges", "namespace_tilde_doubling"])
def test_cli_chat_with_a_bomb_template_exits_2_with_one_line(tmp_path, name):
    """The issue's report, end to end: `flexinfer run MODEL --chat -p hi` with a hostile
    template is one line naming the file, exit 2, no hang, not 24 GB."""
    model = _model_with_template(tmp_path / "bomb.gguf", BOMBS[name][0])
    r = subprocess.run([sys.executable, "-m", "flexinfer", "run", str(model), "--chat", "-p", "hi",
                        "-n", "2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"{model}: chat template exceeded the " in lines[0]
