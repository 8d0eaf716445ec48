"""Residency: which weight blocks are resident, and the one mechanism that changes it.

A plan (planner.py) says, for a budget, how many rows of each matrix stay resident at each stage
of a growing KV cache, and which of them a prompt batch borrows (the loan). Blocks are fixed at
load (weights.py), so each of those states is a set of blocks, a target; everything that changes
residency is a move to another target, between forward passes:
- a later stage (the KV cache grew into memory rows held): fewer blocks;
- a prompt batch (the loan goes while its compute buffer exists): fewer; decoding again: more;
- a new budget (set_plan): a new plan, and the target it gives at this stage.

A move first stops the prefetcher (it may be reading ahead with the old sets), then:
1. releases the blocks leaving: munlock, then MADV_DONTNEED on their homes (uncharged at once);
2. frees the ring if it must change size;
3. reads the blocks arriving straight into their homes (O_DIRECT, no ring or staging needed);
4. sizes the ring for the most this stage may stream (the plan's ring; a forced plan may need a
   layer more) and restarts the prefetcher on the blocks left to stream.
So the process never holds more than the larger of the old and the new state: memory is given
back before it is taken. Headers never change shape, so the engine's graphs stay valid, and a
block's bytes are the same wherever they are read, so logits do not change by a bit.
"""

from __future__ import annotations

from flexinfer import ggml_ops
from flexinfer.direct_io import span
from flexinfer.planner import Plan
from flexinfer.prefetch import Prefetcher


def _page(n: int) -> int:
    return (n + ggml_ops.PAGE - 1) // ggml_ops.PAGE * ggml_ops.PAGE


class Residency:
    def __init__(self, store, plan: Plan, *, mapped: bool = False, progress=None,
                 positions: int = 0):
        self.store, self.mapped = store, mapped
        self.blocks = store.all_blocks()
        self.resident: set = set()
        self.resident_bytes = 0  # matrix bytes resident now (vectors are among the plan's fixed)
        self.prefetcher: Prefetcher | None = None
        self.ring: ggml_ops.Ring | None = None
        self._streamed: dict[int, list] = {}  # layer -> its streamed blocks, in file order
        self._jobs_by_layer: dict[int, list] = {}
        self.lent = False  # the loan is out: a prompt batch is running
        self.prompts = 0  # prompt batches that borrowed the loan
        self.moves = 0  # changes of the resident set
        self.mlock_errno = 0
        self.stage = 0
        self._set_plan(plan, positions)
        if mapped:
            return
        self.mlock(store.vectors)
        self._move(progress)

    # ---- targets
    def _set_plan(self, plan: Plan, positions: int) -> None:
        self.plan = plan
        self.stage_positions = [st.positions for st in plan.stages]
        final = plan.resident_rows
        rows = [st.resident_rows for st in plan.stages] + [final]
        self._decode = [{b for b in self.blocks if _end(b) <= r.get(b.name, 1 << 62)} for r in rows]
        kept = plan.prompt_rows or final
        self._loan = {b for b in self.blocks
                      if _end(b) <= final.get(b.name, 1 << 62) and _end(b) > kept.get(b.name, 1 << 62)}
        self.stage = 0
        while self.stage < len(self.stage_positions) and positions > self.stage_positions[self.stage]:
            self.stage += 1

    def target(self, stage: int | None = None, lent: bool | None = None) -> set:
        stage = self.stage if stage is None else stage
        t = self._decode[stage]
        return t - self._loan if (self.lent if lent is None else lent) else t

    def target_bytes(self) -> int:
        return sum(b.nbytes for b in self.target())

    # ---- the moves
    def prepare(self, positions: int) -> None:
        """Before the KV cache holds `positions` positions: move on to the stage that holds them."""
        stage = self.stage
        while stage < len(self.stage_positions) and positions > self.stage_positions[stage]:
            stage += 1
        if stage != self.stage:
            self.stage = stage
            self._move()

    def begin_prompt(self) -> None:
        """Before a prompt batch: the loan goes (its memory is the prompt buffer's) and streams."""
        if self.lent or not self._loan:
            return
        self.lent = True
        self.prompts += 1
        self._move()

    def end_prompt(self) -> None:
        """Before decoding: the loan comes back (read into its homes)."""
        if not self.lent:
            return
        self.lent = False
        self._move()

    def set_plan(self, plan: Plan, positions: int) -> tuple[int, int]:
        """Move to a new plan's target for this many cached positions (the loan, if out, stays
        out). Returns (bytes released, bytes read back)."""
        before = set(self.resident)
        self._set_plan(plan, positions)
        self._move()
        return (sum(b.nbytes for b in before - self.resident),
                sum(b.nbytes for b in self.resident - before))

    def _move(self, progress=None) -> None:
        if self.mapped:
            return
        target = self.target()
        leaving, arriving = self.resident - target, target - self.resident
        ring = self._ring_size()
        if not leaving and not arriving and (self.ring.size if self.ring else 0) == ring:
            return
        if self.prefetcher:
            self.prefetcher.close()  # it may be reading ahead with the old sets
        for b in sorted(leaving, key=lambda b: b.offset):
            ggml_ops.release_pages(b.home, b.span)
            self.resident.discard(b)
            self.resident_bytes -= b.nbytes
        if self.ring is not None and self.ring.size != ring:
            self.ring.free()  # before anything is read: the old ring and the new never coexist
            self.ring = None
        done, total = 0, sum(b.nbytes for b in arriving)
        for b in sorted(arriving, key=lambda b: b.offset):
            self.store.read_home(b)
            self.mlock([b])
            self.resident.add(b)
            self.resident_bytes += b.nbytes
            done += b.nbytes
            if progress:
                progress(done, total)
        self.moves += bool(leaving or arriving)
        self._restream(ring)

    def _restream(self, ring: int) -> None:
        streamed: dict[int, list] = {}
        for b in self.blocks:
            if b not in self.resident:
                streamed.setdefault(b.layer, []).append(b)
        for bs in streamed.values():
            bs.sort(key=lambda b: b.offset)
        self._streamed = streamed
        self._jobs_by_layer = {l: [(b, span(b.offset, b.nbytes)[1]) for b in bs]
                               for l, bs in streamed.items()}
        if not streamed:
            return
        if self.ring is None:
            self.ring = ggml_ops.Ring(ring, self._piece(), self.store.repack)
        threaded = self.plan.mode != "sync"
        window = max(1, self.plan.window) if threaded else 1
        order = sorted(streamed)
        if self.prefetcher is None:
            self.prefetcher = Prefetcher(order, window, self.ring.size, self._jobs, self._read,
                                         self._upload, threaded=threaded, wraps=self.ring.wraps)
        else:
            self.prefetcher.restart(order, ring=self.ring.size, window=window, threaded=threaded,
                                    wraps=self.ring.wraps)

    def _ring_size(self) -> int:
        """The ring for the most this stage streams (a prompt's, with the loan out): the plan's,
        or, where a forced plan's layers take more, `window` times the largest layer. 0 when
        nothing streams now."""
        now = self.target()
        if all(b in now for b in self.blocks):
            return 0
        most = self.target(lent=True) if self._loan else now
        per_layer: dict[int, int] = {}
        for b in self.blocks:
            if b not in most:
                per_layer[b.layer] = per_layer.get(b.layer, 0) + span(b.offset, b.nbytes)[1]
        layer = max(per_layer.values(), default=0)
        size = self.plan.ring_bytes if self.plan.mode != "sync" else max(self.plan.ring_bytes, layer)
        if size < layer:  # a plan made without a ring (tests force rows): a layer per window
            size = max(1, self.plan.window) * layer
        return _page(max(size, 1))

    def _piece(self) -> int:
        return max((span(b.offset, b.nbytes)[1] for b in self.blocks), default=ggml_ops.PAGE)

    def mlock(self, blocks) -> None:
        if self.mlock_errno:
            return
        for b in blocks:
            err = ggml_ops.mlock(b.home, b.span)
            if err:
                self.mlock_errno = err
                return

    # ---- the prefetcher's callbacks
    def _jobs(self, layer: int):
        return self._jobs_by_layer[layer]

    def _read(self, b, offset: int) -> int:
        return self.store.reader.read_span(self.ring.base + offset, b.offset, b.nbytes)

    def _upload(self, b, src: int) -> None:
        self.store.finish(b, self.ring, src)

    # ---- use
    def acquire(self, layer: int) -> None:
        if self.prefetcher and layer in self._streamed:
            self.prefetcher.acquire(layer)

    def release(self, layer: int) -> None:
        if self.prefetcher and layer in self._streamed:
            self.prefetcher.release(layer)

    def reset(self) -> None:
        if self.prefetcher and self._streamed:
            self.prefetcher.reset()

    def streamed_layers(self) -> dict[int, list]:
        return self._streamed

    def close(self) -> None:
        if self.prefetcher:
            self.prefetcher.close()
            self.prefetcher = None
        if self.ring is not None:
            self.ring.free()
            self.ring = None


def _end(b) -> int:
    """The plan row a block ends at: its last row + 1, or 1 for a 3-D expert tensor (one plan
    row, weights.plan_rows)."""
    return 1 if len(b.header.contents.ne) and b.header.contents.ne[2] > 1 else b.row0 + b.rows
