"""Seeds derived from a run's seed: one 63-bit value per (seed, a, b), independent of process and worker count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def mix_seed(seed: int, a: int, b: int) -> int:
    """A 63-bit seed mixing (seed, a, b) with the SplitMix64 finaliser.

    The data sampler uses (seed, epoch, global position) for an item's draws, the training step
    (seed, step, rank) for its t, ε and dropout: both survive a resume exactly.
    """
    z = (seed * 0x9E3779B97F4A7C15 + a * 0xBF58476D1CE4E5B9 + b * 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


@contextmanager
def seeded_rng(generator: torch.Generator, seed: int) -> Iterator[torch.Generator]:
    """`generator` seeded with `seed`, and the global RNG of its device forked and seeded for the block.

    The generator is for the draws that take one (t, ε); the forked global RNG is for those that cannot
    (dropout). On exit the global RNG is as it was, so other users of it are unaffected.
    """
    device = generator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        dropout_seed = mix_seed(seed, 0, 1)  # not the generator's stream: dropout masks independent of t and ε
        if device.type == "cuda":
            torch.cuda.manual_seed(dropout_seed)
        else:
            torch.random.default_generator.manual_seed(dropout_seed)
        yield generator.manual_seed(seed)
