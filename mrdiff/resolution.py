"""Resolutions: one spelling ("64", "96x128": height × width) for the command line, tables, files and logs."""

from __future__ import annotations

import re
from typing import Protocol

Resolution = int | str


def parse_resolution(value: Resolution | tuple[int, int]) -> tuple[int, int]:
    """64 → (64, 64); "96x128" (also "96X128", "96×128") → (96, 128) as height × width; (h, w) passes."""
    if isinstance(value, tuple):  # already parsed (callbacks hold pairs): check it, no string round trip
        height, width = value
        if height <= 0 or width <= 0:
            raise ValueError(f"resolution {value!r} must be positive")
        return int(height), int(width)
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(value))
    if not match:
        raise ValueError(f"resolution {value!r} is neither N nor HxW (e.g. 64 or 96x128)")
    height = int(match.group(1))
    width = int(match.group(2) or height)
    if height <= 0 or width <= 0:
        raise ValueError(f"resolution {value!r} must be positive")
    return height, width


def resolution_key(height: int, width: int) -> str:
    """"64" when square, "96x128" (HxW) otherwise."""
    if height < 1 or width < 1:
        raise ValueError(f"resolution must be positive, got {height}x{width}")
    return str(height) if height == width else f"{height}x{width}"


def pixels(value: Resolution) -> int:
    """H·W of a resolution or key."""
    height, width = parse_resolution(value)
    return height * width


class SizedNet(Protocol):
    def check_size(self, height: int, width: int) -> None: ...


def checked_resolutions(net: SizedNet, resolutions: list[Resolution]) -> list[tuple[int, int]]:
    """Parse every resolution and check the network can take it, before any sampling starts."""
    sizes = [parse_resolution(r) for r in resolutions]
    for height, width in sizes:
        net.check_size(height, width)
    return sizes
