"""Counters for one model: what was planned, what was read, how long compute and stalls took."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexinfer.budget import peak_rss_bytes


@dataclass
class Stats:
    load_s: float = 0.0  # file check to ready, seconds
    budget_bytes: int = 0
    budget_source: str = ""  # "--memory-budget", "cgroup limit", "MemAvailable"
    offload_mode: str = ""
    resident_bytes: int = 0  # weight bytes kept in memory
    compute_bytes: int = 0  # graph memory the allocator reserved
    stage: int = 0  # the plan's stage for the KV cache's current size (planner.py, "Stages")
    budget_changes: int = 0  # Model.set_memory_budget calls that moved to a new plan
    plan_summary: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # things said once on stderr (O_DIRECT refused, ...)
    experts: dict = field(default_factory=dict)  # the expert cache's counters (experts.py)

    def set_plan(self, plan, budget: int, source: str, machine) -> None:
        self.budget_bytes, self.budget_source = budget, source
        start = plan.first  # a growing KV cache starts in its first stage (planner.py)
        self.offload_mode, self.resident_bytes = plan.mode, start.resident_bytes
        self.plan_summary = {
            "policy": plan.policy, "window": plan.window,
            "streamed_bytes_per_token": start.streamed_bytes,
            "predicted_tokens_per_s": round(start.predicted_tok_s, 3),
            "stages": len(plan.stages) + 1,
            "bound_tokens_per_s": round(plan.bound_tok_s, 3),
            "disk_bytes_per_s": round(machine.disk_bw), "compute_bytes_per_s": round(machine.compute_bw),
        }
        if plan.expert_cache_bytes:  # a MoE's expert cache: what the plan expected of it
            self.plan_summary.update(expert_hit_rate=round(plan.expert_hit_rate, 4),
                                     expert_pin_share=plan.expert_pin_share)


@dataclass
class RunTimes:
    """One generate call: prompt and decode timings, and the streaming counters over the decode."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, already in the cache: not evaluated again
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    bytes_read: int = 0  # during decode
    io_busy_s: float = 0.0  # reader thread time in reads, during decode
    stall_s: float = 0.0  # compute waiting for weights, during decode
    convert_s: float = 0.0  # converter thread time uploading (repacking) streamed weights
    disk_read: int = 0  # /proc/self/io read_bytes during decode: what the disk gave this process,
    # page faults of a mapping (mmap mode) included, which the reader's count cannot see
    experts: tuple = (0, 0, 0, 0)  # expert cache hits, misses, bytes read and hits read ahead,
    # during decode

    def as_dict(self, stats: Stats) -> dict:
        n = max(self.decode_tokens, 1)
        decode_tps = self.decode_tokens / self.decode_s if self.decode_s else 0.0
        read, busy = self.bytes_read, self.io_busy_s
        if stats.offload_mode == "mmap":  # no reader: faults read on the computing thread
            read, busy = self.disk_read, self.decode_s
        return {
            "prefill_tokens_per_s": _r((self.prompt_tokens - self.cached_tokens) / self.prefill_s
                                       if self.prefill_s else 0),
            "cached_tokens": self.cached_tokens,
            "decode_tokens_per_s": _r(decode_tps),
            "load_s": _r(stats.load_s),
            "peak_memory_bytes": peak_rss_bytes(),
            "bytes_read_per_token": int(read / n),
            "disk_read_bytes_per_token": int(self.disk_read / n),
            "io_gbps": _r(read / busy / 1e9 if busy else 0.0),
            "compute_s_per_token": _r(max(self.decode_s - self.stall_s, 0) / n),
            "stall_fraction": _r(self.stall_s / self.decode_s if self.decode_s else 0.0),
            "convert_s_per_token": _r(self.convert_s / n),
            "resident_bytes": stats.resident_bytes,
            "stage": stats.stage,
            "budget_bytes": stats.budget_bytes,
            "budget_source": stats.budget_source,
            "offload_mode": stats.offload_mode,
            "plan": stats.plan_summary,
            **({"experts": {**stats.experts, **self._expert_rates(n)}} if stats.experts else {}),
        }


    def _expert_rates(self, n: int) -> dict:
        """The expert cache over the decode: hit rate (an expert read ahead counts as a hit),
        the share of picks that were cached before the step (read-ahead hits not counted),
        expert bytes read per token."""
        hits, misses, read, ahead = self.experts
        looked = hits + misses
        return {"decode_hit_rate": _r(hits / looked if looked else 0.0),
                "decode_cached_rate": _r((hits - ahead) / looked if looked else 0.0),
                "decode_expert_bytes_per_token": int(read / n)}


def _r(x: float) -> float:
    return round(float(x), 4)


def process_read_bytes(path: str = "/proc/self/io") -> int:
    """Bytes this process (all its threads) caused to be read from storage: `read_bytes` of
    /proc/self/io. Counts O_DIRECT reads and page faults alike; 0 where the file is missing."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "read_bytes":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


# ---- the stats lines on stderr. One-shot: load_line + turn_line in one. Chat: the load line once,
# then a turn line per reply. GB are 1e9 bytes.
GB = 1e9


def load_line(s: dict) -> str:
    """What loading did, once: `load 0.39 s | budget 0.17 GB (--memory-budget)`."""
    return (f"load {s['load_s']:.2f} s | "
            f"budget {s['budget_bytes'] / GB:.2f} GB ({s['budget_source']})")


def turn_line(times: RunTimes, s: dict) -> str:
    """What one generate call did: prompt and decode tokens and rates, peak memory, what was
    resident (it shrinks as the KV cache grows), compute per token and what streamed."""
    cached = f" ({times.cached_tokens} cached)" if times.cached_tokens else ""
    line = (f"prompt {times.prompt_tokens} tok{cached} {s['prefill_tokens_per_s']:.1f} tok/s | "
            f"decode {times.decode_tokens} tok {s['decode_tokens_per_s']:.2f} tok/s | "
            f"peak {s['peak_memory_bytes'] / GB:.2f} GB | "
            f"{s['offload_mode']}, resident {s['resident_bytes'] / GB:.2f} GB")
    n_stages = s["plan"].get("stages", 1)
    if n_stages > 1:  # a growing KV cache: which stage of the plan the run reached
        line += f" (KV stage {s['stage'] + 1}/{n_stages})"
    line += f" | compute {s['compute_s_per_token']:.3f} s/token"
    if s["bytes_read_per_token"]:
        line += (f", read {s['bytes_read_per_token'] / GB:.3f} GB/token at {s['io_gbps']:.2f} GB/s"
                 f", stall {100 * s['stall_fraction']:.0f}%")
    if "experts" in s:  # the expert cache (experts.py)
        e = s["experts"]
        line += (f" | experts: hit {100 * e['decode_hit_rate']:.0f}%, "
                 f"{e['decode_expert_bytes_per_token'] / GB:.3f} GB/token read, "
                 f"cache {e['capacity_bytes'] / GB:.2f} GB")
    return line
