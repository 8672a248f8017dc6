"""Global batches as a pure function of (seed, step): resume and multi-process runs see the same data.

Step s of a run uses global batch s of an endless stream of epoch permutations. Each process takes its contiguous
slice of the global batch, so N processes x B/N samples sum to exactly the 1-process batch of B. The sampler yields
(epoch, j) keys: the data set draws what changes per epoch (train crops, the cached token variant) from
(seed, epoch, j), so a resumed run fetches exactly what the uninterrupted one would have.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler):
    def __init__(self, n: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 micro_batches: int = 1):
        if global_batch % (world * micro_batches):
            raise ValueError(f"batch_size={global_batch} must be divisible by processes ({world}) x grad_accum "
                             f"({micro_batches}): pick a batch size that is a multiple of {world * micro_batches}")
        self.n, self.B, self.seed, self.step = n, global_batch, seed, start_step
        self.rank, self.world, self.micro = rank, world, micro_batches
        self._perm_epoch, self._perm = -1, None

    def _key(self, i: int) -> tuple[int, int]:
        epoch, j = divmod(i, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return epoch, int(self._perm[j])

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        return [self._key(step * self.B + k) for k in range(self.B)]

    def __iter__(self):
        step = self.step
        local = self.B // self.world
        mb = local // self.micro
        while True:
            batch = self.global_batch(step)[self.rank * local:(self.rank + 1) * local]
            for m in range(self.micro):  # micro-batches of one optimizer step (gradient accumulation)
                yield batch[m * mb:(m + 1) * mb]
            step += 1

    def __len__(self):  # endless; DataLoader only needs it for progress estimates
        return 2 ** 62
