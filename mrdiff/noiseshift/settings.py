"""NoiseShift's settings and result: how the search runs (`SearchSettings`) and what it found at one
resolution (`Calibration`: t̂ per timestep with its loss difference, standard error and band)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Rule = Literal["pooled", "per_timestep", "argmin"]
RULES: tuple[str, ...] = ("pooled", "per_timestep", "argmin")


# -- search ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchSettings:
    """Coarse-to-fine search in σ_rf units (defaults as in NoiseShift: ±0.1 by 0.01, then ±0.01 by 0.001).

    Args:
        coarse_window: Half-width of the coarse search around σ_rf(t), in σ_rf units.
        coarse_stride: Step of the coarse search.
        fine_window: Half-width of the fine search around the coarse choice.
        fine_stride: Step of the fine search.
        num_images: Held-out images per resolution, at least 2 (docs/noiseshift.md says how many a shift needs).
        max_batch: Candidates × images per forward pass.
        seed: Seed of the ε draws, common to all candidates (a second seed checks a table's bands).
        k: Move t̂ only when the best candidate beats t by more than k standard errors; 0: plain argmin.
            The pooled rule draws its band k bootstrap standard errors either side of the curve.
        rule: "pooled" (one curve for all timesteps, accepted against the identity by one held-out paired
            test; scores the coarse grid only), "per_timestep" (the k-standard-error test at each t) or
            "argmin" (per_timestep with k = 0).
    """

    coarse_window: float = 0.1
    coarse_stride: float = 0.01
    fine_window: float = 0.01
    fine_stride: float = 0.001
    num_images: int = 64
    max_batch: int = 256
    seed: int = 0
    k: float = 3.0
    rule: Rule = "pooled"

    def __post_init__(self) -> None:
        """Reject settings that cannot define a search grid or a decision."""
        for name in ("coarse_window", "fine_window", "k"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SearchSettings.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("coarse_stride", "fine_stride"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SearchSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.num_images < 2:
            raise ValueError(f"SearchSettings.num_images must be >= 2 (a standard error needs two images), "
                             f"got {self.num_images}")
        if self.max_batch < 1:
            raise ValueError(f"SearchSettings.max_batch must be >= 1, got {self.max_batch}")
        if self.rule not in RULES:
            raise ValueError(f"SearchSettings.rule must be one of {list(RULES)}, got {self.rule!r}")


_UNCERTAINTY = ("loss_diff", "loss_diff_se", "band_lo", "band_hi")
_COLUMNS = ("t", "t_hat", "loss_t", "loss_t_hat", *_UNCERTAINTY)


@dataclass
class Calibration:
    """One resolution's table, sorted by ascending t: t̂(t), the one-step losses at t and at t̂, and (tables
    from the noise-aware search) the paired loss difference ℓ(t̂) − ℓ(t), its standard error, and the band
    [band_lo, band_hi] of conditioning values the data cannot tell apart from the best one. `rule` names the
    rule that chose t̂ (tables without it are per_timestep); `pooled` holds the pooled rule's curve and its
    acceptance test (`pooled.PooledFit`; accepted False: the table is the identity).
    """

    t: list[float]
    t_hat: list[float]
    loss_t: list[float]
    loss_t_hat: list[float]
    loss_diff: list[float] | None = None  # mean over images of ℓ_i(t̂) − ℓ_i(t), same (x_0, ε) for both
    loss_diff_se: list[float] | None = None  # its standard error (sample s.d. of the differences / √N)
    band_lo: list[float] | None = None  # conditioning values in [band_lo, band_hi] are not ruled out
    band_hi: list[float] | None = None  # (`decide`): the band t̂ could lie in
    rule: str = "per_timestep"  # SearchSettings.rule of the search that made this table
    pooled: dict[str, Any] | None = None  # rule "pooled": coefficients and the held-out test

    def __post_init__(self) -> None:
        """Check lengths, finite values, strictly increasing t (np.interp in time_cond), monotone t̂, bands."""
        present = [name for name in _UNCERTAINTY if getattr(self, name) is not None]
        if present and len(present) != len(_UNCERTAINTY):
            raise ValueError(f"calibration holds {present} but not all of {list(_UNCERTAINTY)}")
        if self.rule not in RULES:
            raise ValueError(f"calibration rule must be one of {list(RULES)}, got {self.rule!r}")
        columns = {k: getattr(self, k) for k in _COLUMNS if getattr(self, k) is not None}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1 or not self.t:
            raise ValueError(f"calibration lists must be non-empty and equally long, got lengths {lengths}")
        for name, values in columns.items():
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"calibration {name} holds non-finite values (NaN/inf)")
        if any(b <= a for a, b in zip(self.t, self.t[1:], strict=False)):
            raise ValueError("calibration timesteps must be strictly increasing")
        if any(b < a for a, b in zip(self.t_hat, self.t_hat[1:], strict=False)):
            raise ValueError("calibration t_hat must be non-decreasing in t")
        if present:
            if min(self.loss_diff_se) < 0:
                raise ValueError("calibration loss_diff_se holds negative standard errors")
            rows = zip(self.band_lo, self.t_hat, self.band_hi, strict=True)
            if any(not lo - 1e-6 <= h <= hi + 1e-6 for lo, h, hi in rows):
                raise ValueError("calibration t_hat must lie within [band_lo, band_hi]")

    @property
    def has_uncertainty(self) -> bool:
        """True for tables from the noise-aware search (older tables hold t̂ and the losses only)."""
        return self.loss_diff is not None

    @property
    def moved(self) -> int:
        """Number of timesteps whose t̂ differs from t."""
        return sum(h != t for t, h in zip(self.t, self.t_hat, strict=True))

    def check_range(self, num_timesteps: int) -> None:
        """t, t̂ and the band must lie in [0, T−1] of the schedule the table was made for."""
        for name in ("t", "t_hat", "band_lo", "band_hi"):
            values = getattr(self, name)
            if values is not None and (min(values) < 0 or max(values) > num_timesteps - 1):
                raise ValueError(f"calibration {name} spans {min(values)}..{max(values)}, outside "
                                 f"[0, {num_timesteps - 1}]")

    def to_dict(self) -> dict[str, Any]:
        """Plain lists for JSON (the uncertainty fields only when present), the rule and the pooled fit."""
        out: dict[str, Any] = {k: [float(v) for v in getattr(self, k)] for k in _COLUMNS
                               if getattr(self, k) is not None}
        out["rule"] = self.rule
        if self.pooled is not None:
            out["pooled"] = dict(self.pooled)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Inverse of to_dict; raises ValueError on missing or non-numeric fields."""
        if not isinstance(data, dict):
            raise ValueError(f"calibration entry must be an object, got {type(data).__name__}")
        names = ("t", "t_hat", "loss_t", "loss_t_hat", *(k for k in _UNCERTAINTY if k in data))
        try:
            fields = {k: [float(v) for v in data[k]] for k in names}
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration entry is malformed ({err!r})") from err
        pooled = data.get("pooled")
        if pooled is not None and not isinstance(pooled, dict):
            raise ValueError(f"calibration pooled must be an object, got {type(pooled).__name__}")
        return cls(**fields, rule=data.get("rule", "per_timestep"), pooled=pooled)  # no rule: before issue 32


