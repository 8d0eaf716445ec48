"""The bodies of `run`, `tokenize` and `plan`: wiring the API to stdin/stdout/stderr."""

from __future__ import annotations

import json
import os
import sys

from flexinfer.errors import FlexInferError
from flexinfer.progress import LoadProgress
from flexinfer.stats import RunTimes, load_line, turn_line


def _read_prompt(a) -> str | None:
    if a.file is None:
        return a.prompt
    try:
        with open(a.file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise FlexInferError(f"{a.file}: cannot read the prompt file: "
                             f"{getattr(e, 'strerror', None) or e}") from None


def _sampling(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repeat_penalty=a.repeat_penalty, seed=a.seed, truncate=a.truncate,
                ignore_eos=a.ignore_eos)


def run_command(a, options: dict) -> int:
    from flexinfer.disk_cap import capped, parse_rate
    from flexinfer.hub import resolve
    prompt = _read_prompt(a)
    if prompt is None and not a.chat:
        raise FlexInferError("run: give a prompt with -p TEXT or -f FILE (or use --chat)")
    if a.system is not None and not a.chat:
        raise FlexInferError("run: --system needs --chat")
    path = resolve(a.model)  # a pull shows its own bar
    rate = parse_rate(a.disk_rate) if getattr(a, "disk_rate", None) else None
    with capped(path, rate):
        return _run_loaded(a, path, options, prompt)


def _run_loaded(a, path, options: dict, prompt: str | None) -> int:
    from flexinfer.model import load
    bar = None if a.json else LoadProgress()  # silent unless stderr is a terminal and it is slow
    try:
        model = load(path, **options, progress=bar)
    finally:
        if bar:
            bar.end()
    with model:
        if a.chat and prompt is None:
            return _interactive(model, a)
        messages = _messages(a.system, prompt) if a.chat else None
        return _one_shot(model, a, prompt, messages)


def _messages(system: str | None, user: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}]


def _one_shot(model, a, prompt: str, messages) -> int:
    from flexinfer.generate import chat_prompt, generate
    ids = chat_prompt(model, messages) if messages else model.tokenize(prompt)
    times, tokens, text = RunTimes(), [], []
    interrupted, error = False, None
    try:
        for piece in generate(model, ids, times=times, **_sampling(a)):
            if piece.token >= 0:
                tokens.append(piece.token)
            text.append(piece.text)
            if not a.json:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        interrupted = True
    except FlexInferError as e:  # an I/O fault mid-generation: keep what was made, then report
        error = e
    stats = times.as_dict(model.stats)
    if a.json:
        out = {"prompt_tokens": ids, "tokens": tokens, "text": "".join(text), **stats}
        if interrupted or error:
            out["interrupted" if interrupted else "error"] = True if interrupted else str(error)
        print(json.dumps(out))
    else:
        print(flush=True)  # before the stats line on stderr, also when both go to one file
        if not error:
            print(_stats_line(times, stats), file=sys.stderr)
    if interrupted:
        raise KeyboardInterrupt
    if error:
        raise error
    return 0


def _interactive(model, a) -> int:
    from flexinfer.generate import chat
    messages = [{"role": "system", "content": a.system}] if a.system else []
    tty = sys.stdin.isatty()
    print(f"flexinfer: {load_line(RunTimes().as_dict(model.stats))}", file=sys.stderr)  # once
    turn = 0
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        turn, reply = turn + 1, []
        times = RunTimes()
        for piece in chat(model, messages, times=times, **_sampling(a)):
            reply.append(piece.text)
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
        print(f"flexinfer: turn {turn} | {turn_line(times, times.as_dict(model.stats))}",
              file=sys.stderr)


def _stats_line(times: RunTimes, s: dict) -> str:
    """A one-shot run's line: loading and the run together."""
    return f"flexinfer: {load_line(s)} | {turn_line(times, s)}"


def tokenize_command(a) -> int:
    from flexinfer.gguf_file import read_gguf
    from flexinfer.tokenizer import Tokenizer
    from flexinfer.vocab_check import check_tokenizer_metadata
    g = read_gguf(a.model)
    check_tokenizer_metadata(g)
    tok = Tokenizer.from_gguf(g)
    add_bos = False if a.no_bos else None
    data = sys.stdin.read()
    if not a.json:
        print(" ".join(map(str, tok.encode(data, add_bos=add_bos))))
        return 0
    try:
        texts = json.loads(data)
    except ValueError as e:
        raise FlexInferError(f"tokenize --json: stdin is not JSON: {e}") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise FlexInferError("tokenize --json: stdin must be a JSON list of strings")
    print(json.dumps([tok.encode(t, add_bos=add_bos) for t in texts]))
    return 0


def plan_command(a, options: dict) -> int:
    from flexinfer.hub import resolve
    from flexinfer.model import DEFAULT_CTX, Options, _check_options, make_plan
    from flexinfer.model_check import check_model
    from flexinfer.tokenizer import Tokenizer
    o = Options(**options)
    _check_options(o)
    g, cfg, specs = check_model(resolve(a.model))
    tokenizer = Tokenizer.from_gguf(g)  # built as `run` builds it, so the measured RSS matches
    n_ctx = o.n_ctx or min(DEFAULT_CTX, cfg.n_ctx_train)
    from flexinfer.disk_cap import capped, parse_rate
    rate = parse_rate(a.disk_rate) if getattr(a, "disk_rate", None) else None
    with capped(g.path, rate):  # a calibration it makes is the capped disk's
        planned = make_plan(g, cfg, specs, o, n_ctx, o.n_threads or os.cpu_count() or 1)
    report = {**plan_report(planned, g.file_size, planned.n_ctx), "parallel": o.n_seq}
    del tokenizer
    if a.json:
        print(json.dumps(report, indent=1))
        return 0
    for k, v in report.items():
        if k not in ("layers", "stages"):
            print(f"{k:28} {v}")
    print("up_to_positions  resident_bytes  streamed_bytes  planned_total  predicted_tok_s")
    for st in report["stages"]:
        print(f"{st['up_to_positions']:>15}  {st['resident_bytes']:>14}  "
              f"{st['streamed_bytes_per_token']:>14}  {st['planned_total_bytes']:>13}  "
              f"{st['predicted_tokens_per_s']:>15}")
    print("layer  resident_bytes  streamed_bytes")
    for row in report["layers"]:
        print(f"{row['layer']:>5}  {row['resident_bytes']:>14}  {row['streamed_bytes']:>14}")
    return 0


def plan_report(planned, model_bytes: int, n_ctx: int) -> dict:
    """What `flexinfer plan` prints. The top-level figures are what a run starts with (the first
    stage of a growing KV cache); `stages` goes on to the full context, where the plan must hold."""
    p, mach = planned.plan, planned.machine
    start = p.first
    stages = [*p.stages, p]
    return {
        "budget_bytes": planned.budget, "budget_source": planned.source, "mode": p.mode,
        "policy": p.policy, "context": n_ctx, "n_ubatch": planned.n_ubatch,
        "model_bytes": model_bytes, "fixed_bytes": p.fixed_bytes,
        **{f"fixed_{k}_bytes": v for k, v in p.fixed_parts.items()},
        "resident_bytes": start.resident_bytes, "streamed_bytes_per_token": start.streamed_bytes,
        "loan_bytes": p.loan_bytes,
        "window": p.window, "slot_bytes": p.slot_bytes, "ring_bytes": p.ring_bytes,
        "bounce_bytes": p.bounce_bytes,
        "planned_total_bytes": start.total_bytes(),
        "disk_bytes_per_s": round(mach.disk_bw), "compute_bytes_per_s": round(mach.compute_bw),
        "t_io_s": round(start.t_io, 4), "t_cpu_s": round(start.t_cpu, 4),
        "predicted_tokens_per_s": round(start.predicted_tok_s, 3),
        "bound_tokens_per_s": round(p.bound_tok_s, 3),
        **({"expert_cache_bytes": p.expert_cache_bytes,
            "expert_hit_rate": round(p.expert_hit_rate, 4),
            "expert_pin_share": p.expert_pin_share} if planned.experts else {}),
        "stages": [{"up_to_positions": getattr(s, "positions", n_ctx),
                    "resident_bytes": s.resident_bytes, "streamed_bytes_per_token": s.streamed_bytes,
                    "planned_total_bytes": s.total_bytes(),
                    "predicted_tokens_per_s": round(s.predicted_tok_s, 3)} for s in stages],
        "layers": [{"layer": "head" if i == len(start.streamed_per_layer) - 1 else i,
                    "resident_bytes": p.layer_bytes[i] - s, "streamed_bytes": s}
                   for i, s in enumerate(start.streamed_per_layer)],
    }