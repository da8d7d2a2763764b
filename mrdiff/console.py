"""What mrdiff tells the user while it works: one line per event, from global rank zero only.

Under DDP every rank runs the same code; `info` keeps the messages of a 64-GPU job as short as those of one
process. Errors are not routed here: a rank that fails says so itself (see mrdiff.cli).
"""

from __future__ import annotations

import sys

from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def info(message: str, *, stderr: bool = False) -> None:
    """Print `message` (a whole line, "mrdiff: ..." by convention) on rank zero; warnings go to stderr."""
    print(message, file=sys.stderr if stderr else sys.stdout, flush=True)


def error(line: str) -> None:
    """Print an error line on stderr from whichever rank hit it (every rank that fails says so)."""
    print(line, file=sys.stderr, flush=True)
