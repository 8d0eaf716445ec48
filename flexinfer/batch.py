"""TokenBatch: what one engine step carries, like llama.cpp's llama_batch: tokens, each with its
sequence, its position in that sequence, and whether its logits are wanted."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBatch:
    tokens: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)  # the cache slot of each token (kv_cache.py)
    pos: list[int] = field(default_factory=list)  # its position in that sequence
    logits: list[bool] = field(default_factory=list)  # its logits are returned

    def add(self, token: int, seq: int, pos: int, logits: bool = False) -> None:
        self.tokens.append(token)
        self.seqs.append(seq)
        self.pos.append(pos)
        self.logits.append(logits)

    def add_run(self, ids: list[int], seq: int, pos: int, last_logits: bool = True,
                all_logits: bool = False) -> None:
        """ids at positions pos, pos+1, ... of one sequence: the last one's logits (or all)."""
        for i, t in enumerate(ids):
            self.add(t, seq, pos + i, all_logits or (last_logits and i == len(ids) - 1))

    def __len__(self) -> int:
        return len(self.tokens)

    def slice(self, a: int, b: int) -> TokenBatch:
        return TokenBatch(self.tokens[a:b], self.seqs[a:b], self.pos[a:b], self.logits[a:b])

    @property
    def n_logits(self) -> int:
        return sum(self.logits)
