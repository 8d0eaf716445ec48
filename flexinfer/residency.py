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

Growing to a larger budget while weights stream (set_plan) need not read anything: the blocks
arriving are streamed on the next step anyway, so they stay streamed (pending) and each is copied
from the ring to its home when its layer has been computed, as far as the new budget allows with
the ring still at its old size; at the next step boundary they become resident, the ring shrinks
to what is left to stream, and whatever could not be copied is read then (step 3). Decoding goes
on at its own pace through the change: the reads a larger budget saves are not spent up front.
"""

from __future__ import annotations

from flexinfer import ggml_ops
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
        self.mlock_errno = 0
        self.stage = 0
        self._pending: dict[int, list] = {}  # layer -> blocks to copy home as they pass the ring
        self._grown: list = []  # copied home during this step: resident from the next boundary
        self._grown_bytes = 0
        self._view = None  # (id, layers) for the resident set, made when first asked for
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
        self.stage = self._stage_for(positions, 0)

    def _stage_for(self, positions: int, stage: int) -> int:
        """The first stage from `stage` on that holds `positions` cached positions."""
        while stage < len(self.stage_positions) and positions > self.stage_positions[stage]:
            stage += 1
        return stage

    def view(self) -> tuple[int, list[dict]]:
        """(id, layers): the headers the graphs use for what is resident now (WeightStore.view:
        one header per run of resident blocks); the id changes only with the pattern."""
        if self._view is None:
            self._view = self.store.view(self.resident)
        return self._view

    def target(self, stage: int | None = None, lent: bool | None = None) -> set:
        stage = self.stage if stage is None else stage
        t = self._decode[stage]
        return t - self._loan if (self.lent if lent is None else lent) else t

    # ---- the moves
    def prepare(self, positions: int) -> None:
        """Before a step that makes the KV cache hold `positions` positions: move on to the stage
        that holds them, and finish or go on with growing through the ring."""
        stage = self._stage_for(positions, self.stage)
        if stage != self.stage:
            self.stage = stage
            self._move()

    def end_step(self) -> None:
        """After a step: blocks copied home through the ring become resident; if none could be
        (no room with the ring as it is), the rest is read now."""
        if self._grown or self._pending:
            self._move(through_ring=bool(self._grown))

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

    def set_plan(self, plan: Plan, positions: int, through_ring: bool = True
                 ) -> tuple[int, int, int]:
        """Move to a new plan's target for this many cached positions (the loan, if out, stays
        out). Blocks arriving while weights stream are left to grow through the ring (module
        docstring) unless through_ring is False. Returns (bytes released, bytes read back, bytes
        left to grow through the ring)."""
        if self.prefetcher:  # its read-ahead in flight is the old plan's, not this move's
            self.prefetcher.close()
        before = set(self.resident)
        self._set_plan(plan, positions)
        self._move(through_ring=through_ring, restart=True)
        read = sum(b.nbytes for b in self.resident - before)  # read into their homes just now
        return sum(b.nbytes for b in before - self.resident), read, self.pending_bytes()

    def pending_bytes(self) -> int:
        return sum(b.nbytes for bs in self._pending.values() for b in bs) + self._grown_bytes

    def finish_growth(self) -> None:
        """Read whatever is still growing through the ring now (idle: no step will stream it)."""
        if self._pending or self._grown:
            self._move(through_ring=False)

    def _adopt_grown(self, target: set) -> None:
        """Blocks copied home during the last step: resident now (their headers move home).
        Those the target no longer wants are released after the others are adopted (a page
        they share with an adopted neighbour stays)."""
        if self._grown:
            self._view = None
        for b in self._grown:
            if b in target:
                b.place(self.store.arena, self.store.data_addr(b))
                self.mlock([b])
                self.resident.add(b)
                self.resident_bytes += b.nbytes
        for b in self._grown:
            if b not in target:  # the target changed meanwhile
                self.store.release_home(b, self.resident)
        self._grown, self._grown_bytes = [], 0

    def _move(self, progress=None, through_ring: bool = False, restart: bool = False) -> None:
        if self.mapped:
            return
        target = self.target()
        stopped = restart or bool(self.prefetcher and (self._grown or self._pending))
        if stopped and self.prefetcher:
            self.prefetcher.close()
        self._adopt_grown(target)
        self._pending = {}
        leaving, arriving = self.resident - target, target - self.resident
        grow = through_ring and arriving and self.prefetcher is not None and not self.lent
        ring = self._ring_size(self.resident - leaving if grow else None)
        if not leaving and not arriving and (self.ring.size if self.ring else 0) == ring:
            if stopped:
                self._restream(ring)  # the blocks adopted stream no more
            return
        if self.prefetcher:
            self.prefetcher.close()  # it may be reading ahead with the old sets
        self._view = None
        for b in leaving:
            self.resident.discard(b)
            self.resident_bytes -= b.nbytes
        for b in sorted(leaving, key=lambda b: b.offset):
            self.store.release_home(b, self.resident)
        if grow:  # stream them once more, and copy them home as they pass (release)
            for b in sorted(arriving, key=lambda b: b.offset):
                self._pending.setdefault(b.layer, []).append(b)
            arriving = set()
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
        self._restream(ring)

    def _restream(self, ring: int) -> None:
        streamed: dict[int, list] = {}
        for b in self.blocks:
            if b not in self.resident:
                streamed.setdefault(b.layer, []).append(b)
        for bs in streamed.values():
            bs.sort(key=lambda b: b.offset)
        self._streamed = streamed
        self._jobs_by_layer = {l: [(b, b.span) for b in bs]
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

    def _ring_size(self, kept: set | None = None) -> int:
        """The ring for the most this stage streams (a prompt's, with the loan out): the plan's,
        or, where a forced plan's layers take more, `window` times the largest layer. 0 when
        nothing streams now. kept: the blocks resident while growing through the ring (the ring
        must hold everything else; the ring there is, if it does)."""
        now = self.target() if kept is None else kept
        if all(b in now for b in self.blocks):
            return 0
        most = kept if kept is not None else (self.target(lent=True) if self._loan else now)
        per_layer: dict[int, int] = {}  # the ring bytes each layer's streamed blocks take
        for b in self.blocks:
            if b not in most:
                per_layer[b.layer] = per_layer.get(b.layer, 0) + b.span
        layer = max(per_layer.values(), default=0)
        if kept is not None and self.ring is not None and layer <= self.ring.size:
            return self.ring.size
        size = self.plan.ring_bytes if self.plan.mode != "sync" else max(self.plan.ring_bytes, layer)
        if size < layer:  # a plan made without a ring (tests force rows): a layer per window
            size = max(1, self.plan.window) * layer
        return _page(max(size, 1))

    def _piece(self) -> int:
        return max((b.span for b in self.blocks), default=ggml_ops.PAGE)

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
            if layer in self._pending:
                self._copy_home(layer)
            self.prefetcher.release(layer)

    def _copy_home(self, layer: int) -> None:
        """The layer was computed and its streamed blocks are still in the ring: copy the pending
        ones home (already repacked), as far as the budget allows with the ring as it is."""
        unused = self.plan.stages[self.stage].kv_unused if self.stage < len(self.plan.stages) \
            else 0  # KV cache bytes not yet charged at this stage, which its target spends
        room = self.plan.budget_bytes - self.plan.fixed_bytes + unused - self.plan.bounce_bytes \
            - (self.ring.size if self.ring else 0)
        left = []
        for b in self._pending.pop(layer):
            if self.resident_bytes + self._grown_bytes + b.span > room:
                left.append(b)
                continue
            ggml_ops.copy(self.store.data_addr(b), ggml_ops.data_addr(b.header), b.nbytes)
            self._grown.append(b)
            self._grown_bytes += b.nbytes
        if left:
            self._pending[layer] = left

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
