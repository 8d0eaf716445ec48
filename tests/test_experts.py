"""Expert-level streaming (flexinfer/experts.py): the expert cache reads only the experts the router
picked, and every run equals the resident one bit for bit, whatever the cache holds.

Models: the references' tiny qwen3moe, qwen2moe and mixtral (8 experts, 2 used, 2 layers, the
llama-spm vocab: tests/test_moe.py's `small`). A run is a 14-token prompt batch and 6 decode steps,
so the cache sees a batch's union of picks and single tokens' K picks.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

import flexinfer.model as fm
from flexinfer import experts as ex
from flexinfer.errors import FlexInferError
from flexinfer.gguf_file import read_gguf
from tests.test_engine import BUDGET, _squeeze_budget
from tests.test_moe import PROMPT, small  # noqa: F401 (a fixture)

DECODE = PROMPT[:6]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Each test its own $FLEXINFER_HOME: expert counts from one test never warm another."""
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _run(path, **opts):
    """(logits of the prompt then of each decode step, stacked; the model's expert summary)."""
    with fm.load(path, n_ctx=64, n_threads=2, **{"memory_budget": BUDGET, **opts}) as m:
        out = [m.logits(PROMPT)]
        for t in DECODE:
            out.append(m.evaluate([t], len(m.cache.tokens[0])))
        return np.concatenate(out), dict(m.stats.experts), m


@pytest.fixture(scope="module")
def resident(small):  # noqa: F811
    """The reference: every expert tensor resident whole, one graph per layer."""
    path, _ = small
    return path, _run(path, experts="whole")[0]


@pytest.mark.parametrize("mode,fraction", [("flexinfer", 1.0), ("flexinfer", 0.7),
                                           ("prefetch", 0.0), ("sync", 0.5)])
@pytest.mark.parametrize("cache", ["all", "floor", "floor+ahead"])
def test_expert_streaming_is_bit_exact(resident, mode, fraction, cache, monkeypatch):
    """Dense rows squeezed to `fraction` (streamed by the prefetcher) and the expert cache at all
    experts or at its floor (one layer's: every step evicts), with the read-ahead too."""
    path, want = resident
    if fraction < 1.0:
        _squeeze_budget(monkeypatch, fraction)
    opts = {"all": {}, "floor": {"expert_cache": 0},
            "floor+ahead": {"expert_cache": 0, "expert_prefetch": True}}[cache]
    got, stats, _ = _run(path, offload=mode, **opts)
    assert np.array_equal(got, want), f"{path.name}: {mode} {fraction} cache {cache} differs"
    if cache != "all":
        assert stats["misses"] > 0 and stats["capacity_bytes"] < stats["expert_bytes"]
        assert stats["cached_bytes"] <= stats["capacity_bytes"]


def test_without_repack_too(resident):
    path, _ = resident
    plain = _run(path, repack=False, experts="whole")[0]
    assert np.array_equal(_run(path, repack=False, expert_cache=0)[0], plain)


def test_a_wrong_slab_is_caught(resident, monkeypatch):
    """Break it on purpose: reading each run's neighbour slab changes the logits (the tests above
    would fail)."""
    path, want = resident
    real = ex.ExpertStore._read_run

    def shifted(self, s, run, stage, headers):  # the next expert's bytes (the previous one's for
        d = s.nb2 if run[-1] + 1 < self.n_expert else -s.nb2  # the last)
        return real(self, ex._Slab(s.header, s.offset + d, s.nb2, s.rows, s.rb, s.home, s.repack),
                    run, stage, headers)
    monkeypatch.setattr(ex.ExpertStore, "_read_run", shifted)
    got = _run(path, expert_cache=0)[0]
    assert not np.array_equal(got, want)
    assert np.abs(got - want).max() > 0.1


def test_only_the_picked_experts_are_read(resident):
    """Bytes read for experts = misses x one expert's three slabs; every lookup a hit or a miss;
    unpicked experts' slabs never touched (they read as zeros in the lazily charged arena).
    Without the read-ahead, which reads guesses (test_read_ahead_predicts_and_is_used)."""
    path, _ = resident
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 expert_prefetch=False) as m:
        st = m._experts
        assert st.hits + st.misses == 0 and st.bytes_read == 0  # a cold cache: nothing read yet
        m.evaluate([PROMPT[0]], 0)  # one token: K experts per layer
        k, layers = m.cfg.n_expert_used, m.cfg.n_layer
        assert st.misses == k * layers and st.hits == 0
        assert st.bytes_read == sum(st.unit_bytes[l] for l in range(layers)) * k
        assert st.counts.sum() == k * layers
        for layer in range(layers):
            held = st.resident(layer)
            assert len(held) == k and set(held) == set(np.flatnonzero(st.counts[layer]))
            for s in st._slabs[layer]:
                for e in set(range(m.cfg.n_expert)) - set(held):
                    inner = (s.home + e * s.nb2 + 4095) // 4096 * 4096  # a page of its own
                    if inner + 4096 <= s.home + (e + 1) * s.nb2:
                        assert not np.frombuffer(ex.ggml_ops.memview(inner, 4096), np.uint8).any()


def test_counts_are_saved_and_warm_the_next_run(resident, home, monkeypatch):
    """The next run pins the experts counted most, as much of the cache as pin_share says (here
    forced to half: the estimate prefers none for this tiny model's trace)."""
    path, want = resident
    got, first, _ = _run(path, expert_cache=0)
    files = list((home / "experts").glob("*.json"))
    assert len(files) == 1
    counts = np.asarray(json.loads(files[0].read_text())["counts"])
    n_tok = len(PROMPT) + len(DECODE)
    assert counts.shape[1] == 8 and (counts.sum(axis=1) == n_tok * 2).all(), counts  # K = 2
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0) as m:
        st = m._experts
        assert st.pin_share == ex.pin_share(st.g, st._names, st.capacity, st.counts_file, 2)
        assert len(st._pinned) * min(st.unit_bytes.values()) <= st.pin_share * st.capacity
    monkeypatch.setattr(ex, "PIN_SHARES", (0.5,))
    got2, second, _ = _run(path, expert_cache=0)
    assert np.array_equal(got2, want)
    assert second["pin_share"] == 0.5
    assert second["pinned"] > 0 and second["hits"] > first["hits"], (first, second)


def test_the_fill_loads_the_experts_counted_most_into_the_cache(resident, home):
    """--expert-fill: at load the room the pins leave is filled with the experts earlier runs
    counted most (then the router's prior), unpinned and first to be evicted; the cache is full
    before the first step, which then hits more than without it, and the logits are the same."""
    path, want = resident
    _run(path, expert_cache=0)  # writes the counts
    total = sum(read_gguf(path).tensors[n].nbytes for n in ex.expert_names(
        fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, experts="whole").specs))
    half = total // 2
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=half,
                 expert_fill=True) as m:
        st = m._experts
        unit = max(st.unit_bytes.values())
        assert st.used_bytes <= st.capacity < st.used_bytes + unit  # full
        saved, k = st._saved, st.cfg.n_expert_used
        prior = ex.router_prior(st.g, st._names, k)
        score = {key: saved[key] * (k + 1) + (prior[key] if prior is not None else 0)
                 for key in ((l, e) for l in st._slabs for e in range(st.n_expert))}
        filled = st._resident - st._pinned
        assert filled and not filled & st._pinned
        out = [key for key in score if key not in st._resident]
        assert min(score[key] for key in filled) >= max(score[key] for key in out)
        front = list(st._order)[:len(filled)]  # the guesses: evicted before anything used
        assert set(front) == filled
        assert [score[key] for key in front] == sorted(score[key] for key in front)
        assert any("read at load (--expert-fill)" in n for n in m.stats.notes)
    got, filled_stats, _ = _run(path, expert_cache=half, expert_fill=True)
    _, empty_stats, _ = _run(path, expert_cache=half)
    assert np.array_equal(got, want)
    assert filled_stats["hits"] > empty_stats["hits"], (filled_stats, empty_stats)
    assert filled_stats["cached_bytes"] <= filled_stats["capacity_bytes"]


def test_the_fill_is_on_for_serve_and_off_for_run_unless_asked():
    from flexinfer.cli import _options, build_parser
    p = build_parser()
    assert _options(p.parse_args(["serve", "m.gguf"]))["expert_fill"] is True
    assert _options(p.parse_args(["serve", "m.gguf", "--no-expert-fill"]))["expert_fill"] is False
    assert _options(p.parse_args(["run", "m.gguf"]))["expert_fill"] is False
    assert _options(p.parse_args(["run", "m.gguf", "--expert-fill"]))["expert_fill"] is True


def test_a_corrupt_counts_file_is_ignored_in_one_line(resident, home, capsys):
    path, want = resident
    _run(path, expert_cache=0)
    f = next((home / "experts").glob("*.json"))
    f.write_text('{"counts": [[1, 2]]}')
    got, stats, _ = _run(path, expert_cache=0)
    err = capsys.readouterr().err
    assert np.array_equal(got, want) and stats["pinned"] == 0
    assert f"{f}: expert counts ignored" in err and len(err.strip().splitlines()) == 1
    assert len(json.loads(f.read_text())["counts"]) == 2  # written anew, with this run's counts


def test_the_cache_holds_all_experts_when_the_budget_allows(resident):
    """No squeeze: the plan leaves room for every expert; they are read once, at load."""
    path, _ = resident
    _, stats, _ = _run(path)
    assert stats["capacity_bytes"] == stats["expert_bytes"] == stats["cached_bytes"]
    assert stats["misses"] == 0 and stats["hit_rate"] == 1.0


@pytest.mark.parametrize("opts,expect", [({"experts": "some"}, "--experts: 'some'"),
                                         ({"expert_cache": -1}, "--expert-cache: must be")])
def test_bad_expert_options_are_refused(resident, opts, expect):
    path, _ = resident
    with pytest.raises(FlexInferError, match=expect):
        fm.load(path, **opts)


def test_the_cli_takes_expert_cache_0_for_the_floor(resident):
    """`--expert-cache 0` asks for the least cache that works, as the API's expert_cache=0 does:
    one layer's experts (plus the staging buffer the plan charges with it), which `plan` shows
    and `run` runs with; a size that is not a whole byte is still one line and exit 2."""
    from tests.test_cli import cli
    path, _ = resident
    g, _, specs = fm.check_model(str(path))
    floor = ex.min_capacity(g, ex.expert_names(specs))
    r = cli("plan", path, "-c", "64", "--memory-budget", "4G", "--expert-cache", "0", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["expert_cache_bytes"] == floor > 0
    # no counts yet: nothing to pin, the cache's share of the experts
    assert plan["expert_pin_share"] == 0.0 and 0 < plan["expert_hit_rate"] < 1
    r = cli("run", path, "-p", "hello", "-n", "2", "--temp", "0", "-c", "64",
            "--memory-budget", "4G", "--expert-cache", "0", "--json")
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stdout)  # the run's plan says what it expected of the cache, as plan did
    assert ran["plan"]["expert_hit_rate"] == plan["expert_hit_rate"]
    assert ran["experts"]["pin_share"] == ran["plan"]["expert_pin_share"] == 0.0
    for bad in ("0.5", "-1"):
        r = cli("run", path, "-p", "hello", "-n", "2", "--expert-cache", bad)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
        assert "--expert-cache" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_cli_turns_the_read_ahead_on_only_when_asked(resident):
    """The read-ahead is off by default (slower on the machines measured); `--expert-prefetch`
    turns it on (its recall is reported); with `--no-expert-prefetch` too it is one line, exit 2."""
    from tests.test_cli import cli
    path, _ = resident
    run = ("run", path, "-p", "hello world, once more", "-n", "4", "--temp", "0", "-c", "64",
           "--memory-budget", "4G", "--expert-cache", "0", "--json")
    off = cli(*run)
    on = cli(*run, "--expert-prefetch")
    assert off.returncode == on.returncode == 0, off.stderr + on.stderr
    assert "prefetch_recall" not in json.loads(off.stdout)["experts"]
    assert "prefetch_recall" in json.loads(on.stdout)["experts"]
    both = cli(*run, "--expert-prefetch", "--no-expert-prefetch")
    assert both.returncode == 2 and both.stderr.strip().count("\n") == 0, both.stderr
    assert "--expert-prefetch" in both.stderr and "Traceback" not in both.stderr


def test_read_ahead_predicts_and_is_used(resident, monkeypatch):
    """Decode steps read layer 1's likely experts while layer 0's compute: the prediction's recall
    is reported, experts read ahead are used, and the run is still bit-exact (an expert read
    ahead but marked resident without its bytes would change the logits: the tests above). fetch
    stops the read-ahead when it comes, which on this tiny model is before it read anything but
    by chance; here it lets it finish, so that what it read is known."""
    real = ex.ExpertStore._settle

    def finished(self, layer, need):
        if self._bg is not None:
            self._bg.wait()
        return real(self, layer, need)
    monkeypatch.setattr(ex.ExpertStore, "_settle", finished)
    path, want = resident
    got, stats, _ = _run(path, expert_cache=0, expert_prefetch=True)
    assert np.array_equal(got, want)
    assert stats["prefetched"] > 0 and 0 < stats["prefetch_used"] <= stats["prefetched"]
    assert 0 < stats["prefetch_recall"] <= 1
    off, stats_off, _ = _run(path, expert_cache=0)  # off by default
    assert np.array_equal(off, want) and "prefetch_recall" not in stats_off


def test_a_read_ahead_stopped_early_forgets_what_it_did_not_read(resident, monkeypatch):
    """fetch stops the read-ahead once the step's picks are known: experts it charged but had not
    read yet leave the cache (a picked one is read then, as a miss). Here it always stops after
    its first expert; the run stays exact and the cache's bytes are those of what it holds."""
    path, want = resident
    real = ex.ExpertStore._read_ahead

    def first_only(self, job):
        job.todo = job.todo[:1]
        return real(self, job)
    monkeypatch.setattr(ex.ExpertStore, "_read_ahead", first_only)
    got, stats, m = _run(path, expert_cache=0, expert_prefetch=True)
    assert np.array_equal(got, want)
    st = m._experts
    assert stats["prefetched"] > 0 and stats["misses"] > 0
    assert st.used_bytes == sum(st.unit_bytes[l] for (l, _) in st._resident)


def test_the_guess_replay_records_every_decode_step(resident):
    """scripts/expert_guesses.py records each MoE step the engine runs (it once wrapped store
    methods the decode steps no longer called, recorded nothing and divided by zero): its table
    counts the decode tokens asked for, misses in a cache of one or two experts (by the model's
    expert size), and a recall <= 1."""
    import subprocess
    import sys
    from pathlib import Path
    path, _ = resident
    script = Path(__file__).parent.parent / "scripts" / "expert_guesses.py"
    r = subprocess.run([sys.executable, str(script), str(path), "--caches", "60000",
                        "--distances", "1", "--ranks", "2", "-n", "4", "-c", "64"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ": 4 decode tokens" in r.stdout, r.stdout
    row = [line for line in r.stdout.splitlines() if line.startswith("| 0.00 GB")]
    assert len(row) == 1, r.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[6]) > 0 and 0 <= float(cells[7]) <= 1, row  # misses/token, recall
    none = subprocess.run([sys.executable, str(script), str(path), "-n", "0", "-c", "64"],
                          capture_output=True, text=True, timeout=300)
    assert none.returncode == 2 and "no decode step" in none.stderr, none.stderr
    assert "Traceback" not in none.stderr


def _wrong_and_slow_read_ahead(monkeypatch):
    """The read-ahead guesses the least likely experts (the residual negated), and its first slab
    is read only once fetch has stopped it: fetch stops it mid-expert, mostly one not picked."""
    import threading
    stopped = threading.Event()
    real_prefetch, real_settle = ex.ExpertStore.prefetch, ex.ExpertStore._settle
    real_read = ex.ExpertStore._read_run

    def prefetch(self, layer, xa):
        stopped.clear()
        real_prefetch(self, layer, -xa)
        # the read-ahead has begun its first expert before fetch can stop it (on a busy machine
        # its thread could otherwise be stopped before it began, and leave nothing half read)
        job, deadline = self._job, time.monotonic() + 5
        while job is not None and job.inflight is None and not job.done and \
                time.monotonic() < deadline:
            time.sleep(0.0002)

    def settle(self, layer, need):
        try:
            return real_settle(self, layer, need)
        finally:
            stopped.set()

    def slow(self, s, run, stage, headers):
        ahead = getattr(self, "_stage2", None)  # made once the read-ahead is enabled
        if ahead is not None and stage == ahead.base:
            stopped.wait(5)
        return real_read(self, s, run, stage, headers)
    monkeypatch.setattr(ex.ExpertStore, "prefetch", prefetch)
    monkeypatch.setattr(ex.ExpertStore, "_settle", settle)
    monkeypatch.setattr(ex.ExpertStore, "_read_run", slow)


def _run_checking_cache(path, want):
    """The run of _run without repacking, then: every expert the cache counts holds its file's
    bytes in each of its slabs. Returns the store, the
    experts counted that do not, whether the logits are want's."""
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 expert_prefetch=True, repack=False) as m:
        out = [m.logits(PROMPT)]
        for t in DECODE:
            out.append(m.evaluate([t], len(m.cache.tokens[0])))
        st = m._experts
        st._bg.wait()
        st._drop_abandoned()  # as the next fetch would
        same = np.array_equal(np.concatenate(out), want)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        wrong = [(l, e) for (l, e) in st._resident for s in st._slabs[l]
                 if not np.array_equal(
                     np.frombuffer(ex.ggml_ops.memview(s.home + e * s.nb2, s.nb2), np.uint8),
                     raw[s.offset + e * s.nb2:s.offset + (e + 1) * s.nb2])]
        return st, wrong, same


def test_a_read_ahead_stopped_mid_expert_leaves_it(resident, monkeypatch):
    """Stopped while reading an expert fetch did not pick, the read-ahead leaves it after the
    slab in flight (rather than hold the disk from fetch's misses) and the next fetch evicts it:
    the run is exact and every expert the cache counts holds its file's bytes. Broken on purpose
    (what it left is never evicted), a half-read expert stays counted as cached."""
    path, _ = resident
    want = _run(path, repack=False, experts="whole")[0]
    _wrong_and_slow_read_ahead(monkeypatch)
    st, wrong, same = _run_checking_cache(path, want)
    assert same and st.abandoned > 0 and wrong == []
    assert st.used_bytes == sum(st.unit_bytes[l] for (l, _) in st._resident)
    monkeypatch.setattr(ex.ExpertStore, "_drop_abandoned", lambda self, wanted=None: None)
    # what it left shows at the end only if the cache did not evict it since (its LRU may): a
    # run of 6 steps at the floor evicts every step, so up to five runs to see one
    for _ in range(5):
        st, wrong, same = _run_checking_cache(path, want)
        if wrong:
            break
    assert st.abandoned > 0 and wrong  # (the logits may change too: a later pick of it)


def test_a_failed_read_ahead_is_reported_and_forgotten(resident, monkeypatch):
    """A read-ahead that fails raises a StreamError at the next fetch, and what it was reading is
    not kept as cached: the step run again reads those experts and is exact."""
    path, want = resident
    real, calls = ex.ExpertStore._read_run, []

    def failing(self, s, run, stage, headers):
        if stage == self._stage2.base and not calls:  # the read-ahead's
            calls.append((next(l for l, ss in self._slabs.items() if s in ss), list(run)))
            raise OSError("disk gone")
        return real(self, s, run, stage, headers)
    monkeypatch.setattr(ex.ExpertStore, "_read_run", failing)
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 expert_prefetch=True) as m:
        m.logits(PROMPT)
        step = 0
        with pytest.raises(ex.StreamError, match="expert read-ahead failed: OSError: disk gone"):
            for step, t in enumerate(DECODE):
                m.evaluate([t], len(m.cache.tokens[0]))
        layer, lost = calls[0]
        assert lost and not any((layer, e) in m._experts._resident for e in lost)
        for j in range(step, len(DECODE)):  # the failed step again, and on
            got = m.evaluate([DECODE[j]], len(m.cache.tokens[0]))
            assert np.array_equal(got[0], want[len(PROMPT) + j])


def test_two_loaders_share_a_steps_misses(resident, monkeypatch):
    """fetch's misses are read by two loaders at once, each through its half of the stage (one
    reads while the other converts); at the cache's floor both take part and the run is exact."""
    path, want = resident
    real, seen = ex.ExpertStore._read_run, set()

    def watched(self, s, run, stage, headers):
        seen.add((stage - self._stage.base) // self._half)  # no read-ahead: fetch's loads only
        return real(self, s, run, stage, headers)
    monkeypatch.setattr(ex.ExpertStore, "_read_run", watched)
    got, stats, _ = _run(path, expert_cache=0)
    assert np.array_equal(got, want)
    assert {0, 1} <= seen and stats["misses"] > 0


def test_a_failed_loader_is_reported_and_its_experts_not_cached(resident, monkeypatch):
    """The second loader's read fails: fetch raises a StreamError once both loaders ended, none of
    the step's misses counts as cached, and the step run again is exact."""
    path, want = resident
    real, calls = ex.ExpertStore._read_run, []

    def failing(self, s, run, stage, headers):
        if stage == self._stage.base + self._half and not calls:
            calls.append(next(l for l, ss in self._slabs.items() if s in ss))
            raise OSError("disk gone")
        return real(self, s, run, stage, headers)
    monkeypatch.setattr(ex.ExpertStore, "_read_run", failing)
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 expert_prefetch=False) as m:
        st = m._experts
        with pytest.raises(ex.StreamError, match="expert loads failed: OSError: disk gone"):
            m.logits(PROMPT)
        assert st.resident(calls[0]) == []  # a cold cache: the failed step's misses only
        assert st.used_bytes == sum(st.unit_bytes[l] for (l, _) in st._resident)
        assert np.array_equal(m.logits(PROMPT), want[:len(PROMPT)])


def test_a_steps_misses_are_read_while_its_experts_compute(resident, monkeypatch):
    """A step with misses reads them tensor by tensor (up, gate, down) while graph B runs in three
    parts: here the gate and down slabs are not read until the engine asks for the gate's, which
    it does only after computing the up product, so reading every miss before computing (fetch)
    would wait here for ever (10 s, then fail). The logits are exact."""
    import threading
    path, want = resident
    real_read, real_wait = ex.ExpertStore._read_run, ex.ExpertStore.wait
    asked, log = threading.Event(), []

    def read(self, s, run, stage, headers):
        if s.kind != "ffn_up_exps" and not asked.wait(10):
            raise AssertionError(f"{s.kind} read before the gate part asked for it")
        log.append(s.kind)
        return real_read(self, s, run, stage, headers)

    def wait(self, kind):
        if kind == "ffn_gate_exps":
            log.append("gate part")
            asked.set()
        real_wait(self, kind)
        if kind == "ffn_down_exps":
            asked.clear()  # the next step's gate and down reads wait again
    monkeypatch.setattr(ex.ExpertStore, "_read_run", read)
    monkeypatch.setattr(ex.ExpertStore, "wait", wait)
    got, stats, _ = _run(path, expert_cache=0)
    assert np.array_equal(got, want)
    assert stats["misses"] > 0 and log.count("gate part") > 0
    first = log.index("gate part")
    assert set(log[:first]) == {"ffn_up_exps"}  # only up slabs before the first gate part
    assert log[first + 1:].count("ffn_gate_exps") > 0


def test_a_step_failing_between_its_parts_leaves_no_loader_behind(resident, monkeypatch):
    """An error between begin and finish (here the wait for the gate slabs): the loaders stop and
    are joined before the error leaves the step, the misses are not counted as cached, and the
    step run again is exact."""
    path, want = resident
    real_wait, failed = ex.ExpertStore.wait, []

    def wait(self, kind):
        if kind == "ffn_gate_exps" and not failed:
            failed.append(self._loads.layer)
            raise RuntimeError("interrupted")
        real_wait(self, kind)
    monkeypatch.setattr(ex.ExpertStore, "wait", wait)
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 expert_prefetch=False) as m:
        st = m._experts
        with pytest.raises(RuntimeError, match="interrupted"):
            m.logits(PROMPT)
        assert st._loads is None
        assert st.resident(failed[0]) == []
        assert st.used_bytes == sum(st.unit_bytes[l] for (l, _) in st._resident)
        assert np.array_equal(m.logits(PROMPT), want[:len(PROMPT)])


def test_the_plan_charges_k_of_e_expert_bytes(resident, home):
    """The planner's MoE cost: a decode token computes K/E of the expert bytes and reads the
    expected misses: capacity / expert bytes hit without counts, a replay of the picks an earlier
    run recorded with them; the plan's prediction includes both."""
    from flexinfer.gguf_file import read_gguf
    from flexinfer.config import ModelConfig
    from flexinfer.models import specs_for
    from flexinfer.planner import MISS_LATENCY, MOE_LAYER_S, with_experts
    path, _ = resident
    g = read_gguf(path)
    cfg = ModelConfig.from_gguf(g)
    names = ex.expert_names(specs_for(g, cfg))
    total = sum(g.tensors[n].nbytes for n in names)
    floor = ex.min_capacity(g, names)
    cost = ex.expert_cost(g, cfg, names, floor, True, ex.counts_path(g))
    assert cost.active_bytes == total * cfg.n_expert_used // cfg.n_expert
    assert cost.miss_rate == pytest.approx(1 - floor / total)
    _run(path, expert_cache=0)  # writes counts and the picks' trace: the estimate replays it
    trace = json.loads(ex.counts_path(g).read_text())["trace"]
    assert trace and all(0 <= l < cfg.n_layer for l, *_ in trace)
    warm = ex.expert_cost(g, cfg, names, floor, True, ex.counts_path(g))
    unit = {l: b // cfg.n_expert for l, b in ex.layer_expert_bytes(g, names).items()}
    counts = np.asarray(json.loads(ex.counts_path(g).read_text())["counts"])
    rates = []
    for part in ex.PIN_SHARES:  # warm() pins the most counted: the replay's LRU holds the rest
        pins = ex._pins(counts, unit, floor, part)
        prior = ex.router_prior(g, names, cfg.n_expert_used)
        share = sum(prior[l, e] for l, e in pins) / len(unit)  # the router's own preference
        lru = floor - sum(unit[l] for l, _ in pins)
        assert 0 <= share < 1 and (share > 0) == (part > 0)
        rates.append(share + (1 - share) * ex.replayed_hit_rate(trace, unit, int(lru / (1 - share)),
                                                                 cfg.n_expert_used))
    assert warm.miss_rate == pytest.approx(1 - max(rates))
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 experts="auto") as m:
        p = m.plan
    mach = fm.make_plan(g, cfg, specs_for(g, cfg), fm.Options(expert_cache=0), 64, 2).machine
    base = dataclasses.replace(p, t_cpu=0.0, t_io=0.0, predicted_s=0.0, stages=())
    got = with_experts(base, warm, mach)
    assert got.expert_hit_rate == pytest.approx(1 - warm.miss_rate)
    assert got.expert_pin_share == warm.pin_share == ex.pin_share(
        g, names, floor, ex.counts_path(g), cfg.n_expert_used)
    # two loaders convert while they read: only the compute and the reads count
    assert not warm.converted and m._experts._loaders.n == 1
    assert warm.layers == cfg.n_layer
    assert got.t_cpu == pytest.approx(warm.active_bytes / mach.compute_bw + warm.layers * MOE_LAYER_S)
    layers = cfg.n_layer * (1 - (1 - warm.miss_rate) ** cfg.n_expert_used)
    assert got.t_io == pytest.approx(warm.missed_bytes / mach.disk_bw + layers * MISS_LATENCY)
    # a layer with misses computes its up and gate products while the next tensor is read: two
    # thirds of the shorter of its compute and its reads are not waited for
    assert warm.overlapped and warm.layers == cfg.n_layer
    hidden = layers * 2 / 3 * min(got.t_cpu / cfg.n_layer, warm.missed_bytes / mach.disk_bw / layers)
    assert hidden > 0
    assert got.predicted_s == pytest.approx(got.t_cpu + got.t_io - hidden)
    serial = dataclasses.replace(warm, overlapped=False)  # the read-ahead's steps, gpt-oss
    assert with_experts(base, serial, mach).predicted_s == pytest.approx(got.t_cpu + got.t_io)
    assert not ex.expert_cost(g, cfg, names, floor, True, ex.counts_path(g),
                              read_ahead=True).overlapped
    one = dataclasses.replace(warm, converted=True)  # one loader: converting waits too
    assert with_experts(base, one, mach).t_cpu == pytest.approx(
        got.t_cpu + warm.missed_bytes / mach.repack_bw)
    # under a blkio cap the disk refunds its pauses between layers' misses (the compute no read
    # overlaps, the dense part's and the miss latency included): each layer's reads run faster,
    # down to CREDIT_FLOOR of their time; the bound and t_io are the disk's as before
    from flexinfer.planner import CAP_PAUSE_CREDIT_S, CREDIT_FLOOR
    assert mach.pause_credit_s == 0  # no cap in the tests' environment
    dense = dataclasses.replace(base, t_cpu=0.01, predicted_s=0.01)
    for disk in (mach.disk_bw, mach.disk_bw / 1000):  # pauses short or long against the reads
        real = dataclasses.replace(mach, disk_bw=disk)
        capped = dataclasses.replace(real, pause_credit_s=CAP_PAUSE_CREDIT_S)
        off_cap, on_cap = with_experts(dense, warm, real), with_experts(dense, warm, capped)
        io = warm.missed_bytes / disk / layers  # a layer's reads
        hid = layers * 2 / 3 * min(got.t_cpu / cfg.n_layer, io)
        gap = (0.01 + got.t_cpu - hid + layers * MISS_LATENCY) / layers  # the disk's pause
        refund = layers * min(gap, (1 - CREDIT_FLOOR) * io)
        assert refund > 0
        assert on_cap.predicted_s == pytest.approx(off_cap.predicted_s - refund)
        assert (on_cap.t_io, on_cap.t_io_bound, on_cap.bound_tok_s) == \
            (off_cap.t_io, off_cap.t_io_bound, off_cap.bound_tok_s)
        # a dense part that streams keeps the disk busy in those pauses: only the experts' count
        streaming = dataclasses.replace(dense, t_io=0.5, predicted_s=0.51)
        gap -= 0.01 / layers
        assert with_experts(streaming, warm, capped).predicted_s == pytest.approx(
            with_experts(streaming, warm, real).predicted_s -
            layers * min(gap, (1 - CREDIT_FLOOR) * io))
        # pauses longer than the credit are not refunded (a new throttle slice)
        slow = dataclasses.replace(dense, t_cpu=layers * CAP_PAUSE_CREDIT_S * 2, predicted_s=1.0)
        assert with_experts(slow, warm, capped).predicted_s == pytest.approx(
            with_experts(slow, warm, real).predicted_s)
    # with the misses' rate measured as they are read (Machine.expert_bw: a few slabs after a
    # pause, which a cap lets through at the disk's own speed) they read at it and nothing is
    # refunded, but a token reads no faster than disk_bw on average; the bound stays the disk's
    capped = dataclasses.replace(mach, pause_credit_s=CAP_PAUSE_CREDIT_S)
    fast = dataclasses.replace(capped, expert_bw=mach.disk_bw * 2)
    on_fast = with_experts(dense, warm, fast)
    io = warm.missed_bytes / fast.expert_bw / layers
    hid = layers * 2 / 3 * min(got.t_cpu / cfg.n_layer, io)
    assert on_fast.t_io == pytest.approx(warm.missed_bytes / fast.expert_bw + layers * MISS_LATENCY)
    assert on_fast.predicted_s == pytest.approx(0.01 + got.t_cpu + on_fast.t_io - hid)
    # the cap's refund is not taken on top: at expert_bw = disk_bw, the uncapped disk's plan
    assert with_experts(dense, warm, dataclasses.replace(capped, expert_bw=mach.disk_bw)
                        ).predicted_s == pytest.approx(with_experts(dense, warm, mach).predicted_s)
    assert with_experts(dense, warm, capped).predicted_s < with_experts(dense, warm,
                                                                        mach).predicted_s
    assert (on_fast.t_io_bound, on_fast.bound_tok_s) == (got.t_io_bound, got.bound_tok_s)
    # a cap slower than what the token computes: the token waits for the cap's rate
    slow_cap = dataclasses.replace(fast, disk_bw=warm.missed_bytes / 1.0)  # 1 s of misses
    assert with_experts(dense, warm, slow_cap).predicted_s == pytest.approx(1.0)


def _one_layer(tmp_path, counts, capacity, trace, share=None):
    """The hit rate expected of one layer of eight one-byte experts, K=2, with these counts and
    trace (a model without routers: every expert alike to them): with `share` of the capacity
    pinned, or the share pin_share chooses (and the share itself)."""
    from types import SimpleNamespace
    t = SimpleNamespace(nbytes=8, shape=(1, 1, 8), type=0)
    g = SimpleNamespace(tensors={"blk.0.ffn_up_exps.weight": t}, path=str(tmp_path / "m.gguf"),
                        file_size=1)
    f = tmp_path / "counts.json"
    f.write_text(json.dumps({"counts": [counts], "trace": trace}))
    names = ["blk.0.ffn_up_exps.weight"]
    if share is None:
        return (ex.expected_hit_rate(g, names, capacity, f, 2),
                ex.pin_share(g, names, capacity, f, 2))
    return ex._hit_rates(g, names, capacity, f, 2, shares=(share,))[0]


ALTERNATE = [[0, 0, 1], [0, 2, 3], [0, 0, 1], [0, 2, 3], [0, 0, 1], [0, 2, 3]]
OWN = [3, 3, 3, 3, 0, 0, 0, 0]


def test_the_pins_hold_the_routers_share_and_leave_the_lru_their_room(tmp_path, monkeypatch):
    """Tokens alternate {0,1} and {2,3}. The pins (the most counted, up to a share of the
    capacity) hold what the router prefers whatever the text (alike for every expert without
    routers: 2 of 8 pinned hold 2/8), not the trace's share of them; the rest of the picks go to
    an LRU of the rest of the capacity, replayed over the trace with its room scaled by the share
    it serves."""
    assert ex.replayed_hit_rate(ALTERNATE, {0: 1}, 4, 2) == pytest.approx(4 / 6)
    # capacity 4, half pinned: 0 and 1 hold 2/8; the LRU's 2 bytes serve 6/8 of the picks, as
    # 2.67 would serve them all: {0,1} then {2,3} evict each other, no hit (the trace's own 3/6
    # on the pins would have promised 50% and more)
    assert _one_layer(tmp_path, OWN, 4, ALTERNATE, 0.5) == pytest.approx(2 / 8)
    # counts choose which experts are pinned, not how much they hold
    assert _one_layer(tmp_path, [0, 0, 0, 0, 0, 0, 5, 5], 4, ALTERNATE, 0.5) == \
        pytest.approx(2 / 8)
    # capacity 6: 3 pinned hold 3/8; 3 bytes of LRU serving 5/8 replay as 4: from the third step
    # on every step hits (4 of 6)
    assert _one_layer(tmp_path, OWN, 6, ALTERNATE, 0.5) == pytest.approx(3 / 8 + 5 / 8 * 4 / 6)
    # a router that prefers 0 and 1 (80% of its picks): the pins hold 0.8, the LRU's 2 bytes
    # serve a fifth of the picks as 10 would serve them all (every step from the third: 4 of 6)
    monkeypatch.setattr(ex, "router_prior", lambda g, names, k: np.array(
        [[0.4, 0.4] + [0.2 / 6] * 6]))
    assert _one_layer(tmp_path, OWN, 4, ALTERNATE, 0.5) == pytest.approx(0.8 + 0.2 * 4 / 6)


def test_the_pins_are_as_many_as_hit_most(tmp_path):
    """pin_share takes the share of the capacity to pin whose expected hit rate is highest. Two
    tokens alternating fit an LRU of the whole capacity (4): no pins, 4 of 6 hit (half of it
    pinned: 2/8). Three tokens in turn do not: an LRU of 4 holds none of a cycle of 6 picks, and
    half of the capacity pinned to 0 and 1 holds 2/8."""
    assert _one_layer(tmp_path, OWN, 4, ALTERNATE) == (pytest.approx(4 / 6), 0.0)
    cycle = [[0, 0, 1], [0, 2, 3], [0, 4, 5]] * 3
    assert _one_layer(tmp_path, [3, 3, 1, 1, 1, 1, 0, 0], 4, cycle, 0.0) == 0.0
    assert _one_layer(tmp_path, [3, 3, 1, 1, 1, 1, 0, 0], 4, cycle) == (pytest.approx(2 / 8), 0.5)


def test_pins_are_taken_only_when_they_clearly_beat_none(tmp_path, monkeypatch):
    """An LRU of the capacity holds the alternating tokens (4 of 6 hit). One expert pinned (a
    quarter of a capacity of 6) keeps the LRU's rate, so it cuts the expected misses by the share
    of the picks the router gives it. A tenth: more hits expected, but within what the estimate
    (another text's picks replayed) can be off by, so no pins (PIN_MARGIN). Three tenths: pinned."""
    monkeypatch.setattr(ex, "PIN_SHARES", (0.0, 0.25))
    for p0, share, rate in ((0.1, 0.0, 4 / 6), (0.3, 0.25, 0.3 + 0.7 * 4 / 6)):
        monkeypatch.setattr(ex, "router_prior", lambda g, names, k, p0=p0: np.array(
            [[p0] + [(1 - p0) / 7] * 7]))
        pinned = _one_layer(tmp_path, OWN, 6, ALTERNATE, 0.25)
        assert pinned == pytest.approx(p0 + (1 - p0) * 4 / 6) and pinned > 4 / 6  # more hits
        assert _one_layer(tmp_path, OWN, 6, ALTERNATE) == (pytest.approx(rate), share)


# two layers, K=1: three tokens pick expert 0 at both layers, then three pick 1
TWO_TEXTS = [[l, e] for e in (0, 1) for _ in range(3) for l in (0, 1)]


def test_the_replay_decodes_several_sequences_in_lockstep():
    """n_seq sequences: the trace's tokens cut into n_seq stretches decoded together, each step
    the union of their picks. One sequence in a cache of 2: a miss at each layer when the text
    turns, 8 of 12 hit. Two: every step picks 0 and 1 at its layer and evicts the other layer's,
    none hits; a cache of 4 holds them after the first step (8 of 12)."""
    unit = {0: 1, 1: 1}
    assert ex.replayed_hit_rate(TWO_TEXTS, unit, 2, 1) == pytest.approx(8 / 12)
    steps, decode = ex.lockstep(TWO_TEXTS, 1, 2)
    assert steps == [[0, 0, 1], [1, 0, 1]] * 3 and all(decode)
    assert ex.replayed_hit_rate(TWO_TEXTS, unit, 2, 1, n_seq=2) == 0.0
    assert ex.replayed_hit_rate(TWO_TEXTS, unit, 4, 1, n_seq=2) == pytest.approx(8 / 12)
    # a prompt step (more than K picks) stays first and is not counted
    steps, decode = ex.lockstep([[0, 0, 1, 2]] + TWO_TEXTS, 1, 2)
    assert steps[0] == [0, 0, 1, 2] and decode == [False] + [True] * 6


def test_the_pins_are_chosen_for_the_sequences_that_decode_together(tmp_path, monkeypatch):
    """A cache of 2 one-byte experts over two layers, routers that give expert 0 half of their
    picks: one sequence's LRU of the whole cache holds a token's two picks (no pins, 8 of 12);
    two sequences' steps pick two at each layer and evict each other's, so half of the cache
    pinned (expert 0 of layer 0: half of layer 0's picks, a quarter of all) is better than
    nothing."""
    from types import SimpleNamespace
    monkeypatch.setattr(ex, "router_prior", lambda g, names, k: np.array(
        [[0.5] + [0.5 / 7] * 7] * 2))
    t = SimpleNamespace(nbytes=8, shape=(1, 1, 8), type=0)
    names = ["blk.0.ffn_up_exps.weight", "blk.1.ffn_up_exps.weight"]
    g = SimpleNamespace(tensors={n: t for n in names}, path=str(tmp_path / "m.gguf"),
                        file_size=1)
    f = tmp_path / "counts.json"
    f.write_text(json.dumps({"counts": [[3, 3] + [0] * 6] * 2, "trace": TWO_TEXTS}))
    assert ex.pin_share(g, names, 2, f, 1) == 0.0
    assert ex.expected_hit_rate(g, names, 2, f, 1) == pytest.approx(8 / 12)
    assert ex.pin_share(g, names, 2, f, 1, n_seq=2) == 0.5
    assert ex.expected_hit_rate(g, names, 2, f, 1, n_seq=2) == pytest.approx(1 / 4)


def test_the_store_chooses_its_pins_for_the_parallel_sequences(resident):
    path, _ = resident
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 n_seq=2) as m:
        assert m._experts.n_seq == 2


def test_the_router_prior_is_its_preference_for_any_text(tmp_path):
    """A zipf:1 router's prior puts most of its picks on a few experts, a uniform one's near
    1/E each (the picks of random inputs, as tests/test_moe.py measures them apart); rows sum to
    one; computed once per file."""
    from flexinfer.bench.synth import SynthSpec, write_synthetic
    from flexinfer.gguf_file import read_gguf
    base = SynthSpec("qwen3moe", n_layer=2, n_embd=64, n_ff=64, n_head=2, n_head_kv=1,
                     n_expert=32, n_expert_used=4, n_ff_exp=32, seed=5)
    top8 = {}
    for router in ("uniform", "zipf:1"):
        path = write_synthetic(tmp_path / f"{router.replace(':', '')}.gguf",
                               dataclasses.replace(base, router=router))
        g = read_gguf(path)
        names = ex.expert_names([type("S", (), {"name": n, "shape": t.shape})
                                 for n, t in g.tensors.items()])
        prior = ex.router_prior(g, names, 4)
        assert prior.shape == (2, 32) and np.allclose(prior.sum(axis=1), 1.0)
        assert ex.router_prior(g, names, 4) is prior
        top8[router] = np.sort(prior, axis=1)[:, -8:].sum(axis=1).min()
    # 8 of 32: 25% if even
    assert top8["uniform"] < 0.4 and top8["zipf:1"] > 0.6, top8


@pytest.mark.parametrize("trace", [[[0, 99]], [[-1, 2]], [[0, -3]]])
def test_a_damaged_trace_is_ignored(tmp_path, trace):
    """A counts file whose trace names an expert or layer the model cannot have: the estimate
    falls back to the counts alone, as with no trace (an expert past E raised IndexError)."""
    from types import SimpleNamespace
    t = SimpleNamespace(nbytes=8, shape=(1, 1, 8), type=0)
    g = SimpleNamespace(tensors={"blk.0.ffn_up_exps.weight": t}, path="m.gguf", file_size=1)
    f = tmp_path / "counts.json"
    f.write_text(json.dumps({"counts": [[1] * 8]}))
    alone = ex.expected_hit_rate(g, ["blk.0.ffn_up_exps.weight"], 4, f, 2)
    f.write_text(json.dumps({"counts": [[1] * 8], "trace": trace}))
    assert ex.expected_hit_rate(g, ["blk.0.ffn_up_exps.weight"], 4, f, 2) == alone


def test_the_replay_is_a_least_recently_used_cache():
    """Two one-byte experts fit: 1 misses, 2 misses, 1 hits, 3 misses and evicts 2 (the least
    recently used; evicting the most recent, 1, would miss the last step), 1 hits: 2 of 5. A
    prompt step (more than K picks) fills the cache but is not counted: after one picking 1 and
    2, the four single steps hit 3 times."""
    trace = [[0, 1], [0, 2], [0, 1], [0, 3], [0, 1]]
    assert ex.replayed_hit_rate(trace, {0: 1}, 2, 1) == pytest.approx(2 / 5)
    assert ex.replayed_hit_rate([[0, 1, 2]] + trace[1:], {0: 1}, 2, 1) == pytest.approx(3 / 4)
    assert ex.replayed_hit_rate([[0, 1, 2]], {0: 1}, 2, 1) is None
    assert ex.replayed_hit_rate([[5, 1]], {0: 1}, 2, 1) is None  # another model's trace


def test_a_budget_change_resizes_the_expert_cache(resident):
    """set_memory_budget re-plans: the cache takes the new plan's expert_cache_bytes, evicting
    down to it at once (pages given back), and the logits do not change."""
    path, want = resident
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET) as m:
        st = m._experts
        full = m.logits(PROMPT)
        assert st.capacity == st.total_bytes == st.used_bytes  # everything cached
        change = m.set_memory_budget(m.minimum_budget())
        assert m.plan.expert_cache_bytes < st.total_bytes
        assert st.capacity == max(m.plan.expert_cache_bytes, st._floor)
        assert st.used_bytes <= st.capacity and change.released_bytes >= st.total_bytes - \
            st.used_bytes
        assert np.array_equal(m.logits(PROMPT), full)
        assert np.array_equal(full, want[:len(PROMPT)])


def test_a_budget_change_chooses_the_pins_again(resident, monkeypatch):
    """A cache shrunk by a budget change pins what warm() would pin at its new capacity (of what
    it holds: no read), the rest least recently used and evicted first; grown again with no pins
    chosen, it unpins them all. The logits do not change."""
    path, want = resident
    _run(path, expert_cache=0)  # counts for the pins
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET) as m:
        st = m._experts
        full = m.logits(PROMPT)
        assert st._pinned == st._resident  # the cache holds every expert: all pinned
        held = set(st._resident)
        monkeypatch.setattr(ex, "PIN_SHARES", (0.5,))
        m.set_memory_budget(m.minimum_budget())
        assert st.capacity < st.total_bytes and st.pin_share == 0.5
        pins = ex._pins(st._saved + st.counts, st.unit_bytes, st.capacity, 0.5) & held
        assert pins and st._pinned == pins and pins <= st._resident
        assert set(st._order).isdisjoint(pins) and set(st._pinned_order) == pins
        assert np.array_equal(m.logits(PROMPT), full)
        monkeypatch.setattr(ex, "PIN_SHARES", (0.0,))
        m.set_memory_budget(m.minimum_budget() + 1)
        assert st.pin_share == 0.0 and not st._pinned and not st._pinned_order
        assert set(st._order) == st._resident
        assert np.array_equal(m.logits(PROMPT), want[:len(PROMPT)])


def test_the_moe_bench_table():
    """scripts/bench_moe.py's bound and table from rows as its points write them."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_moe", Path(__file__).parent.parent / "scripts" / "bench_moe.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    r = {"compute_s_per_token": 0.5, "experts": {"decode_expert_bytes_per_token": 10**9}}
    assert b.moe_bound(r, 0.5e9) == pytest.approx(0.5)  # I/O bound: 2 s a token
    assert b.moe_bound(r, 4e9, t_cpu=None) == pytest.approx(2.0)  # compute bound
    assert b.moe_bound({"compute_s_per_token": 0.5}, 1e9) is None  # no expert cache: no bound
    rows = [{"model": "m", "mode": "flexinfer", "budget_bytes": 2 * 10**9, "status": "ok",
             "cgroup_peak_bytes": 1.9e9, "decode_tokens_per_s": 0.4,
             "moe_bound_tokens_per_s": 0.5, "predicted_tokens_per_s": 0.44, "hit_rate": 0.3,
             "moe_bound_expert_reads_tokens_per_s": 0.42, "cached_rate": 0.25,
             "expert_bytes_per_token": 7e8, "pin_share": 0.25},
            {"model": "m", "mode": "llama.cpp-mmap", "budget_bytes": 2 * 10**9, "status": "oom",
             "cgroup_peak_bytes": 2e9, "decode_tokens_per_s": 0.1}]
    lines = b.table(rows).splitlines()
    assert lines[2] == ("| m | 2.0 GB | flexinfer | 0.400 | 0.500 | 80% | 0.420 | 95% | 4.00x | "
                        "0.440 (+10%) | 0.30 (0.25) | 0.25 | 0.700 | 1.90 |")
    assert lines[3].startswith("| m | 2.0 GB | llama.cpp-mmap (oom) | 0.100 |")
    # --repeats: the median run's row (its own bound and plan) with the range of the runs
    runs = [{**rows[0], "decode_tokens_per_s": t, "moe_bound_tokens_per_s": 2 * (t or 0), "run": i}
            for i, t in enumerate((0.5, 0.3, None, 0.4))]
    runs[2]["status"] = "timeout"
    lines = b.table(runs + rows[1:]).splitlines()
    assert len(lines) == 4 and lines[2].startswith(
        "| m | 2.0 GB | flexinfer | 0.400 (0.300-0.500, 3 runs) | 0.800 | 50% |")
    assert "0.440 (+10%)" in lines[2] and "4.00x" in lines[2]
    failed = [{**rows[0], "decode_tokens_per_s": None, "status": "oom"}] * 2
    assert b.table(failed).splitlines()[2].startswith("| m | 2.0 GB | flexinfer (oom) |  |")


def _offline_moe_bench(tmp_path, monkeypatch):
    """scripts/bench_moe.py with its points and measurements faked: (module, model path, the
    points run as (GB, mode), the calibrations recorded). Point n decodes at n tok/s."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_moe", Path(__file__).parent.parent / "scripts" / "bench_moe.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    ran, recorded = [], []

    def point(a, m, mode, budget, bw, home, ebw=None):
        ran.append((budget // 10**9, mode))
        return {"model": "m.gguf", "mode": mode, "budget_bytes": budget, "status": "ok",
                "cgroup_peak_bytes": budget, "decode_tokens_per_s": float(len(ran))}

    monkeypatch.setattr(b, "run_point", point)
    monkeypatch.setattr(b, "cgroup_unavailable_reason", lambda: None)
    monkeypatch.setattr(b, "calibrate_compute", lambda *a: 1e9)
    monkeypatch.setattr(b, "read_gguf", lambda path: None)
    monkeypatch.setattr(b, "measure_disk_capped", lambda *a: type("D", (), {"bytes_per_s": 1e9}))
    monkeypatch.setattr(b, "measure_expert_reads_capped", lambda *a: 1e9)
    monkeypatch.setattr(b, "expert_piece", lambda m: 1)
    monkeypatch.setattr(b, "machine_info", dict)
    monkeypatch.setattr(b, "record_calibration", lambda *a, **k: recorded.append((a, k)))
    monkeypatch.setenv("FLEXINFER_HOME", str(tmp_path / "home"))
    return b, model, ran, recorded


def test_the_moe_bench_runs_every_point_before_repeating_one(tmp_path, monkeypatch):
    """scripts/bench_moe.py --repeats: every point once (llama.cpp too), then the flexinfer
    points again, so a point's runs are minutes apart; the table has one row a point."""
    b, model, ran, recorded = _offline_moe_bench(tmp_path, monkeypatch)
    assert b.main([str(model), "--budgets", "2G,4G", "--cold", "--repeats", "3",
                   "--out", str(tmp_path / "out")]) == 0
    # the plans' disk is the bench's own measurement, the one the bound divides by
    assert recorded == [((str(model), 2, 1e9, None), {"disk_rate": None, "expert_bw": 1e9})]
    assert ran == [(2, "flexinfer"), (2, "llama.cpp-mmap"), (4, "flexinfer"),
                   (4, "llama.cpp-mmap"), (2, "flexinfer"), (4, "flexinfer"), (2, "flexinfer"),
                   (4, "flexinfer")]
    lines = (tmp_path / "out" / "table.md").read_text().splitlines()
    assert len(lines) == 6 and "| 5.000 (1.000-7.000, 3 runs) |" in lines[2]


def test_the_moe_bench_runs_llama_cpp_only_at_the_peer_budgets(tmp_path, monkeypatch, capsys):
    """scripts/bench_moe.py --peer-budgets: llama.cpp runs at those budgets alone (flexinfer at
    all); a peer budget that is not one of --budgets is refused in one line."""
    b, model, ran, _ = _offline_moe_bench(tmp_path, monkeypatch)
    assert b.main([str(model), "--budgets", "2G,4G,8G", "--peer-budgets", "4G", "--cold",
                   "--out", str(tmp_path / "out")]) == 0
    assert ran == [(2, "flexinfer"), (4, "flexinfer"), (4, "llama.cpp-mmap"), (8, "flexinfer")]
    capsys.readouterr()
    ran.clear()
    assert b.main([str(model), "--budgets", "2G,4G", "--peer-budgets", "3G",
                   "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--peer-budgets 3G" in err and ran == []


def test_the_moe_bench_prompt_reaches_both_engines_not_the_warm_up():
    """scripts/bench_moe.py: the points of both engines decode after POINT_PROMPT, or --prompt, or
    'the' --prompt-tokens times; the warm-up keeps its own prompt (given as a.prompt)."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "bench_moe", Path(__file__).parent.parent / "scripts" / "bench_moe.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    text = "The weather was mild for the season"

    def prompts(**kw):
        a = b.argparse.Namespace(**{"prompt": None, "prompt_tokens": None, "tokens": 8,
                                    "threads": 2, "ctx": 64, "temp": 1.0, "seed": 1,
                                    "peer_tokens": None, **kw})
        got = {argv[argv.index("-p") + 1] for argv in
               (b.flexinfer_argv(a, "m.gguf", 10**9), b.peer_argv(a, "m.gguf"))}
        assert len(got) == 1  # both engines alike
        return got.pop()

    assert prompts() == b.POINT_PROMPT != b.WARMUP_PROMPT
    assert prompts(prompt=text) == text
    assert prompts(prompt_tokens=4) == "the the the the"
    assert prompts(prompt=b.WARMUP_PROMPT, prompt_tokens=4) == b.WARMUP_PROMPT  # the warm-up


def test_eviction_takes_the_least_recently_used_and_pinned_last(resident):
    """The cache evicts the least recently used expert first, never one the step needs, and
    pinned experts (the saved counts' most used) only when no other is left."""
    path, _ = resident
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0,
                 expert_prefetch=False) as m:
        st, unit = m._experts, m._experts.unit_bytes[0]
        st.set_capacity(st._floor)  # one layer's experts: room for all of layer 0's
        st._make_room(set(), st.capacity)  # start empty
        assert st.used_bytes == 0
        for e in range(m.cfg.n_expert):  # 0 used first, the last used most recently
            st.fetch(0, np.array([e]))
        st.fetch(0, np.array([0]))  # 0 is the most recent now; 1 the least
        st.fetch(1, np.array([2]))  # full: one of layer 0's goes, the least recently used
        assert 1 not in st.resident(0) and 0 in st.resident(0) and st.resident(1) == [2]
        st._pinned.add((0, 2))  # 2 is pinned: passed over though it is now the oldest
        st._order.pop((0, 2))
        st._pinned_order[(0, 2)] = None
        st.fetch(1, np.array([4]))
        assert 2 in st.resident(0) and 3 not in st.resident(0) and 4 in st.resident(1)
        st.fetch(1, np.array([5, 6]))  # the step's own picks are never evicted for each other
        assert {5, 6} <= set(st.resident(1)) and st.used_bytes <= st.capacity
        n_other = len(st.resident(0)) + len(st.resident(1))
        assert n_other * unit == st.used_bytes


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """(path, resident logits) of a qwen3moe whose expert slabs are whole pages (256 rows of 256
    Q4_0 values: 36,864 bytes, 9 pages), so evicted slabs' pages move to the next loads."""
    from flexinfer.bench.synth import SynthSpec, shared_dir, write_synthetic
    try:
        vocab = shared_dir() / "vocab" / "ggml-vocab-llama-spm.gguf"
    except FlexInferError as e:
        pytest.skip(str(e))
    spec = SynthSpec(arch="qwen3moe", n_layer=2, n_embd=256, n_ff=256, n_head=4, n_head_kv=2,
                     type="q4_0", seed=21, n_expert=8, n_expert_used=2, n_ff_exp=256,
                     router="zipf:0.5", vocab_file=str(vocab))
    path = write_synthetic(tmp_path_factory.mktemp("aligned") / "qwen3moe.gguf", spec)
    return path, _run(path, experts="whole")[0]


def test_evicted_pages_move_to_the_next_load(aligned):
    """At the cache's floor every step evicts: the loads take the evicted slabs' pages (no fresh
    page touched) and the logits stay those of the resident run, bit for bit."""
    path, want = aligned
    got, stats, _ = _run(path, expert_cache=0)
    assert stats["recycled_slabs"] > 0 and stats["misses"] > 0
    assert np.array_equal(got, want)


def test_a_move_of_the_wrong_pages_is_caught(aligned, monkeypatch):
    """Break it on purpose: an eviction that hands over the slabs' pages but leaves the expert
    counted as cached. A later load moves those pages away, the expert reads zeros where it was
    used next, and the logits change. (The break stays inside the cache's arena: a move past a
    slab's end could take pages of whatever is mapped beside the arena.)"""
    path, want = aligned
    real = ex.ExpertStore._evict

    def kept(self, key):
        pinned = key in self._pinned
        real(self, key)
        self._resident.add(key)  # still "cached", its pages handed to the next load
        (self._pinned_order if pinned else self._order)[key] = None
        self.used_bytes += self.unit_bytes[key[0]]
    monkeypatch.setattr(ex.ExpertStore, "_evict", kept)
    got, stats, _ = _run(path, expert_cache=0)
    assert stats["recycled_slabs"] > 0
    assert not np.array_equal(got, want)


def test_expert_shaped_reads_are_measured(tmp_path, monkeypatch):
    """The bench's second disk figure: random reads of one slab each, three an expert; with a
    pause before each expert (the plans' rate of misses), the pauses are not timed; a file
    smaller than one read is refused in one line."""
    from flexinfer.bench import machine as bm
    from flexinfer.bench.machine import measure_expert_reads
    f = tmp_path / "data"
    f.write_bytes(b"\1" * (1 << 20))
    assert measure_expert_reads(f, 5000, count=4) > 0
    clock, slept = [0.0], []

    def sleep(s):  # a pause the clock sees: were it timed, the rate would fall a thousandfold
        slept.append(s)
        clock[0] += 1000.0

    def now():
        clock[0] += 1e-3  # each call: a millisecond
        return clock[0]

    monkeypatch.setattr(bm.time, "sleep", sleep)
    monkeypatch.setattr(bm.time, "perf_counter", now)
    got = measure_expert_reads(f, 5000, count=4, pause=0.02)
    assert slept == [0.02] * 4
    assert got == pytest.approx(4 * 3 * 8192 / (4 * 1e-3))  # 4 experts: 1 ms of reads each
    small = tmp_path / "small"
    small.write_bytes(b"\1" * 4096)
    with pytest.raises(FlexInferError, match="too small to measure reads of 5000 bytes"):
        measure_expert_reads(small, 5000)


@pytest.mark.parametrize("n,rows", [(6, 1), (6, 2), (200, 1), (200, 8)])
def test_a_steps_picks_are_counted_whatever_their_number(resident, n, rows):
    """A decode step's few picks are counted in Python, a prompt batch's many with numpy
    (experts.SMALL_STEP), the ids flat (the engine's) or in rows (T, K): either way each pick
    counts once, in its layer only, the experts picked come back sorted, and a pick outside the
    router's experts is refused, naming it."""
    path, _ = resident
    assert (n <= ex.SMALL_STEP) == (n == 6)
    with fm.load(path, n_ctx=64, n_threads=2, memory_budget=BUDGET, expert_cache=0) as m:
        st, n_expert = m._experts, m.cfg.n_expert
        ids = np.random.default_rng(n).integers(0, n_expert, size=n).astype(np.int32)
        shaped = ids.reshape(rows, -1) if rows > 1 else ids
        before = st.counts
        assert st._count(1, shaped) == sorted(set(ids.tolist()))
        delta = st.counts - before
        assert delta[1].tolist() == np.bincount(ids, minlength=n_expert).tolist()
        assert not delta[0].any()
        for bad in (-1, n_expert):
            ids[3] = bad  # shaped is a view of ids
            with pytest.raises(RuntimeError, match=f"layer 1: router picked expert {bad} of "
                                                   f"{n_expert}$"):
                st._count(1, shaped)
        assert (st.counts - before).tolist() == delta.tolist()  # nothing counted on the way
