"""NoiseShift calibration against a Gaussian oracle with a closed-form optimum, the table, the baseline.

Oracle: for x_0 ~ N(0, v I) the Bayes-optimal ε-prediction at conditioning c is
ε*(x; c, v) = √(1−ᾱ_c) x / (ᾱ_c v + 1 − ᾱ_c). For v ≥ 1 its gain k(c) grows monotonically with c, so the
argmin over c of E(k(c) x_t − ε)² is unique: k(c) = √(1−ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t) for data variance s².
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from mrdiff.diffusion.samplers import TimeCond, ddim_sample, ddim_timesteps
from mrdiff.diffusion.schedule import NoiseSchedule
from mrdiff.noiseshift.calibration import plot_table, resolution_warning, summary, unresolved
from mrdiff.noiseshift.search import Calibration, SearchSettings, calibrate, critical_value, decide
from mrdiff.noiseshift.table import NoiseShiftTable
from mrdiff.noiseshift.time_cond import AnalyticShift
from mrdiff.noiseshift.weights import checkpoint_hash, weights_hash
from mrdiff.resolution import resolution_key
from tests.helpers import closed_form_t_hat, gaussian_images, oracle

SCHEDULE = NoiseSchedule()
STRIDE = SearchSettings().fine_stride
MID_T = [500, 600, 700, 800]  # where 2^22 oracle pixels pin the optimum to < 1/8 fine stride (1 s.d.)


def sigma_gap(schedule: NoiseSchedule, a: float, b: float) -> float:
    """|σ_rf(a) − σ_rf(b)|."""
    return abs(float(schedule.sigma_rf_at(a) - schedule.sigma_rf_at(b)))


# -- calibration -----------------------------------------------------------------------------------------
QUICKSTART = {"coarse_stride": 0.02, "fine_stride": 0.002}  # configs/quickstart.yaml's search
DDIM_25 = ddim_timesteps(SCHEDULE.num_timesteps, 25)
PER_T = "per_timestep"  # the k-standard-error rule, the default before issue 32 (pooled: test_noiseshift_pooled)


@pytest.mark.parametrize("num_images", [8, 64, 256])
@pytest.mark.parametrize("variance", [0.25, 1.0, 4.0, 16.0])
def test_exact_oracle_keeps_t_at_every_timestep(num_images: int, variance: float) -> None:
    images = gaussian_images(num_images, (3, 16, 16), variance)
    settings = SearchSettings(num_images=num_images, max_batch=4096, rule=PER_T, **QUICKSTART)
    cal = calibrate(oracle(SCHEDULE, variance), SCHEDULE, images, DDIM_25, settings, progress=False)
    assert cal.t_hat == cal.t
    assert cal.loss_diff == [0.0] * len(cal.t) and cal.loss_diff_se == [0.0] * len(cal.t)
    assert all(lo < t < hi for lo, t, hi in zip(cal.band_lo, cal.t, cal.band_hi, strict=True) if 0 < t < 999)


def test_plain_argmin_chases_noise_on_the_exact_oracle() -> None:
    # what the rule prevents: k = 0 is the argmin of the tables before it, far from t = t̂ with 8 images
    images = gaussian_images(8, (3, 16, 16), 1.0)
    settings = SearchSettings(num_images=8, k=0.0, rule=PER_T, **QUICKSTART)
    cal = calibrate(oracle(SCHEDULE, 1.0), SCHEDULE, images, DDIM_25, settings, progress=False)
    assert cal.moved >= 15
    assert max(abs(h - t) for t, h in zip(cal.t, cal.t_hat, strict=True)) > 20


def test_exact_oracle_false_moves_are_rare_with_few_images() -> None:
    # k = 3 with the Student-t quantile: at most 0.27% of timesteps in the worst case (a flat objective)
    moved = 0
    for seed in range(20):
        images = gaussian_images(8, (3, 8, 8), 1.0, seed=100 + seed)
        settings = SearchSettings(num_images=8, seed=seed, rule=PER_T, **QUICKSTART)
        moved += calibrate(oracle(SCHEDULE, 1.0), SCHEDULE, images, DDIM_25, settings, progress=False).moved
    assert moved <= 2  # of 500 timesteps


@pytest.mark.parametrize(("s2", "v"), [(8.0, 4.0), (4.0, 8.0)])  # model under-/over-estimates the variance
def test_mismatched_oracle_matches_closed_form(s2: float, v: float) -> None:
    images = gaussian_images(16384, (1, 16, 16), s2)  # 2^22 pixels: the optimum to < 1/8 fine stride
    settings = SearchSettings(num_images=16384, max_batch=4096, rule=PER_T)
    cal = calibrate(oracle(SCHEDULE, v), SCHEDULE, images, MID_T, settings, progress=False)
    for i, t in enumerate(cal.t):
        expected = closed_form_t_hat(SCHEDULE, int(t), s2, v)
        assert sigma_gap(SCHEDULE, expected, t) > 10 * STRIDE  # a real shift, not the identity
        assert (cal.t_hat[i] < t) == (s2 > v)
        assert sigma_gap(SCHEDULE, cal.t_hat[i], expected) <= STRIDE + 1e-9, (t, cal.t_hat[i], expected)
        assert cal.band_lo[i] <= expected <= cal.band_hi[i]
        assert cal.loss_diff[i] < -10 * cal.loss_diff_se[i]  # the shift helps, by many standard errors
        assert cal.loss_diff[i] == pytest.approx(cal.loss_t_hat[i] - cal.loss_t[i], rel=1e-9)


def test_another_seed_agrees_within_the_bands() -> None:
    # new ε and new images; a real shift at 17 of 25 timesteps, inside the search window everywhere
    runs = [calibrate(oracle(SCHEDULE, 4.0), SCHEDULE, gaussian_images(64, (3, 16, 16), 6.0, seed=1234 + seed),
                      DDIM_25, SearchSettings(num_images=64, seed=seed, rule=PER_T, **QUICKSTART), progress=False)
            for seed in (0, 1)]
    for this, other in (runs, runs[::-1]):
        assert this.moved >= 15
        assert all(lo <= h <= hi for lo, h, hi in zip(this.band_lo, other.t_hat, this.band_hi, strict=True))
        expected = [closed_form_t_hat(SCHEDULE, int(t), 6.0, 4.0) for t in this.t[1:]]
        assert all(lo <= e <= hi for lo, e, hi in zip(this.band_lo[1:], expected, this.band_hi[1:], strict=True))
    width = np.subtract(runs[0].band_hi, runs[0].band_lo)
    assert np.median(width) < 40  # not agreement by vagueness: bands narrower than a DDIM-25 step


def test_decide_keeps_t_unless_the_gain_exceeds_the_threshold() -> None:
    # candidate 1 beats t by 1, 2, 3, 4 on four images: mean 2.5, s.d. 1.29, s.e. 0.645, so 3.87 s.e.
    reference = np.array([10.0, 10.0, 10.0, 10.0])
    losses = np.stack([reference, reference - [1.0, 2.0, 3.0, 4.0], reference + 5.0])
    cands, distance = np.array([500.0, 480.0, 520.0]), np.array([0.0, 1.0, 1.0])
    moved = decide(reference, cands, losses, distance, threshold=3.8)
    assert moved.t_hat == 480.0 and moved.loss_diff == -2.5
    assert moved.loss_diff_se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert (moved.band_lo, moved.band_hi) == (480.0, 500.0)  # 500 is excluded, nothing below 480 was scored
    kept = decide(reference, cands, losses, distance, threshold=3.9)
    assert kept.t_hat == 500.0 and kept.loss_diff == 0.0 and kept.loss_diff_se == 0.0
    assert (kept.band_lo, kept.band_hi) == (480.0, 520.0)  # t and the best tied; 520 is 7.5 above: excluded


def test_critical_value_uses_the_t_quantile() -> None:
    assert critical_value(0.0, 8) == 0.0
    assert critical_value(3.090232, 8) == pytest.approx(4.785, abs=1e-3)  # printed tables: t_7 at 0.999
    assert critical_value(3.0, 100_000) == pytest.approx(3.0, abs=1e-3)


def test_monotone_and_clamped_with_noisy_estimates() -> None:
    # 256 pixels: Monte-Carlo noise of several σ_rf strides, so unconstrained argmins zig-zag.
    images = gaussian_images(64, (1, 2, 2), 0.25)
    steps = ddim_timesteps(SCHEDULE.num_timesteps, 50)
    eps = oracle(SCHEDULE, 1.0)  # data variance 0.25 < 1: pushes t̂ up, to T−1 at large t
    cal = calibrate(eps, SCHEDULE, images, steps, SearchSettings(rule=PER_T), progress=False)
    assert cal.t == sorted(float(t) for t in steps)
    assert all(0.0 <= h <= SCHEDULE.num_timesteps - 1 for h in cal.t_hat)
    assert cal.t_hat[-1] == SCHEDULE.num_timesteps - 1  # clamped: optimum lies beyond T−1
    assert all(a <= b for a, b in zip(cal.t_hat, cal.t_hat[1:], strict=False))
    for i, t in enumerate(cal.t):  # argmin over a set containing t whenever the cap admits t
        if i == len(cal.t) - 1 or t <= cal.t_hat[i + 1]:
            assert cal.loss_t_hat[i] <= cal.loss_t[i]
    # the cap is doing work: independent per-timestep searches are not monotone
    free = [calibrate(eps, SCHEDULE, images, [t], SearchSettings(seed=i, rule=PER_T), progress=False).t_hat[0]
            for i, t in enumerate(steps)]
    assert any(a < b for a, b in zip(free, free[1:], strict=False))


def test_batching_and_seed_determinism() -> None:
    images = gaussian_images(20, (1, 3, 3), 2.0)
    eps = oracle(SCHEDULE, 1.0)
    small = calibrate(eps, SCHEDULE, images, [100, 400], SearchSettings(max_batch=7), progress=False)
    large = calibrate(eps, SCHEDULE, images, [400, 100], SearchSettings(max_batch=10_000), progress=False)
    assert small.t_hat == large.t_hat
    np.testing.assert_allclose(small.loss_t_hat, large.loss_t_hat, rtol=1e-12)
    other = calibrate(eps, SCHEDULE, images, [100, 400], SearchSettings(seed=1), progress=False)
    assert other.loss_t != small.loss_t


def test_calibrate_evaluates_candidates_in_batches_with_float_t() -> None:
    calls: list[tuple[int, torch.dtype]] = []
    base = oracle(SCHEDULE, 1.0)

    def eps(x: Tensor, c: Tensor) -> Tensor:
        calls.append((x.shape[0], c.dtype))
        assert c.shape == (x.shape[0],)
        return base(x, c)

    images = gaussian_images(10, (1, 2, 2), 1.0)
    calibrate(eps, SCHEDULE, images, [300], SearchSettings(num_images=8, max_batch=64), progress=False)
    assert all(dtype == torch.float32 for _, dtype in calls)
    assert max(n for n, _ in calls) == 64  # 8 candidates × 8 images per forward pass
    assert sum(n for n, _ in calls) % 8 == 0


def test_settings_and_timesteps_validated() -> None:
    with pytest.raises(ValueError, match="fine_stride"):
        SearchSettings(fine_stride=0.0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        SearchSettings(k=-1.0)
    with pytest.raises(ValueError, match="num_images must be >= 2"):
        SearchSettings(num_images=1)
    with pytest.raises(ValueError, match="at least 2 images"):
        calibrate(oracle(SCHEDULE, 1.0), SCHEDULE, torch.zeros(1, 1, 2, 2), [10], progress=False)
    with pytest.raises(ValueError, match="timesteps"):
        calibrate(oracle(SCHEDULE, 1.0), SCHEDULE, torch.zeros(2, 1, 2, 2), [1000], progress=False)
    with pytest.raises(ValueError, match="integers"):
        calibrate(oracle(SCHEDULE, 1.0), SCHEDULE, torch.zeros(2, 1, 2, 2), [10.5], progress=False)


# -- table -----------------------------------------------------------------------------------------------
def small_table(checkpoint: str | None = "abcdef0123456789") -> NoiseShiftTable:
    """A table with two square resolutions and one non-square one."""
    table = NoiseShiftTable.new(SCHEDULE, checkpoint=checkpoint, data={"source": "test"})
    table.add("32", Calibration([0, 500, 999], [0, 400, 999], [1.0, 0.5, 0.2], [1.0, 0.4, 0.2]))
    table.add("128", Calibration([0, 500, 999], [10, 600, 999], [1.0, 0.5, 0.2], [0.9, 0.4, 0.2]))
    table.add(resolution_key(96, 128), Calibration([100.0], [90.0], [0.3], [0.2]))
    return table


def table_with_uncertainty() -> NoiseShiftTable:
    """small_table plus a resolution written by the noise-aware search (loss differences, s.e., bands)."""
    table = small_table()
    table.settings["k"] = 3.0
    table.add("48", Calibration([0, 500, 999], [0, 450, 999], [1.0, 0.5, 0.2], [1.0, 0.45, 0.2],
                                loss_diff=[0.0, -0.05, 0.0], loss_diff_se=[0.0, 0.01, 0.0],
                                band_lo=[0.0, 440.0, 990.0], band_hi=[3.0, 470.0, 999.0]))
    return table


def test_resolution_key() -> None:
    assert resolution_key(64, 64) == "64"
    assert resolution_key(96, 128) == "96x128"
    assert table_with_uncertainty().resolutions() == ["32", "48", "96x128", "128"]  # by pixel count


def test_save_load_round_trip(tmp_path: Path) -> None:
    table = table_with_uncertainty()
    path = tmp_path / "sub" / "noiseshift.json"
    table.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["noiseshift.json"]  # no temp file left behind
    doc = json.loads(path.read_text())
    assert doc["format_version"] == 1 and doc["schedule"] == SCHEDULE.describe()
    expected = {"t": [100.0], "t_hat": [90.0], "loss_t": [0.3], "loss_t_hat": [0.2], "rule": "per_timestep"}
    assert doc["resolutions"]["96x128"] == expected  # a table without uncertainty (as before issue 12)
    assert doc["resolutions"]["48"]["band_lo"] == [0.0, 440.0, 990.0]
    loaded = NoiseShiftTable.load(path, schedule=SCHEDULE, checkpoint="abcdef0123456789")
    assert loaded.to_dict() == table.to_dict()
    assert loaded["128"] == table["128"] and not loaded["128"].has_uncertainty
    assert loaded["48"] == table["48"] and loaded["48"].loss_diff_se == [0.0, 0.01, 0.0]


def test_tables_written_before_issue_12_still_load(tmp_path: Path) -> None:
    doc = table_with_uncertainty().to_dict()
    doc["settings"].pop("k")
    for entry in doc["resolutions"].values():
        for name in ("loss_diff", "loss_diff_se", "band_lo", "band_hi"):
            entry.pop(name, None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    loaded = NoiseShiftTable.load(path, schedule=SCHEDULE, checkpoint="abcdef0123456789")
    assert loaded["48"].t_hat == [0.0, 450.0, 999.0] and loaded["48"].band_lo is None
    assert loaded.time_cond(48, 48)(torch.tensor([500.0])).item() == 450.0


def test_load_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with pytest.raises(FileNotFoundError, match="t.json"):
        NoiseShiftTable.load(path)
    path.write_text('{"format_version": 1, "sched')
    with pytest.raises(ValueError, match="not valid JSON.*recalibrate"):
        NoiseShiftTable.load(path)
    doc = small_table().to_dict()
    path.write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        NoiseShiftTable.load(path)
    path.write_text(json.dumps({**doc, "resolutions": {"64": {"t": [1, 0], "t_hat": [1, 0]}}}))
    with pytest.raises(ValueError, match="malformed"):
        NoiseShiftTable.load(path)


def test_load_rejects_other_schedule_and_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    small_table().save(path)
    cosine = NoiseSchedule(kind="cosine")
    with pytest.raises(ValueError) as info:
        NoiseShiftTable.load(path, schedule=cosine)
    message = str(info.value)
    assert "kind=linear" in message and "kind=cosine" in message
    assert SCHEDULE.describe()["fingerprint"] in message and cosine.describe()["fingerprint"] in message
    with pytest.raises(ValueError, match="abcdef0123456789.*0000000000000000"):
        NoiseShiftTable.load(path, checkpoint="0000000000000000")
    NoiseShiftTable.load(path, checkpoint=None)  # no hash to compare: accepted
    small_table(checkpoint=None).save(path)
    NoiseShiftTable.load(path)  # nothing to compare on either side: accepted
    with pytest.raises(ValueError, match=r"t\.json does not name the weights .* recalibrate"):
        NoiseShiftTable.load(path, checkpoint="0000000000000000")  # a table that names no weights: refused


def test_weights_hash_names_the_weights_and_the_table_checks_it(tmp_path: Path) -> None:
    net = torch.nn.Linear(3, 2)
    same = torch.nn.Linear(3, 2)
    same.load_state_dict(net.state_dict())
    assert weights_hash(net) == weights_hash(same) and len(weights_hash(net)) == 16
    with torch.no_grad():
        same.bias[0] += 1e-6
    assert weights_hash(net) != weights_hash(same)
    path = tmp_path / "t.json"
    table = small_table(checkpoint=None)
    table.weights = weights_hash(net)
    table.save(path)
    assert json.loads(path.read_text())["weights"] == weights_hash(net)
    NoiseShiftTable.load(path, weights=weights_hash(net), checkpoint="ffffffffffffffff")  # weights decide
    with pytest.raises(ValueError, match=f"weights {weights_hash(net)} but the model's weights hash is "
                                         f"{weights_hash(same)}"):
        NoiseShiftTable.load(path, weights=weights_hash(same))


@pytest.mark.parametrize(("resolution", "message"), [
    ({"t_hat": [0, float("nan"), 999]}, "t_hat holds non-finite"),
    ({"loss_t": [1.0, float("inf"), 0.2]}, "loss_t holds non-finite"),
    ({"t_hat": [0, 600, 400]}, "t_hat must be non-decreasing"),
    ({"t_hat": [0, 400]}, "equally long"),
    ({"t_hat": [0, 400, 1200]}, r"t_hat spans 0.0..1200.0, outside \[0, 999\]"),
    ({"t": [-5, 500, 999]}, r"t spans -5.0..999.0, outside"),
    ({"loss_diff": [0.0, -0.1, 0.0]}, r"holds \['loss_diff'\] but not all of"),
])
def test_load_rejects_impossible_tables_naming_the_file(tmp_path: Path, resolution, message) -> None:
    doc = small_table().to_dict()
    doc["resolutions"]["32"] = {**doc["resolutions"]["32"], **resolution}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))  # json writes NaN / Infinity, as a hand-edited or buggy table can hold
    with pytest.raises(ValueError, match=f"bad.json is malformed .*resolution 32.*{message}"):
        NoiseShiftTable.load(path)


@pytest.mark.parametrize(("resolution", "message"), [
    ({"loss_diff_se": [0.0, -0.01, 0.0]}, "negative standard errors"),
    ({"loss_diff": [0.0, float("nan"), 0.0]}, "loss_diff holds non-finite"),
    ({"band_lo": [0.0, 455.0, 990.0]}, r"t_hat must lie within \[band_lo, band_hi\]"),
    ({"band_hi": [3.0, 445.0, 999.0]}, r"t_hat must lie within \[band_lo, band_hi\]"),
    ({"band_hi": [3.0, 470.0, 1005.0]}, r"band_hi spans 3.0..1005.0, outside \[0, 999\]"),
    ({"band_lo": [0.0, 440.0]}, "equally long"),
])
def test_load_rejects_impossible_uncertainty(tmp_path: Path, resolution, message) -> None:
    doc = table_with_uncertainty().to_dict()
    doc["resolutions"]["48"] = {**doc["resolutions"]["48"], **resolution}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"bad.json is malformed .*resolution 48.*{message}"):
        NoiseShiftTable.load(path)


def test_checkpoint_hash(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    payload = bytes(range(256)) * 9000  # > 1 MiB: several chunks
    path.write_bytes(payload)
    assert checkpoint_hash(path) == hashlib.sha256(payload).hexdigest()[:16]


def test_time_cond_interpolates_and_keeps_device_dtype() -> None:
    cond = small_table().time_cond(32, 32)
    t = torch.tensor([0.0, 250.0, 500.0, 999.0], dtype=torch.float64)
    out = cond(t)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), [0.0, 200.0, 400.0, 999.0])
    assert cond(torch.tensor([750], dtype=torch.long)).dtype == torch.float32
    edge = small_table().time_cond(96, 128)(torch.tensor([50.0, 100.0, 999.0]))  # outside: constant offset
    np.testing.assert_allclose(edge.numpy(), [40.0, 90.0, 989.0])


def test_missing_resolution_and_fallbacks() -> None:
    table = small_table()
    with pytest.raises(ValueError) as info:
        table.time_cond(64, 64)
    message = str(info.value)
    assert "64" in message and "['32', '96x128', '128']" in message and "fallback" in message
    t = torch.tensor([500.0])
    assert table.time_cond(64, 64, fallback="identity")(t).item() == 500.0
    assert table.time_cond(40, 40, fallback="nearest")(t).item() == pytest.approx(400.0)  # 32² is nearest
    assert table.time_cond(120, 120, fallback="nearest")(t).item() == pytest.approx(600.0)  # 128²


def test_merge_requires_same_schedule() -> None:
    table = small_table()
    other = NoiseShiftTable.new(NoiseSchedule(kind="cosine"))
    with pytest.raises(ValueError, match="different schedules"):
        table.merge(other)
    extra = NoiseShiftTable.new(SCHEDULE)
    extra.add("64", Calibration([1.0], [1.0], [0.0], [0.0]))
    table.merge(extra)
    assert "64" in table.resolutions()


# -- analytic baseline -----------------------------------------------------------------------------------
def test_analytic_shift() -> None:
    t = torch.tensor([100.0, 300.0, 500.0, 700.0])
    same = AnalyticShift(SCHEDULE, train_pixels=64 * 64, sample_pixels=64 * 64)(t)
    assert same.dtype == torch.float32 and torch.equal(same, t)
    shift = AnalyticShift(SCHEDULE, train_pixels=64 * 64, sample_pixels=128 * 128)
    t_hat = shift(t)
    assert t_hat.dtype == torch.float32 and bool((t_hat < t).all())
    lam = SCHEDULE.log_snr_at(t_hat.double()) - SCHEDULE.log_snr_at(t)
    np.testing.assert_allclose(lam.numpy(), math.log(4.0), atol=1e-6)
    down = AnalyticShift(SCHEDULE, train_pixels=128 * 128, sample_pixels=64 * 64)(t)
    assert bool((down > t).all())


# -- samplers feed t̂ while the coefficients stay nominal -------------------------------------------------
def test_ddim_feeds_time_cond_to_eps() -> None:
    table = small_table()

    def run(time_cond: TimeCond | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        xs: list[Tensor] = []
        ts: list[Tensor] = []

        def eps(x: Tensor, c: Tensor) -> Tensor:  # ignores c, so trajectories agree iff coefficients do
            xs.append(x.clone())
            ts.append(c.clone())
            return 0.1 * x

        x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        out = ddim_sample(eps, SCHEDULE, x_T, steps=10, time_cond=time_cond)
        return out, xs, ts

    out_shift, xs_shift, ts_shift = run(table.time_cond(32, 32))
    out_id, xs_id, ts_id = run(None)
    nominal = ddim_timesteps(SCHEDULE.num_timesteps, 10)
    assert [c[0].item() for c in ts_id] == [float(t) for t in nominal]
    expected = np.interp(nominal, [0, 500, 999], [0, 400, 999])
    np.testing.assert_allclose([c[0].item() for c in ts_shift], expected, rtol=1e-6)
    assert any(a[0].item() != b[0].item() for a, b in zip(ts_shift, ts_id, strict=True))
    assert torch.equal(out_shift, out_id)
    assert all(torch.equal(a, b) for a, b in zip(xs_shift, xs_id, strict=True))


# -- what `mrdiff calibrate` says ------------------------------------------------------------------------
def test_calibrate_warns_only_when_the_images_cannot_resolve_a_shift() -> None:
    settings = dict(max_batch=4096, rule=PER_T, **QUICKSTART)

    def run(num_images: int, s2: float, v: float) -> tuple[Calibration, SearchSettings]:
        s = SearchSettings(num_images=num_images, **settings)
        images = gaussian_images(num_images, (3, 16, 16), s2)
        return calibrate(oracle(SCHEDULE, v), SCHEDULE, images, DDIM_25, s, progress=False), s

    few, s = run(3, 6.0, 4.0)  # a real shift at most timesteps, but 3 images show it at few of them
    assert few.moved <= 5
    warning = resolution_warning("16", few, SCHEDULE, s, 3)
    assert warning is not None and "with 3 images" in warning and "--num_images" in warning
    many, s = run(64, 6.0, 4.0)  # the same shift, resolved
    assert many.moved >= 15 and resolution_warning("16", many, SCHEDULE, s, 64) is None
    assert summary(many, 3.0).startswith(f"t̂ moved at {many.moved} of 25 timesteps (k = 3)")
    exact, s = run(256, 4.0, 4.0)  # no shift, and the data say so: t kept without a warning
    assert exact.moved == 0 and resolution_warning("16", exact, SCHEDULE, s, 256) is None
    assert unresolved(few, SCHEDULE, s).mean() > 0.5 > unresolved(exact, SCHEDULE, s).mean()


def test_plot_draws_bands_and_tables_without_them(tmp_path: Path) -> None:
    import matplotlib.image

    path = plot_table(table_with_uncertainty(), tmp_path / "noiseshift.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (400, 600)
    plot_table(small_table(), tmp_path / "old.png")  # no bands to draw: still a plot
    assert (tmp_path / "old.png").stat().st_size > 0
