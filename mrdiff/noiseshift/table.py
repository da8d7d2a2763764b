"""The NoiseShift table file: per-resolution calibrations for one model, as checked JSON.

A table names what it was calibrated for (the schedule, the checkpoint file's hash and the weights' hash),
so a sampler never applies another model's shifts. It is validated on load (t̂ finite, non-decreasing,
inside [0, T−1] and inside its band), merged per resolution, and written atomically. `time_cond` turns a
resolution's row into the callable the samplers feed the network. The search that fills a row is
`mrdiff.noiseshift.search.calibrate`; the names of the weights come from
`mrdiff.noiseshift.weights`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mrdiff.diffusion.samplers import TimeCond, identity
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.search import Calibration, SearchSettings
from mrdiff.noiseshift.time_cond import InterpolatedTimeCond
from mrdiff.resolution import parse_resolution, pixels, resolution_key
from mrdiff.utils import atomic_write

Fallback = Literal["error", "nearest", "identity"]

def _describe_schedule(d: dict[str, Any]) -> str:
    """Compact 'kind=linear, T=1000, …' for error messages."""
    names = {"num_timesteps": "T"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in d.items())


class NoiseShiftTable:
    """Per-resolution NoiseShift calibrations for one (schedule, checkpoint), stored as JSON."""

    FORMAT_VERSION = 1

    def __init__(
        self,
        *,
        schedule: dict[str, Any],  # NoiseSchedule.describe() of the schedule the table was made for
        checkpoint: str | None,  # checkpoint_hash of the checkpoint file, or None
        settings: dict[str, Any],  # search settings (asdict(SearchSettings))
        data: dict[str, Any],  # where the x_0 images came from (free-form)
        calibrations: dict[str, Calibration],
        weights: str | None = None,  # weights_hash of the model calibrated, or None
    ) -> None:
        if "num_timesteps" not in schedule:
            raise ValueError("schedule description lacks num_timesteps: pass NoiseSchedule.describe()")
        self.schedule, self.checkpoint, self.weights = dict(schedule), checkpoint, weights
        self.settings, self.data = dict(settings), dict(data)
        self.calibrations: dict[str, Calibration] = {}
        for key, cal in calibrations.items():
            self.add(key, cal)

    @classmethod
    def new(
        cls,
        schedule: NoiseSchedule,
        *,
        checkpoint: str | None = None,
        settings: SearchSettings | None = None,
        data: dict[str, Any] | None = None,
        weights: str | None = None,
    ) -> NoiseShiftTable:
        """Empty table for a live schedule and search settings."""
        return cls(schedule=schedule.describe(), checkpoint=checkpoint, weights=weights,
                   settings=asdict(settings or SearchSettings()), data=data or {}, calibrations={})

    def add(self, key: str, calibration: Calibration) -> None:
        """Store (or replace) the calibration of resolution `key`."""
        h, w = parse_resolution(key)
        try:
            calibration.check_range(int(self.schedule["num_timesteps"]))
        except ValueError as err:
            raise ValueError(f"resolution {key}: {err}") from None
        self.calibrations[resolution_key(h, w)] = calibration

    def merge(self, other: NoiseShiftTable) -> None:
        """Add another table's resolutions (same schedule and checkpoint required; other's entries win)."""
        if other.schedule != self.schedule:
            raise ValueError(
                f"cannot merge tables for different schedules: ({_describe_schedule(self.schedule)}) "
                f"vs ({_describe_schedule(other.schedule)})"
            )
        for name in ("checkpoint", "weights"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if None not in (mine, theirs) and mine != theirs:
                raise ValueError(f"cannot merge tables for different {name}: {mine} vs {theirs}")
        for key, cal in other.calibrations.items():
            self.add(key, cal)

    def resolutions(self) -> list[str]:
        """Resolution keys, by increasing pixel count."""
        return sorted(self.calibrations, key=lambda k: (pixels(k), k))

    def __getitem__(self, key: str) -> Calibration:
        """Calibration of a resolution key ("64", "96x128")."""
        return self.calibrations[key]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {
            "format_version": self.FORMAT_VERSION,
            "schedule": self.schedule,
            "checkpoint": self.checkpoint,
            "weights": self.weights,
            "settings": self.settings,
            "data": self.data,
            "resolutions": {k: self.calibrations[k].to_dict() for k in self.resolutions()},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically: a temporary file in the same directory, then os.replace."""
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        schedule: NoiseSchedule | None = None,  # if given, the table must have been made for it
        checkpoint: str | None = None,  # checkpoint_hash of the model's checkpoint file
        weights: str | None = None,  # weights_hash of the model
    ) -> NoiseShiftTable:
        """Read a table, checking format version, values, schedule and weights with actionable errors.

        When `checkpoint` or `weights` is given the table must name the same weights (its `weights`, else its
        `checkpoint` hash); a table that names neither is refused then.
        """
        doc = _read_json(Path(path))
        table = _table_from_doc(cls, doc, path)
        if schedule is not None and table.schedule != schedule.describe():
            raise ValueError(
                f"NoiseShift table {path} was calibrated for schedule ({_describe_schedule(table.schedule)}) "
                f"but the model uses ({_describe_schedule(schedule.describe())}): recalibrate for this "
                "schedule or load the table made for it"
            )
        table.check_weights(path, checkpoint=checkpoint, weights=weights)
        return table

    def check_weights(self, path: object, *, checkpoint: str | None, weights: str | None) -> None:
        """Refuse a table made for other weights, or one that names none when the model's are known."""
        if weights is not None and self.weights is not None:
            mine, theirs, what = self.weights, weights, "weights"
        elif checkpoint is not None and self.checkpoint is not None:
            mine, theirs, what = self.checkpoint, checkpoint, "checkpoint"
        elif weights is not None or checkpoint is not None:
            raise ValueError(f"NoiseShift table {path} does not name the weights it was calibrated for (a table "
                             "from an older mrdiff): recalibrate it with `mrdiff calibrate` for this checkpoint")
        else:
            return
        if mine != theirs:
            raise ValueError(
                f"NoiseShift table {path} was calibrated for {what} {mine} but the model's {what} hash is "
                f"{theirs}: recalibrate for this checkpoint or load its table"
            )

    def _nearest(self, height: int, width: int) -> str:
        """Present resolution whose pixel count is closest (by ratio) to height·width."""
        target = math.log(height * width)
        return min(self.resolutions(), key=lambda k: abs(math.log(pixels(k)) - target))

    def time_cond(self, height: int, width: int, *, fallback: Fallback = "error") -> TimeCond:
        """Nominal t ↦ t̂ at a resolution; `fallback` decides what a resolution missing from the table gets."""
        key = resolution_key(height, width)
        if key not in self.calibrations:
            if fallback == "identity":
                return identity
            if fallback != "nearest" or not self.calibrations:
                raise ValueError(
                    f"no NoiseShift calibration for resolution {key}; present: {self.resolutions() or 'none'}"
                    f". Calibrate it (mrdiff calibrate --resolutions [{key}]), or sample with --noiseshift_fallback "
                    "nearest (the closest calibrated size's table) or identity (t itself)"
                )
            key = self._nearest(height, width)
        cal = self.calibrations[key]
        t, t_hat = np.asarray(cal.t, dtype=np.float64), np.asarray(cal.t_hat, dtype=np.float64)
        return InterpolatedTimeCond(t, t_hat, int(self.schedule["num_timesteps"]), key)


def _read_json(path: Path) -> dict[str, Any]:
    """Parse the file, turning missing/corrupt files into errors that name the file and the fix."""
    if not path.is_file():
        raise FileNotFoundError(f"NoiseShift table {path} does not exist: run the calibration for this model "
                                "first or fix the path")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"NoiseShift table {path} is not valid JSON ({err}): delete it and recalibrate") \
            from err
    if not isinstance(doc, dict):
        raise ValueError(f"NoiseShift table {path} is not a JSON object: delete it and recalibrate")
    return doc


def _table_from_doc(cls: type[NoiseShiftTable], doc: dict[str, Any], path: object) -> NoiseShiftTable:
    """Build a table from its JSON document, validating version and fields."""
    version = doc.get("format_version")
    if version != cls.FORMAT_VERSION:
        raise ValueError(f"NoiseShift table {path} has format_version {version!r}, this code reads version "
                         f"{cls.FORMAT_VERSION}: recalibrate to write a current table")
    missing = [k for k in ("schedule", "checkpoint", "settings", "data", "resolutions") if k not in doc]
    if missing or not isinstance(doc["resolutions"], dict) or not isinstance(doc["schedule"], dict):
        bad = missing or ["resolutions/schedule"]
        raise ValueError(f"NoiseShift table {path} is malformed (missing or invalid: {bad}): "
                         "delete it and recalibrate")
    try:
        cals = {}
        for key, entry in doc["resolutions"].items():
            try:
                cals[key] = Calibration.from_dict(entry)
            except ValueError as err:
                raise ValueError(f"resolution {key}: {err}") from err
        return cls(schedule=doc["schedule"], checkpoint=doc["checkpoint"], weights=doc.get("weights"),
                   settings=doc["settings"] or {}, data=doc["data"] or {}, calibrations=cals)
    except (ValueError, TypeError) as err:
        raise ValueError(f"NoiseShift table {path} is malformed ({err}): delete it and recalibrate") from err
