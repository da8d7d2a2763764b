"""A rank-aware, resumable sampler whose order and per-item random draws depend only on (seed, epoch).

Each item comes as (index, item_seed): the patch sampler draws the item's scale and crop from
item_seed, so a batch is the same whatever the number of data-loader workers, and a run resumed
mid-epoch sees exactly the batches an uninterrupted run would have seen. Lightning leaves a
DistributedSampler in place, so this one also does the DDP sharding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from mrdiff.seeding import mix_seed


class ResumableSampler(DistributedSampler):
    """DistributedSampler yielding (index, item_seed); `skip(epoch, batches)` resumes mid-epoch."""

    def __init__(
        self, dataset: Dataset, *, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
        vary_with_epoch: bool = True,  # False: the same draws every epoch (validation)
        num_replicas: int | None = None,  # default: the process group's world size, or 1
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size, self.vary_with_epoch = batch_size, vary_with_epoch
        self._skip: dict[int, int] = {}

    def skip(self, epoch: int, batches: int) -> None:
        """Start epoch `epoch` after its first `batches` batches (set when restoring a checkpoint)."""
        self._skip = {epoch: batches}

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start = self._skip.pop(self.epoch, 0) * self.batch_size
        epoch = self.epoch if self.vary_with_epoch else 0
        for position in range(start, len(indices)):
            global_position = position * self.num_replicas + self.rank
            yield indices[position], mix_seed(self.seed, epoch, global_position)
