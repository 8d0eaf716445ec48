"""Command line: argument parsing, wiring and printing. No logic of its own.

Every user error is one line on stderr (naming the file or option) and exit code 2; Ctrl-C keeps
what was already printed and exits 130.
"""

from __future__ import annotations

import argparse
import os
import sys

from flexinfer.errors import FlexInferError

EXIT_USAGE, EXIT_INTERRUPT = 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage dump; main() puts "flexinfer: " before it
        sub = self.prog.partition(" ")[2]  # "run" for `flexinfer run`, "" at the top level
        raise FlexInferError(f"{sub}: {message}" if sub else message)


def _sampling_args(p) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (128)")
    p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8,
                   help="0 is greedy (0.8)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("-s", "--seed", type=int, default=None, help="same seed, same output")


def _model_args(p) -> None:
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context length (4096)")
    p.add_argument("--memory-budget", default=None,
                   help="cap for the whole process, e.g. 1.5GiB, 800M: fixed; or auto (the "
                        "default): follow the cgroup's limits, MemAvailable and memory pressure")
    p.add_argument("--offload", default="flexinfer", choices=("flexinfer", "prefetch", "sync", "mmap"))
    p.add_argument("--no-balance", action="store_true", help="lock whole layers from the first")
    p.add_argument("--preserve", default="auto", choices=("auto", "ffn", "attn"))
    p.add_argument("--prefetch-window", type=int, default=None, help="layers read ahead")
    p.add_argument("--no-repack", action="store_true", help="plain kernels, no repacked weights")
    p.add_argument("--experts", default="auto", choices=("auto", "whole"),
                   help="MoE: auto reads only the picked experts into an expert cache; whole "
                        "plans expert tensors whole with the rest")
    p.add_argument("--expert-cache", default=None,
                   help="MoE: bytes of expert cache, e.g. 2G; never less than one layer's "
                        "experts, which 0 asks for (default: what the plan leaves)")
    ahead = p.add_mutually_exclusive_group()
    ahead.add_argument("--expert-prefetch", dest="expert_prefetch", action="store_true",
                       help="MoE: read the next layer's likely experts ahead (off by default: "
                            "slower on the machines measured, docs/benchmarks.md)")
    ahead.add_argument("--no-expert-prefetch", dest="expert_prefetch", action="store_false",
                       help="MoE: no read-ahead (the default)")
    fill = p.add_mutually_exclusive_group()
    fill.add_argument("--expert-fill", dest="expert_fill", action="store_true", default=None,
                      help="MoE: fill the expert cache at load with the experts earlier runs used "
                           "most (the default for serve: more read at load, fewer misses after it)")
    fill.add_argument("--no-expert-fill", dest="expert_fill", action="store_false",
                      help="MoE: load only the pinned experts; misses fill the rest (the default "
                           "for run and batch)")
    for which in ("k", "v"):
        p.add_argument(f"--cache-type-{which}", "-ct" + which, default="f16",
                       choices=("f16", "q8_0", "q4_0"), help=f"KV cache type for {which.upper()}")


def _options(a) -> dict:
    return dict(n_ctx=a.ctx_size, n_threads=a.threads, memory_budget=a.memory_budget,
                offload=a.offload, balance=not a.no_balance, preserve=a.preserve,
                prefetch_window=a.prefetch_window, repack=not a.no_repack,
                cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                n_seq=getattr(a, "parallel", 1), experts=a.experts,
                expert_prefetch=a.expert_prefetch,
                expert_fill=a.expert_fill if a.expert_fill is not None else a.command == "serve",
                expert_cache=_size(a.expert_cache, "--expert-cache", zero=True))


def _size(text, option: str, zero: bool = False):
    """A byte count like 800M or 2G (None stays None; 0 only when `zero`); bad input: one line
    naming the option."""
    if text is None:
        return None
    from flexinfer.budget import parse_size
    return parse_size(text, option, zero)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="flexinfer", description="Run GGUF models on CPU under a memory budget.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="generate text")
    run.add_argument("model", nargs="?", default=None, help="a .gguf path or a cached name")
    src = run.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", default=None)
    src.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    _sampling_args(run)
    _model_args(run)
    run.add_argument("--chat", action="store_true", help="use the model's chat template")
    run.add_argument("--system", default=None, help="system prompt (with --chat)")
    run.add_argument("--truncate", action="store_true", help="keep the end of a too-long prompt")
    run.add_argument("--ignore-eos", action="store_true", help="generate past end-of-generation")
    run.add_argument("--json", action="store_true", help="one JSON object on stdout at the end")
    run.add_argument("--disk-rate", default=None, help="cap reads of the model's disk at this "
                     "rate, e.g. 500M (bytes/s), in an I/O cgroup: emulates a slower disk (needs "
                     "root or a delegated cgroup)")
    tok = sub.add_parser("tokenize", help="text on stdin -> token ids")
    tok.add_argument("model")
    tok.add_argument("--no-bos", action="store_true")
    tok.add_argument("--json", action="store_true", help="stdin: a JSON list of strings")
    bt = sub.add_parser("batch", help="generate for every prompt of a JSONL file, N at a time")
    bt.add_argument("model", help="a .gguf path or a cached name")
    bt.add_argument("prompts", help='JSONL: {"prompt": ...} or {"messages": [...]} a line')
    bt.add_argument("-o", "--output", default=None, help="JSONL results (default: stdout)")
    bt.add_argument("-np", "--parallel", type=int, default=4, help="sequences at once (4)")
    _sampling_args(bt)
    _model_args(bt)
    bt.add_argument("--truncate", action="store_true", help="keep the end of a too-long prompt")
    bt.add_argument("--ignore-eos", action="store_true", help="generate past end-of-generation")
    bt.add_argument("--json", action="store_true", help="a summary object last on stdout")
    pl = sub.add_parser("plan", help="print the memory plan without running")
    pl.add_argument("model")
    _model_args(pl)
    pl.add_argument("-np", "--parallel", type=int, default=1, help="sequences decoded together")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--disk-rate", default=None, help="plan for reads capped at this rate (the "
                    "calibration of `run --disk-rate RATE`; needs root or a delegated cgroup)")
    _add_serve(sub)
    pull = sub.add_parser("pull", help="download a known model into the cache")
    pull.add_argument("name")
    sub.add_parser("models", help="list cached models")
    _add_optional(sub)
    return ap


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    sv.add_argument("model", nargs="?", default=None, help="a .gguf path or a cached name")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8080, help="0: any free port")
    sv.add_argument("--parallel", "-np", type=int, default=4, help="sequences generated at once")
    sv.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more: 503")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    sv.add_argument("--timeout", type=float, default=None,
                    help="seconds a request may take; then it ends with finish_reason length")
    sv.add_argument("--max-body", type=int, default=1 << 20, help="request body bytes (1 MiB)")
    sv.add_argument("--alias", default=None, help="the model name clients see (the file's name)")
    _model_args(sv)


def _add_optional(sub) -> None:
    """Subcommands from the bench package (synthetic models, sweeps)."""
    from flexinfer.bench.cli_bench import add_bench_parser
    from flexinfer.bench.cli_synth import add_synth_parser
    add_synth_parser(sub)
    add_bench_parser(sub)


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
        code = COMMANDS[args.command](args)
    except FlexInferError as e:
        sys.stdout.flush()
        print(f"flexinfer: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nflexinfer: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPT
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


def _run(a) -> int:
    from flexinfer.cli_run import run_command
    return run_command(a, _options(a))


def _batch(a) -> int:
    from flexinfer.cli_batch import batch_command
    from flexinfer.cli_run import _sampling
    return batch_command(a, _options(a), _sampling(a))


def _tokenize(a) -> int:
    from flexinfer.cli_run import tokenize_command
    return tokenize_command(a)


def _plan(a) -> int:
    from flexinfer.cli_run import plan_command
    return plan_command(a, _options(a))


def _serve(a) -> int:
    from flexinfer.server.main import serve_command
    return serve_command(a, _options(a))


def _pull(a) -> int:
    from flexinfer.hub import pull
    print(pull(a.name))
    return 0


def _models(a) -> int:
    from flexinfer.hub import list_models
    for name, path, size in list_models():
        print(f"{name}\t{size / 1e6:.1f} MB\t{path}")
    return 0


COMMANDS = {"run": _run, "batch": _batch, "serve": _serve, "tokenize": _tokenize, "plan": _plan,
            "pull": _pull, "models": _models,
            "synth": lambda a: a.func(a), "bench": lambda a: a.func(a)}
