"""Aspect-ratio buckets: batches whose samples all share one set of tensor shapes.

Each dataset index has a bucket key (the target size and the edit-image sizes it will be resized to); a batch
only ever holds indices of one key, so `batch_size > 1` works with mixed image sizes and nothing is padded.

The order is a pure function of (seed, epoch): every rank computes the same batch list and takes its share, and a
resumed run recomputes the list and skips the batches it already consumed.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Hashable, Iterator, Sequence

from torch.utils.data import Sampler

log = logging.getLogger(__name__)


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of dataset indices, each list drawn from a single bucket.

    keys: bucket key of every dataset index. repeat: each index appears `repeat` times per epoch.
    drop_last: drop each bucket's incomplete final batch (and, when sharded, batches that do not divide evenly
    across ranks); otherwise a short batch is kept and ranks are padded by reusing batches from the start, as
    `DistributedSampler` does, so every rank runs the same number of steps.

    The epoch advances each time a new pass starts (Lightning does not call `set_epoch` on a batch sampler);
    `set_epoch` overrides it.
    """

    def __init__(
        self,
        keys: Sequence[Hashable],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        repeat: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if repeat < 1:
            raise ValueError(f"dataset_repeat must be >= 1, got {repeat}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.keys = list(keys)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        # Buckets in order of first appearance: deterministic without requiring keys to be orderable.
        self.buckets: dict[Hashable, list[int]] = {}
        for index, key in enumerate(self.keys):
            self.buckets.setdefault(key, []).append(index)
        self._next_epoch = 0
        self._current_epoch: int | None = None
        self._yielded = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._next_epoch:
            self._skip = 0  # a resume position belongs to the epoch it was saved in
        self._next_epoch = epoch

    @property
    def current_epoch(self) -> int | None:
        """Epoch of the latest `iter()`, None before the first."""
        return self._current_epoch

    def _global_batch_count(self) -> int:
        count = 0
        for indices in self.buckets.values():
            size = len(indices) * self.repeat
            count += size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)
        return count

    def __len__(self) -> int:
        total = self._global_batch_count()
        if self.drop_last:
            return total // self.world_size
        return math.ceil(total / self.world_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, in order."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        batches: list[list[int]] = []
        for indices in self.buckets.values():
            pool = indices * self.repeat
            if self.shuffle:
                rng.shuffle(pool)
            for start in range(0, len(pool), self.batch_size):
                batch = pool[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1:
            if self.drop_last:
                batches = batches[: len(batches) // self.world_size * self.world_size]
            elif batches:
                missing = -len(batches) % self.world_size
                batches = batches + [batches[i % len(batches)] for i in range(missing)]
            batches = batches[self.rank :: self.world_size]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        # The bookkeeping runs at the first next(), not at iter(): DataLoader calls iter() on its batch sampler
        # more than once when it builds a multi-worker iterator, and an iterator never drawn from is no epoch.
        epoch = self._next_epoch
        skip, self._skip = self._skip, 0
        self._next_epoch = epoch + 1
        self._current_epoch = epoch
        self._yielded = skip
        for batch in self.epoch_batches(epoch)[skip:]:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict:
        """Position as (epoch, batches of that epoch already yielded).

        Counts what this sampler yielded; a DataLoader prefetches, so a trainer should save the number of batches
        it actually consumed (EditDataModule does) rather than this.
        """
        if self._current_epoch is None:
            return {"epoch": self._next_epoch, "batches_consumed": self._skip, "seed": self.seed}
        return {"epoch": self._current_epoch, "batches_consumed": self._yielded, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue at `state`: the next `iter()` yields the rest of that epoch."""
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if state.get("seed", self.seed) != self.seed:
            log.warning(
                "resuming with data seed %s, but the checkpoint used %s: the data order will differ",
                self.seed,
                state["seed"],
            )
        if consumed >= len(self):  # saved right at the end of an epoch: continue with the next one
            epoch, consumed = epoch + 1, 0
        self._next_epoch = epoch
        self._skip = consumed
        self._current_epoch = None
