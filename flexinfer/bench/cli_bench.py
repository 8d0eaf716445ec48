"""`flexinfer bench MODEL --budgets 1G,1.5G,2G --modes mmap,...,flexinfer [--peer llama.cpp]
--out DIR`: throughput against memory budget (cli.py wires it in).

Sizes as --memory-budget reads them: 1.5G = 1.5 * 10^9 bytes, 1.5GiB = 1.5 * 2^30 bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys

from flexinfer.bench import sweep
from flexinfer.budget import parse_size as budget_parse_size
from flexinfer.disk_cap import io_cap_unavailable_reason, parse_rate
from flexinfer.errors import FlexInferError



def parse_size(text: str, option: str = "--budgets") -> int:
    """The same sizes as --memory-budget: K/M/G decimal (the paper's and the issue's GB), KiB/MiB/GiB
    binary, so a sweep point and a run with the same words get the same bytes."""
    return budget_parse_size(text, option)


def parse_list(text: str, flag: str, convert) -> tuple:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise FlexInferError(f"{flag}: empty list")
    return tuple(convert(t.strip()) for t in items)


def positive_int(flag: str):
    def convert(text: str) -> int:
        if not text.isdigit() or int(text) <= 0:
            raise FlexInferError(f"{flag}: {text!r} is not a positive integer")
        return int(text)
    return convert


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="throughput against memory budget for every offload "
                                            "mode (and llama.cpp), as a table and a plot")
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--budgets", required=True, help="comma-separated sizes, e.g. 1G,1.5G,2G,3G")
    p.add_argument("--modes", default=",".join(sweep.MODES),
                   help=f"comma-separated, from {', '.join(sweep.MODES)} (default: all; "
                        "'' with --peer: the peer alone)")
    p.add_argument("--peer", action="append", default=[], choices=sorted(sweep.PEERS),
                   help="also run llama.cpp (mmap and repack; or llama.cpp-mmap, llama.cpp-repack "
                        "alone) through llama-cpp-python")
    p.add_argument("--tokens", "-n", default="32", help="tokens generated per point (default 32)")
    p.add_argument("--prompt-tokens", default="16", help="comma-separated prompt lengths; each "
                   "is its own set of points and prefill table; decode uses the first (default 16)")
    p.add_argument("--threads", "-t", default="2", help="compute threads (default 2)")
    p.add_argument("--ctx", "-c", default="0", help="context length (default: prompt + tokens, "
                   "rounded up to 256)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per point (1800)")
    p.add_argument("--disk-bw", help="disk bandwidth, e.g. 1.6G (per second); default: measure")
    p.add_argument("--t-cpu", type=float, help="decode s/token fully resident; default: measure")
    p.add_argument("--disk-rate", help="comma-separated read caps, e.g. 500M,1G (bytes/s), each "
                   "its own sweep: every point and the disk calibration run in an I/O cgroup "
                   "capping reads of the model's disk (needs root or a delegated cgroup)")
    p.add_argument("--parallel", "-np", default="1",
                   help="comma-separated sequence counts B, e.g. 1,2,4,8: each point runs B "
                        "sequences through `flexinfer batch` (the peer: llama.cpp's batch API)")
    p.add_argument("--repeats", default="1", help="runs of every point, modes alternating; "
                   "tables show the median and the spread (default 1)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=bench_main)
    return p


def peer_modes(peers: list[str], log) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The peers' modes, or a note per peer that cannot run here."""
    modes, notes = [], []
    for peer in peers:
        if importlib.util.find_spec("llama_cpp") is None:
            notes.append(f"peer {peer} skipped: llama_cpp is not importable "
                         "(pip install 'flexinfer[peers]')")
            log(f"bench: {notes[-1]}")
        else:
            modes += sweep.PEERS[peer]
    return tuple(modes), tuple(notes)


def options_from_args(args, log=sweep._stderr) -> sweep.BenchOptions:
    if not os.path.isfile(args.model):
        raise FlexInferError(f"{args.model}: no such model file")
    if importlib.util.find_spec("matplotlib") is None:  # found now, not after an hour of points
        raise FlexInferError("bench: needs matplotlib for its plot: "
                             "pip install 'flexinfer[bench]'")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())  # "": peers only
    unknown = [m for m in modes if m not in sweep.MODES]
    if unknown:
        raise FlexInferError(f"--modes: {', '.join(unknown)} unknown "
                             f"(use {', '.join(sweep.MODES)})")
    extra, notes = peer_modes(args.peer, log)
    if not modes + extra:
        raise FlexInferError("--modes: nothing to run (no mode, and no peer that can run)")
    opts = sweep.BenchOptions(
        model=args.model, budgets=tuple(sorted(parse_list(args.budgets, "--budgets", parse_size))),
        modes=modes + extra, out_dir=args.out,
        tokens=positive_int("--tokens")(args.tokens),
        prompt_tokens=parse_list(args.prompt_tokens, "--prompt-tokens",
                                 positive_int("--prompt-tokens")),
        threads=positive_int("--threads")(args.threads),
        ctx=positive_int("--ctx")(args.ctx) if args.ctx != "0" else None,
        timeout_s=args.timeout, disk_bw=parse_size(args.disk_bw, "--disk-bw") if args.disk_bw else None,
        t_cpu=args.t_cpu, command_line=shlex.join(sys.argv), notes=notes,
        disk_rates=disk_rates(args), repeats=positive_int("--repeats")(args.repeats),
        parallel=parse_list(args.parallel, "--parallel", positive_int("--parallel")))
    check_ctx(opts)
    return opts


def disk_rates(args) -> tuple:
    """--disk-rate as bytes/s, checked now: a cap that cannot be set stops the bench before any
    point runs (never measured uncapped under a capped label)."""
    if not args.disk_rate:
        return (None,)
    if args.disk_bw:
        raise FlexInferError("--disk-bw and --disk-rate: give one (a cap is measured under it)")
    rates = parse_list(args.disk_rate, "--disk-rate", lambda t: parse_rate(t))
    reason = io_cap_unavailable_reason(args.model)
    if reason:
        raise FlexInferError(reason)
    return rates


def check_ctx(opts: sweep.BenchOptions):
    need = max(opts.prompt_tokens) + opts.tokens + 1
    if opts.ctx and opts.ctx < need:
        raise FlexInferError(f"--ctx {opts.ctx} cannot hold a prompt of {max(opts.prompt_tokens)} "
                             f"and {opts.tokens} generated tokens (needs {need})")


def bench_main(args) -> int:
    opts = options_from_args(args)
    results = sweep.run_sweep(opts)
    ok = sum(r["status"] == "ok" for r in results["rows"])
    sys.stderr.write(f"bench: {ok}/{len(results['rows'])} points ok; wrote results.json, "
                     f"results.md, throughput.png in {opts.out_dir}\n")
    return 0

