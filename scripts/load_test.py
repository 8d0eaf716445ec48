"""Load test for an OpenAI-compatible server (`flexinfer serve` or llama.cpp's `llama-server`), issue 12.

N clients each send streamed chat completions back to back for T seconds (requests still running at
T finish and count). Reported: aggregate generated tok/s over the wall time, p50/p95 time to first
token, requests and errors, and the server's peak memory, sampled every 0.1 s from /proc/PID/status
(VmRSS) and, with --cgroup, from the cgroup v1 memory controller (usage and the kernel's max_usage).

    python scripts/load_test.py --url http://127.0.0.1:8080 --clients 16 --duration 120 \
        --pid $(pgrep -n -f 'flexinfer serve') --cgroup /sys/fs/cgroup/memory/serve --out run.json

Or let it start the server under a fresh memory cgroup (page cache dropped first), wait for /health,
run the load, then stop the server and report the cgroup's peak and whether the OOM killer fired:

    python scripts/load_test.py --launch "flexinfer serve MODEL --port 8080 -t 2 --parallel 4" \
        --memory-limit 2G --url http://127.0.0.1:8080 --clients 16 --duration 120 --label flexinfer

--disk-rate 1G --disk-model MODEL also caps the server's reads of the model's disk (an I/O cgroup,
as `flexinfer bench --disk-rate`): a disk of known speed for both servers.

Token counts come from the server's usage (stream_options.include_usage); a server that sends no
usage is counted one token per content chunk.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle gear works.",
           "List ten uses for a paperclip.", "Describe the water cycle to a child.",
           "What makes a good cup of tea?", "Summarize the plot of a heist movie you invent."]


# Threads: one per simulated client and one memory sampler; this is a benchmark client, not the package.
class Memory:
    """Peak RSS of a process and peak usage of a cgroup v1 memory group, sampled in a thread."""

    def __init__(self, pid: int | None, cgroup: str | None, every_s: float = 0.1,
                 trace_s: float = 0):
        self.pid, self.cgroup, self.every_s = pid, cgroup, every_s
        self.peak_rss = self.peak_cgroup = 0
        self.trace_s = trace_s  # every trace_s seconds: (seconds, RSS, cgroup usage) in .trace
        self.trace: list[tuple[float, int, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _cg(self, name: str) -> int:
        with open(f"{self.cgroup}/{name}") as f:
            return int(f.read())

    def _run(self) -> None:
        t0 = next_trace = time.monotonic()
        while not self._stop.is_set():
            rss = self._rss() if self.pid else 0
            cg = self._cg("memory.usage_in_bytes") if self.cgroup else 0
            self.peak_rss, self.peak_cgroup = max(self.peak_rss, rss), max(self.peak_cgroup, cg)
            if self.trace_s and time.monotonic() >= next_trace:
                self.trace.append((round(time.monotonic() - t0, 1), rss, cg))
                next_trace += self.trace_s
            self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        if self.cgroup:  # the kernel's own high-water mark, between our samples too
            self.peak_cgroup = max(self.peak_cgroup, self._cg("memory.max_usage_in_bytes"))


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int,
                drop: bool = False) -> tuple[float, int]:
    """(time to first token, tokens generated) of one streamed chat completion. With `drop`, the
    client closes the stream after its first piece of content, as a user who stops reading."""
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.7, stream=True, stream_options={"include_usage": True})
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage.completion_tokens
        if ch.choices and ch.choices[0].delta.content:
            chunks += 1
            if drop:
                stream.close()
                break
            if ttft is None:
                ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None
                                                                      else chunks)


def client_loop(i: int, a, until: float, out: dict, lock: threading.Lock) -> None:
    client = openai.OpenAI(base_url=a.url.rstrip("/") + "/v1", api_key=a.api_key or "none",
                           max_retries=0, timeout=a.request_timeout)
    k = i
    while time.perf_counter() < until:
        prompt = PROMPTS[k % len(PROMPTS)]
        drop = bool(a.drop_every) and (k // a.clients) % a.drop_every == a.drop_every - 1
        k += a.clients
        try:
            ttft, n = one_request(client, a.model, prompt, a.max_tokens, drop)
        except Exception as e:  # noqa: BLE001 - every failure is counted and shown, never fatal
            with lock:
                out["errors"].append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            time.sleep(0.5)
            continue
        with lock:
            out["ttft"].append(ttft)
            out["tokens"] += n
            out["requests"] += 1
            out["dropped"] += drop


@contextmanager
def launched(a):
    """Start --launch under a new cgroup of --memory-limit (the child joins before exec, so every
    byte it touches is charged); yield (pid, cgroup dir, cgroup); stop it at the end."""
    from flexinfer.budget import parse_size
    from flexinfer.cgroup import MemoryCgroup, drop_page_cache
    from flexinfer.disk_cap import DiskCap
    limit = parse_size(a.memory_limit, "--memory-limit")  # both sizes checked before any cgroup
    rate = parse_size(a.disk_rate, "--disk-rate") if a.disk_rate else None
    cap = DiskCap.create(a.disk_model, rate) if rate else None  # reads of the model's disk
    try:  # capped, as `flexinfer bench --disk-rate`
        group = MemoryCgroup.create("load-test", limit)
    except BaseException:
        if cap is not None:
            cap.remove()
        raise
    joins = [group.procs_file]
    if cap is not None:
        if cap.hierarchy.version == 2 and group.version == 2:  # one cgroup carries both
            cap.remove()
            DiskCap.apply_to(group.path, cap.hierarchy, cap.device, cap.rate)
            cap = None
        else:
            joins.append(cap.procs_file)
    drop_page_cache()
    log = open(a.server_log, "w")
    join = " && ".join(f'echo $$ > "{f}"' for f in joins) + ' && exec "$@"'
    proc = subprocess.Popen(["sh", "-c", join, "server", *shlex.split(a.launch)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + a.ready_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"load_test: the server exited with {proc.returncode}; see "
                                 f"{a.server_log}")
            try:
                if httpx.get(a.url.rstrip("/") + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"load_test: the server was not ready in {a.ready_timeout} s")
            time.sleep(0.5)
        yield proc.pid, str(group.path), group
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        group.remove()
        if cap is not None:
            cap.remove()


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="default", help="the model name sent (servers may ignore)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60, help="seconds of new requests")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--request-timeout", type=float, default=600)
    ap.add_argument("--drop-every", type=int, default=0,
                    help="every Nth request of a client closes its stream after the first token")
    ap.add_argument("--trace-every", type=float, default=0,
                    help="record (seconds, RSS, cgroup usage) this often, for a soak")
    ap.add_argument("--pid", type=int, default=None, help="server process: peak VmRSS")
    ap.add_argument("--cgroup", default=None, help="cgroup v1 memory dir: peak usage")
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--launch", default=None, help="a server command to start under a cgroup")
    ap.add_argument("--memory-limit", default="2G", help="that cgroup's limit (with --launch)")
    ap.add_argument("--disk-rate", default=None, help="with --launch: also cap the server's "
                    "reads of --disk-model's disk at this many bytes/s, e.g. 1G")
    ap.add_argument("--disk-model", default=None, help="the model file whose disk --disk-rate caps")
    ap.add_argument("--server-log", default="load_test_server.log", help="its stdout and stderr")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for /health")
    a = ap.parse_args()
    if a.disk_rate and not (a.launch and a.disk_model):
        ap.error("--disk-rate needs --launch and --disk-model")
    if a.launch:
        from flexinfer.errors import FlexInferError
        try:
            with launched(a) as (a.pid, a.cgroup, group):
                res = run_load(a)
                res["oom_killed"] = group.oom_killed()
                res["memory_limit"] = a.memory_limit
                res["launch"] = a.launch
                res["disk_rate"] = a.disk_rate
        except FlexInferError as e:  # a bad size, or no cgroup to be had: one line
            print(f"load_test: {e}", file=sys.stderr)
            return 2
    else:
        res = run_load(a)
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 1 if res["errors"] or res.get("oom_killed") else 0


def run_load(a) -> dict:
    out, lock = {"ttft": [], "tokens": 0, "requests": 0, "dropped": 0, "errors": []}, threading.Lock()
    with Memory(a.pid, a.cgroup, trace_s=a.trace_every) as mem:
        t0 = time.perf_counter()
        until = t0 + a.duration
        threads = [threading.Thread(target=client_loop, args=(i, a, until, out, lock))
                   for i in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    res = {"label": a.label, "url": a.url, "clients": a.clients, "duration_s": a.duration,
           "wall_s": round(wall, 2), "max_tokens": a.max_tokens, "requests": out["requests"],
           "dropped": out["dropped"], "errors": len(out["errors"]), "tokens": out["tokens"],
           "tok_s": round(out["tokens"] / wall, 3),
           "ttft_p50_s": pct(out["ttft"], 50), "ttft_p95_s": pct(out["ttft"], 95),
           "ttft_mean_s": statistics.fmean(out["ttft"]) if out["ttft"] else None,
           "peak_rss_bytes": mem.peak_rss or None, "peak_cgroup_bytes": mem.peak_cgroup or None,
           "memory_samples": mem.samples, "first_errors": out["errors"][:5]}
    if mem.trace:
        res["memory_trace"] = mem.trace
    return res


if __name__ == "__main__":
    sys.exit(main())
