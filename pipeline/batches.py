"""Which rows each rank trains on at each step: a seeded, resumable order over a fixed set (BlockSampler: pretrain
blocks, PPO prompts) or the blocks of a stream in order (StreamSampler)."""

from __future__ import annotations

import numpy as np

from pipeline.config import UserError


class BlockSampler:
    """Which blocks each rank trains on: a seeded permutation per epoch over an endless stream of samples.

    Optimizer step t uses global samples [t*G, (t+1)*G) (G = sequences per step); micro-step m of rank r takes the
    (m*world + r)-th slice of `micro` of them. So a resumed run, and a run on more processes with the same G,
    sees the same samples at the same step.
    """

    def __init__(self, n_blocks: int, seed: int, micro: int, world: int, accumulation: int):
        self.n, self.seed, self.micro, self.world, self.accumulation = n_blocks, seed, micro, world, accumulation
        self._perms: dict[int, np.ndarray] = {}

    def _sample(self, index: np.ndarray) -> np.ndarray:
        epochs, positions = np.divmod(index, self.n)
        out = np.empty_like(index)
        for epoch in np.unique(epochs):
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, int(epoch)]).permutation(self.n)}
            out[epochs == epoch] = self._perms[epoch][positions[epochs == epoch]]
        return out

    def indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        per_step = self.micro * self.world * self.accumulation
        start = step * per_step + (micro_step * self.world + rank) * self.micro
        return self._sample(np.arange(start, start + self.micro))


class StreamSampler:
    """Blocks in stream order for `data.streaming`: step t uses blocks [t*G, (t+1)*G) of the packed stream, split
    across ranks and micro-steps as BlockSampler does. Every rank reads the stream and keeps its own slices; on
    resume the consumed blocks are read again and skipped (exact, at the cost of re-tokenizing them)."""

    def __init__(self, stream, skip: int, micro: int, world: int, accumulation: int):
        self.micro, self.world, self.accumulation = micro, world, accumulation
        self._iter, self._buffer, self._step = self._blocks(stream, skip), None, None

    @staticmethod
    def _blocks(stream, skip):
        epoch = 0
        while True:
            seen = 0
            for row in stream:
                if skip:
                    skip -= 1
                    continue
                seen += 1
                yield np.asarray(row["input_ids"])
            if not seen:
                raise UserError("data: the stream yields no full block; is it shorter than one sequence?")
            epoch += 1
            if hasattr(stream, "set_epoch"):
                stream.set_epoch(epoch)

    def blocks(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        if self._step != step:
            per_step = self.micro * self.world * self.accumulation
            self._buffer, self._step = np.stack([next(self._iter) for _ in range(per_step)]), step
        start = (micro_step * self.world + rank) * self.micro
        return self._buffer[start : start + self.micro]
