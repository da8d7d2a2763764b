"""The pooled NoiseShift rule (issue 32), against the Gaussian ε-oracle of tests/helpers.py.

The oracle learned data variance 1 and is calibrated on N(0, std²) images of 8×8×3; its true optimum t*(t) is
the closed form (`oracle_optimum`), not the code under test. For std 0.97, t* − t is 0–12.6 timesteps over
DDIM-25 (median 9.2); for std 0.9, 0–46 (median 34.3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.interpolate

from mrdiff.diffusion.samplers import ddim_timesteps
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.calibration import summary
from mrdiff.noiseshift.pooled import LossSplines, fit_curve
from mrdiff.noiseshift.search import Calibration, SearchSettings, calibrate
from mrdiff.noiseshift.table import NoiseShiftTable
from tests.helpers import gaussian_images, oracle, oracle_optimum

SCHEDULE = NoiseSchedule()
DDIM_25 = ddim_timesteps(SCHEDULE.num_timesteps, 25)
SHAPE = (3, 8, 8)


def run(std: float, num_images: int, seed: int = 0, **settings) -> Calibration:
    """Calibrate the variance-1 oracle on num_images N(0, std²) images; image and ε seeds follow `seed`."""
    images = gaussian_images(num_images, SHAPE, std**2, seed=1234 + seed)
    search = SearchSettings(num_images=num_images, seed=seed, **settings)
    return calibrate(oracle(SCHEDULE, 1.0), SCHEDULE, images, DDIM_25, search, progress=False)


def errors(cal: Calibration, std: float) -> tuple[float, float]:
    """(median |t̂ − t*|, median |t − t*|) over the calibrated timesteps."""
    t_star = np.array([oracle_optimum(SCHEDULE, int(t), std**2, 1.0) for t in cal.t])
    return float(np.median(np.abs(np.array(cal.t_hat) - t_star))), float(np.median(np.abs(np.array(cal.t) - t_star)))


@pytest.mark.parametrize("num_images", [8, 32, 256])
def test_exact_oracle_keeps_t_at_every_timestep(num_images: int) -> None:
    cal = run(1.0, num_images)
    assert cal.rule == "pooled" and cal.pooled["accepted"] is False
    assert cal.t_hat == cal.t and cal.moved == 0
    assert cal.loss_diff == [0.0] * 25 and cal.loss_diff_se == [0.0] * 25
    assert all(lo <= t <= hi for lo, t, hi in zip(cal.band_lo, cal.t, cal.band_hi, strict=True))


def test_small_shift_is_recovered_with_128_images() -> None:
    # std 0.97: the per-timestep rule moves none of 25 timesteps here; the pooled fit is accepted
    runs = [run(0.97, 128, seed) for seed in range(3)]
    assert sum(cal.pooled["accepted"] for cal in runs) >= 2
    found, identity = zip(*(errors(cal, 0.97) for cal in runs), strict=True)
    assert identity[0] == pytest.approx(9.2, abs=0.1)
    assert np.median(found) <= identity[0] / 2, found
    per_timestep = run(0.97, 128, rule="per_timestep")
    assert per_timestep.moved == 0


def test_with_32_images_a_small_shift_never_makes_things_worse() -> None:
    # 32 images rarely resolve std 0.97 (the test rejects: the identity, and the table says so); when the
    # curve is accepted, it is closer to t* than t is
    for seed in range(3):
        cal = run(0.97, 32, seed)
        found, identity = errors(cal, 0.97)
        assert found <= identity
        assert (cal.moved > 0) == cal.pooled["accepted"]
        if not cal.pooled["accepted"]:
            assert cal.t_hat == cal.t and "the table is the identity" in summary(cal, 3.0)


def test_larger_shift_with_32_images() -> None:
    cal = run(0.9, 32)
    found, identity = errors(cal, 0.9)
    assert identity == pytest.approx(34.3, abs=0.1)
    assert cal.pooled["accepted"] and cal.pooled["gain_lower"] > 0
    assert found <= identity / 4, (found, identity)
    per_timestep, _ = errors(run(0.9, 32, rule="per_timestep"), 0.9)
    assert found < per_timestep
    assert all(a <= b for a, b in zip(cal.t_hat, cal.t_hat[1:], strict=False))  # monotone
    assert "accepted" in summary(cal, 3.0) and summary(cal, 3.0).startswith("t̂ moved at 24 of 25 timesteps (pooled)")


def test_two_seeds_lie_within_each_others_bands() -> None:
    runs = [run(0.9, 32, seed) for seed in (0, 1)]  # new images and new ε
    for this, other in (runs, runs[::-1]):
        assert this.pooled["accepted"]
        assert all(lo <= h <= hi for lo, h, hi in zip(this.band_lo, other.t_hat, this.band_hi, strict=True))
        # not agreement by vagueness: the bands (±3 bootstrap s.e.) exclude t at most timesteps
        assert sum(lo > t for lo, t in zip(this.band_lo, this.t, strict=True)) >= 20
        assert np.median(np.subtract(this.band_hi, this.band_lo)) < 40  # narrower than a DDIM-25 step


def test_rules_are_selectable_and_recorded() -> None:
    argmin = run(0.9, 8, rule="argmin")
    per_timestep_k0 = run(0.9, 8, rule="per_timestep", k=0.0)
    assert argmin.rule == "argmin" and per_timestep_k0.rule == "per_timestep"
    assert argmin.t_hat == per_timestep_k0.t_hat and argmin.pooled is None
    with pytest.raises(ValueError, match="rule must be one of"):
        SearchSettings(rule="isotonic")
    with pytest.raises(ValueError, match="rule must be one of"):
        Calibration([1.0], [1.0], [0.0], [0.0], rule="isotonic")


def test_old_table_without_rule_loads_and_new_tables_round_trip_their_rule(tmp_path: Path) -> None:
    table = NoiseShiftTable.new(SCHEDULE, settings=SearchSettings(num_images=32))
    table.add("8", run(0.9, 32))
    path = tmp_path / "new.json"
    table.save(path)
    doc = json.loads(path.read_text())
    assert doc["settings"]["rule"] == "pooled" and doc["resolutions"]["8"]["rule"] == "pooled"
    loaded = NoiseShiftTable.load(path, schedule=SCHEDULE)
    assert loaded["8"] == table["8"] and loaded["8"].pooled["accepted"] is True
    for entry in (doc["settings"], *doc["resolutions"].values()):  # as written before issue 32
        entry.pop("rule")
    doc["resolutions"]["8"].pop("pooled")
    path.write_text(json.dumps(doc))
    old = NoiseShiftTable.load(path, schedule=SCHEDULE)
    assert old["8"].rule == "per_timestep" and old["8"].t_hat == table["8"].t_hat
    doc["resolutions"]["8"]["band_hi"] = doc["resolutions"]["8"]["t"]  # t̂ > t: outside its band
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="t_hat must lie within"):
        NoiseShiftTable.load(path)


def test_splines_and_fit_recover_a_known_curve() -> None:
    # per-image losses (λ − λ*(t))² + noise_i·λ around λ*(t) = λ(t) − 0.3 + 0.1·u(t): the fit finds (−0.3, 0.1)
    lam = np.linspace(6.0, -6.0, 9)
    u = (lam - lam.mean()) / lam.std()
    target = lam - 0.3 + 0.1 * u
    noise = np.random.default_rng(0).normal(size=16) * 1e-3
    grids = [np.linspace(x - 1.0, x + 1.0, 11) for x in lam]
    losses = [(g[:, None] - y) ** 2 + g[:, None] * (noise - noise.mean()) for g, y in zip(grids, target, strict=True)]
    splines = LossSplines.build(grids, losses)
    value, slope = splines.evaluate(splines.mean(np.ones(16)), target + 0.05)
    reference = [scipy.interpolate.CubicSpline(g, loss.mean(axis=1)) for g, loss in zip(grids, losses, strict=True)]
    np.testing.assert_allclose(value, [s(y + 0.05) for s, y in zip(reference, target, strict=True)], atol=1e-12)
    np.testing.assert_allclose(slope, 0.1, atol=1e-9)
    np.testing.assert_allclose(fit_curve(splines, splines.mean(np.ones(16)), u, lam), [-0.3, 0.1], atol=1e-6)
