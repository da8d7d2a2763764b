"""Detail metrics and intervals of the evidence report (mrdiff.metrics.detail)."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrdiff.data.synthetic import render_canvas, sample_scene
from mrdiff.diffusion.samplers import SamplingSettings
from mrdiff.metrics.detail import (
    bootstrap_interval,
    neighbour_difference,
    radial_power_spectrum,
    sky_colour,
    spectrum_distance,
    wilson_interval,
)


def test_wilson_interval_matches_the_closed_form_values():
    lo, hi = wilson_interval(50, 100)  # p = 0.5, n = 100: 0.5 ± 0.0962 (Wilson 1927, z = 1.96)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(0, 20)  # no successes: the lower end is 0 and the upper end is z²/(n + z²)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (20 + 1.96**2), rel=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_bootstrap_interval_covers_the_mean_at_about_its_standard_error():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    lo, hi = bootstrap_interval(values)
    half = 1.96 * 2.0 / math.sqrt(400)  # 0.196
    assert lo < values.mean() < hi and (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_spectrum_puts_a_sinusoid_in_its_frequency_bin():
    size, cycles = 32, 8  # 8 cycles over 32 pixels = 0.25 cycles per pixel
    x = torch.arange(size, dtype=torch.float64)
    wave = torch.sin(2 * math.pi * cycles * x / size).expand(size, size)
    images = wave.expand(1, 3, size, size).float()
    spectrum = radial_power_spectrum(images)[0]  # 16 bins of 1/32 c/px over (0, 0.5]
    assert spectrum.argmax() == 7  # (7/32, 8/32] holds 0.25
    assert spectrum[7] / spectrum.sum() > 0.99


def test_an_upsampled_image_lacks_the_ground_truths_high_frequencies():
    scenes = [sample_scene(i) for i in range(96)]
    truth = torch.stack([render_canvas(s, 64, 64) for s in scenes])
    low = torch.stack([render_canvas(s, 32, 32) for s in scenes])
    upsampled = F.interpolate(low, size=(64, 64), mode="bicubic", antialias=True, align_corners=False)
    again = torch.stack([render_canvas(sample_scene(1000 + i), 64, 64) for i in range(96)])
    ref = radial_power_spectrum(truth)
    other_scenes = spectrum_distance(radial_power_spectrum(again), ref)  # same statistics: 0.023 measured
    assert other_scenes < 0.05
    assert spectrum_distance(radial_power_spectrum(upsampled), ref) > 4 * other_scenes  # 0.134 measured
    noisy = (truth + 0.2 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert neighbour_difference(noisy).mean() > 3 * neighbour_difference(truth).mean()


def test_neighbour_difference_and_sky_colour_of_known_images():
    flat = torch.full((2, 3, 8, 8), 0.25)
    assert np.allclose(neighbour_difference(flat), 0.0)
    stripes = torch.zeros(1, 3, 8, 8)
    stripes[..., ::2] = 1.0  # columns alternate 1, 0: |dx| = 1 everywhere, |dy| = 0
    assert neighbour_difference(stripes)[0] == pytest.approx(0.5)
    image = torch.zeros(1, 3, 8, 8)
    image[:, 0, :2] = -0.5  # top quarter (2 rows) red at −0.5
    assert sky_colour(image)[0].tolist() == pytest.approx([-0.5, 0.0, 0.0])


def test_evidence_never_overwrites_an_earlier_report(tmp_path):
    from mrdiff.evidence.report import main

    (tmp_path / "table.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a report"):
        main(["--out", str(tmp_path), "--models", "fixed"])
    assert (tmp_path / "table.json").read_text() == "{}"


@pytest.mark.parametrize("args, message", [
    (["--variants", "plain,noiseshfit"], "unknown --variants ['noiseshfit']"),
    (["--resolutions", "24,32", "--shifted-at", "64"], "--shifted-at 64 names resolutions outside --resolutions"),
    (["--models", "fixed,tuned=nowhere.pt"], "no weights at tuned=nowhere.pt"),
    (["--models", "fixed=nowhere.pt"], "needs its own non-empty label outside fixed"),
    (["--models", "a=x.pt,a=y.pt"], "needs its own non-empty label"),
    (["--models", "multires", "--upsample", "fixed"], "--upsample fixed names models outside --models"),
    (["--variants", "plain,redenoise", "--training-free", "fixd"], "--training-free fixd names models outside"),
])
def test_evidence_rejects_rows_it_cannot_sample_before_any_work(tmp_path, args, message):
    from mrdiff.evidence.report import main

    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["--out", str(tmp_path / "report"), "--models", "fixed", "--weights", str(tmp_path), *args])
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
def test_evidence_report_end_to_end_with_tiny_exported_models(tmp_path):
    """Two exported models through `mrdiff evidence report`: every row and column, the upsample baseline
    above R only, the sampler check, and a cell equal to the structure score of the model's own samples."""
    import json

    from mrdiff.evidence.report import main
    from mrdiff.exported import load
    from mrdiff.metrics.structure import stacked_horizons, sun_counts
    from mrdiff.module import DiffusionModule
    from mrdiff.nn.unet import UNet

    nets = {"fixed": {}, "multires": {"coord_frequencies": 2, "safa_levels": [1], "scale_ref": 16.0}}
    for name, extra in nets.items():
        net_args = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                    "dropout": 0.0, **extra}
        torch.manual_seed(0)
        module = DiffusionModule(UNet(**net_args), train_resolution=16, train_scales=[16, 32])
        for p in module.net.parameters():  # a non-zero output layer, so samples differ between models
            p.data.add_(0.01 * torch.randn_like(p))
        torch.save({"state_dict": {k: v.half() for k, v in module.state_dict().items()}, "net": net_args,
                    "module": {"train_resolution": 16, "train_scales": [16, 32]}, "data": {}, "global_step": 7,
                    "command": "test", "train_seconds": 1.0}, tmp_path / f"{name}.pt")
        (tmp_path / name).mkdir()  # the --weights layout: <weights>/<name>/seed0.pt
        (tmp_path / name / "seed0.pt").write_bytes((tmp_path / f"{name}.pt").read_bytes())
    out = tmp_path / "report"
    tuned = tmp_path / "elsewhere" / "tuned.pt"  # a LABEL=PATH row: the multires weights under another name
    tuned.parent.mkdir()
    tuned.write_bytes((tmp_path / "multires.pt").read_bytes())
    baseline = tmp_path / "elsewhere" / "baseline.pt"  # the fixed weights under another name, upsampled too
    baseline.write_bytes((tmp_path / "fixed.pt").read_bytes())
    main(["--models", f"fixed,multires,tuned={tuned},baseline={baseline}", "--upsample", "fixed,baseline",
          "--weights", str(tmp_path), "--out", str(out),
          "--resolutions", "16,32", "--num-samples", "4", "--batch-size", "4", "--sampler", "dpmpp_2m",
          "--steps", "2", "--variants", "plain,analytic,redenoise", "--training-free", "fixed,baseline",
          "--variant-args", "redenoise.t0=0", "--shifted-at", "32", "--num-reference", "8",
          "--sampler-check", "2", "--device", "cpu", "--eta", "1"])
    report = json.loads((out / "table.json").read_text())
    cells = report["cells"]
    assert set(cells) == {"ground truth", "fixed", "fixed + analytic", "multires", "multires + analytic",
                          "fixed + upsample", "tuned", "tuned + analytic", "baseline", "baseline + analytic",
                          "baseline + upsample", "fixed + redenoise", "baseline + redenoise"}  # not multires, tuned
    for metric in ("one_sun_rate", "spectrum_distance"):  # re-denoising from t₀ = 0: the upsampled samples at R
        assert cells["fixed + redenoise"]["32"][metric] == pytest.approx(cells["fixed + upsample"]["32"][metric])
    assert cells["baseline + upsample"]["32"]["spectrum_distance"] == pytest.approx(
        cells["fixed + upsample"]["32"]["spectrum_distance"])  # same weights, same seeds, same upsampled row
    for key in ("16", "32"):  # a LABEL=PATH row: the same weights on the same seeds give the same cell
        assert cells["tuned"][key]["one_sun_rate"] == cells["multires"][key]["one_sun_rate"]
        assert cells["tuned"][key]["spectrum_distance"] == pytest.approx(cells["multires"][key]["spectrum_distance"])
    assert set(cells["fixed + upsample"]) == {"32"} and set(cells["fixed"]) == {"16", "32"}
    assert set(cells["fixed + analytic"]) == set(cells["multires + analytic"]) == {"32"}  # --shifted-at 32
    assert report["meta"]["sampler"] == "dpmpp_2m" and report["diagnostics"]["fixed"]["global_step"] == 7
    assert set(report["diagnostics"]["multires"]["samplers"]) == {"DDIM-50", "DDIM-50 (η = 1)", "DDPM-1000",
                                                                  "DPM-Solver++(2M)-10"}
    model, _ = load(tmp_path / "fixed.pt")
    images = model.sample([0, 1, 2, 3], 16, 16, sampling=SamplingSettings("dpmpp_2m", 2))
    assert cells["fixed"]["16"]["one_sun_rate"] == pytest.approx(float((sun_counts(images) == 1).mean()))
    tiled = int((stacked_horizons(images) > 0.25).sum())  # images with over a quarter of their columns stacked
    assert cells["fixed"]["16"]["stacked_horizon_rate"] == tiled / 4
    lo, hi = cells["fixed"]["16"]["stacked_horizon_rate_lo"], cells["fixed"]["16"]["stacked_horizon_rate_hi"]
    assert lo <= tiled / 4 <= hi and hi - lo > 0.4  # Wilson at n = 4 is wide whatever the count
    markdown = (out / "table.md").read_text()
    assert "**images with stacked horizons" in markdown
    assert "DPM-Solver++(2M)-2" in markdown and "**Samplers at R" in markdown and (out / "samples.png").is_file()
    assert cells["ground truth"]["32"]["spectrum_distance"] > 0  # other renders than the reference set


def test_export_halves_the_weights_but_keeps_the_fourier_frequencies_exact(tmp_path):
    import yaml

    from mrdiff.exported import export, load
    from mrdiff.module import DiffusionModule
    from mrdiff.nn.unet import UNet

    net_args = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                "coord_frequencies": 4, "coord_max_frequency": 8.0, "coord_min_frequency": 0.25, "safa_levels": [1],
                "scale_ref": 16.0}
    module = DiffusionModule(UNet(**net_args), train_resolution=16, train_scales=[16, 32])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"net": {"init_args": net_args}}, "data": {}}))
    torch.save({"state_dict": module.state_dict(), "global_step": 3,
                "hyper_parameters": {"train_resolution": 16, "train_scales": [16, 32]}},
               run / "checkpoints" / "last.ckpt")
    export(run / "checkpoints" / "last.ckpt", tmp_path / "m.pt", "test", 1.0)
    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    assert payload["state_dict"]["net.stem.weight"].dtype == torch.float16
    loaded, _ = load(tmp_path / "m.pt")
    frequencies = loaded.net.coords.matrix[:4, 0]
    assert torch.equal(frequencies, module.net.coords.matrix[:4, 0])  # 0.25 … 8 exactly, not fp16-rounded
    assert float(frequencies[1]) != float(frequencies[1].half())  # a frequency fp16 would have moved


def test_report_figure_shows_samples_at_twice_their_pixel_size(tmp_path):
    """A strip of eight 64² samples is 8 · 65 + 1 = 521 px wide and eight 32² samples 265 px: drawn at 2×,
    the figures differ by 512 px in width and 64 px in height, whatever the layout around them."""
    from PIL import Image

    from mrdiff.evaluation.report import save_figure

    sizes = {}
    for side in (32, 64):
        path = tmp_path / f"{side}.png"
        save_figure({"model": {"c": torch.zeros(8, 3, side, side)}}, ["c"], path)
        sizes[side] = Image.open(path).size
    assert sizes[64][0] - sizes[32][0] == pytest.approx(512, abs=4)
    assert sizes[64][1] - sizes[32][1] == pytest.approx(64, abs=4)


def test_report_summary_reads_r_and_the_chosen_size_from_the_report(tmp_path):
    """`mrdiff evidence summary`: the one-sun rate at R, the other metrics at --at, each with the report's own
    interval; a cell the report lacks is a dash; the table is also written beside the report."""
    import json

    from mrdiff.evidence.summary import main
    cell = {"one_sun_rate": 0.8025, "one_sun_rate_lo": 0.761, "one_sun_rate_hi": 0.838, "mean_num_suns": 1.2,
            "mean_num_suns_lo": 1.155, "mean_num_suns_hi": 1.25, "stacked_horizon_rate": 0.8675,
            "stacked_horizon_rate_lo": 0.831, "stacked_horizon_rate_hi": 0.897, "spectrum_distance": 0.0921,
            "spectrum_distance_lo": 0.085, "spectrum_distance_hi": 0.1, "radius_error": 0.3192}
    report = {"meta": {"command": "python -m mrdiff.evidence …", "base_resolution": 32},
              "cells": {"fixed": {"32": {"one_sun_rate": 0.9975, "one_sun_rate_lo": 0.986, "one_sun_rate_hi": 1.0},
                                  "64": cell},
                        "fixed + upsample": {"64": {"one_sun_rate": 1.0}}}}
    (tmp_path / "table.json").write_text(json.dumps(report))
    main([str(tmp_path), "--at", "64x64"])
    lines = (tmp_path / "summary_64.md").read_text().splitlines()
    assert lines[2].startswith("| | one-sun rate at R (32) | one-sun rate at 64 |")
    assert lines[4] == ("| fixed | 1.00 [0.99, 1.00] | 0.80 [0.76, 0.84] | 1.20 [1.16, 1.25] | 0.87 [0.83, 0.90] | "
                        "0.092 [0.085, 0.100] | 0.319 |")
    assert lines[5] == "| fixed + upsample | – | 1.00 | – | – | – | – |"


def test_report_summary_adds_kid_at_r_and_at_the_chosen_size_when_the_report_has_it(tmp_path):
    import json

    from mrdiff.evidence.summary import main

    kid = {"kid": 0.0123, "kid_lo": 0.0101, "kid_hi": 0.0145}
    report = {"meta": {"command": "mrdiff evidence report …", "base_resolution": 32},
              "cells": {"fixed": {"32": {"one_sun_rate": 1.0, "kid": 0.002}, "64": {"one_sun_rate": 0.8, **kid}}}}
    (tmp_path / "table.json").write_text(json.dumps(report))
    main([str(tmp_path), "--at", "64"])
    lines = (tmp_path / "summary_64.md").read_text().splitlines()
    assert lines[2].endswith("| KID at R (32) | KID at 64 |")
    assert lines[4] == "| fixed | 1.00 | 0.80 | – | – | – | – | 0.0020 | 0.0123 [0.0101, 0.0145] |"


def test_paired_differences_are_row_minus_plain_on_the_same_seeds():
    """One seed of four gains its sun: Δ one-sun = +0.25 exactly; identical images differ by 0 everywhere."""
    from mrdiff.data.synthetic import render_canvas, sample_scene
    from mrdiff.evaluation.scores import paired_differences
    from mrdiff.metrics.structure import sun_mask

    truth = torch.stack([render_canvas(sample_scene(i), 32, 32) for i in range(4)])
    sky = truth[:, :, :1].expand_as(truth)  # every row the top row's colour: no sun in the first image …
    base = torch.where(sun_mask(truth[:1])[:, None], sky[:1], truth[:1])
    base = torch.cat([base, truth[1:]])
    same = paired_differences(truth, truth, truth)
    assert same["one_sun_rate"] == 0 and same["spectrum_distance"] == 0 and same["sky_red"] == 0
    gained = paired_differences(truth, base, truth)
    assert gained["one_sun_rate"] == 0.25 and gained["one_sun_rate_lo"] <= 0.25 <= gained["one_sun_rate_hi"]


def test_tune_picks_the_best_layout_and_breaks_near_ties_by_detail(tmp_path):
    """Layout = one-sun − stacked horizons decides; within 0.01 the lower spectrum distance wins."""
    import json

    from mrdiff.evidence.tune import main

    def report(name, t0, stride, redenoise, window):
        folder = tmp_path / name
        folder.mkdir()
        meta = {"variant_args": {"redenoise": {"t0": t0}, "window_fusion": {"stride": stride}}}
        cells = {"fixed + redenoise": {"64": redenoise}, "fixed + window_fusion": {"64": window}, "fixed": {"64": {}}}
        (folder / "table.json").write_text(json.dumps({"meta": meta, "cells": cells}))
        return str(folder)

    cell = lambda one, stacked, spectrum: {"one_sun_rate": one, "stacked_horizon_rate": stacked,  # noqa: E731
                                           "spectrum_distance": spectrum}
    a = report("a", 300, 8, cell(0.9, 0.1, 0.10), cell(0.70, 0.50, 0.05))
    b = report("b", 500, 16, cell(0.9, 0.3, 0.01), cell(0.705, 0.50, 0.04))
    main([a, b, "--at", "64", "--out", str(tmp_path / "out")])
    choice = json.loads((tmp_path / "out" / "choice.json").read_text())
    assert choice["choice"]["redenoise"]["setting"] == {"t0": 300}  # 0.8 beats 0.6 whatever its detail
    assert choice["choice"]["window_fusion"]["setting"] == {"stride": 16}  # 0.205 vs 0.20: a tie, 0.04 < 0.05
    assert choice["variant_args"] == "redenoise.t0=300,window_fusion.stride=16"
    with pytest.raises(SystemExit, match="already holds a choice"):  # never overwritten
        main([a, b, "--at", "64", "--out", str(tmp_path / "out")])


def test_summary_of_several_reports_puts_their_rows_in_one_table(tmp_path):
    import json

    from mrdiff.evidence.summary import main

    for name, rows in (("a", {"ground truth": 1.0, "canvases": 0.83}), ("b", {"ground truth": 0.5, "fixed + x": 0.9})):
        (tmp_path / name).mkdir()
        cells = {row: {"64": {"one_sun_rate": v}} for row, v in rows.items()}
        (tmp_path / name / "table.json").write_text(json.dumps({"meta": {"command": f"cmd {name}",
                                                                         "base_resolution": 32}, "cells": cells}))
    with pytest.raises(SystemExit, match="several reports need --out"):
        main([str(tmp_path / "a"), str(tmp_path / "b"), "--at", "64"])
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--at", "64", "--out", str(tmp_path / "both.md")])
    lines = (tmp_path / "both.md").read_text().splitlines()
    assert "cmd a`; `cmd b" in lines[0]
    assert [line.split(" | ")[0] for line in lines[4:]] == ["| ground truth", "| canvases", "| fixed + x"]
    assert lines[4].split(" | ")[2] == "1.00"  # the first report's ground truth


def summary_at_64(folder: Path, cells: dict[str, dict], name: str, verdict: str, *more: str) -> list[str]:
    """`cells` (row → its metrics at 64) as a report in `folder`, summarised at 64 with --verdict into folder/name."""
    import json

    from mrdiff.evidence.summary import main

    (folder / "table.json").write_text(json.dumps({"meta": {"command": "cmd", "base_resolution": 32},
                                                   "cells": {row: {"64": c} for row, c in cells.items()}}))
    main([str(folder), "--at", "64", "--verdict", verdict, "--out", str(folder / name), *more])
    return (folder / name).read_text().splitlines()


def test_summary_verdict_compares_the_best_trained_and_training_free_rows_by_their_intervals(tmp_path):
    """--verdict: per metric the best trained row (of those named) against the best training-free row (methods
    and upsampling, not the plain fixed model); then each training-free row against the best trained row of each
    metric: disjoint intervals win, overlapping ones tie, a missing interval decides nothing; the verdict names a
    row that dominates the trained models, says when they dominate every row, and otherwise calls a trade-off."""

    from mrdiff.evidence.summary import main

    def cell(one, one_lo, one_hi, kid, kid_lo, kid_hi, radius):
        return {"one_sun_rate": one, "one_sun_rate_lo": one_lo, "one_sun_rate_hi": one_hi, "kid": kid,
                "kid_lo": kid_lo, "kid_hi": kid_hi, "radius_error": radius}

    cells = {"ground truth": cell(1.0, 0.99, 1.0, 0.0, -0.001, 0.001, 0.01),
             "fixed": cell(0.95, 0.9, 0.97, 0.01, 0.005, 0.015, 0.3),  # plain fixed: in neither group
             "mr_a": cell(0.80, 0.76, 0.84, 0.05, 0.045, 0.055, 0.06),
             "mr_b": cell(0.70, 0.66, 0.74, 0.04, 0.035, 0.045, 0.07),
             "fixed + redenoise": cell(1.00, 0.99, 1.00, 0.20, 0.18, 0.22, 0.16),
             "fixed + upsample": cell(0.82, 0.78, 0.86, 0.09, 0.08, 0.10, 0.05)}

    lines = summary_at_64(tmp_path, cells, "a.md", "mr_a,mr_b")
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and " | " in line}
    assert rows["one-sun rate"] == ("| one-sun rate | mr_a 0.80 [0.76, 0.84] | fixed + redenoise 1.00 [0.99, 1.00] "
                                    "| training-free |")
    assert rows["KID"] == "| KID | mr_b 0.0400 [0.0350, 0.0450] | fixed + upsample 0.0900 [0.0800, 0.1000] | trained |"
    assert rows["sun radius error"].endswith("| fixed + upsample 0.050 | untested (no interval) |")
    assert rows["fixed + redenoise"] == "| fixed + redenoise | better | ? | worse | trade-off |"
    assert rows["fixed + upsample"] == "| fixed + upsample | = | ? | worse | dominated |"
    assert "| fixed |" not in "\n".join(lines[lines.index(rows["KID"]):])  # the plain fixed model is no baseline
    assert lines[-1] == ("Verdict: a trade-off: no training-free row dominates the trained models; 1 dominated, "
                         "1 trade off.")
    cells["fixed + redenoise"] = cell(0.78, 0.74, 0.82, 0.20, 0.18, 0.22, 0.16)  # now within mr_a's interval
    cells["fixed + upsample"] = cell(0.75, 0.70, 0.80, 0.09, 0.08, 0.10, 0.05)
    lines = summary_at_64(tmp_path, cells, "b.md", "mr_a,mr_b")
    assert ("| one-sun rate | mr_a 0.80 [0.76, 0.84] | fixed + redenoise 0.78 [0.74, 0.82] | neither (intervals "
            "overlap) |") in lines
    assert lines[-1] == "Verdict: the trained models dominate every training-free row."
    cells["fixed + redilation"] = cell(0.95, 0.93, 0.97, 0.042, 0.037, 0.047, 0.2)  # better, and KID overlaps mr_b
    verdict = summary_at_64(tmp_path, cells, "c.md", "mr_a,mr_b")[-1]
    assert verdict == "Verdict: the trained models are dominated by fixed + redilation."
    with pytest.raises(SystemExit, match="--verdict names \\['mr_c'\\]"):
        main([str(tmp_path), "--at", "64", "--verdict", "mr_c", "--out", str(tmp_path / "x.md")])


def test_a_later_report_of_the_same_samples_adds_the_metrics_the_first_lacks(tmp_path):
    """merged(): the first report's cell stands; a later one of the same row adds its missing metrics (here the
    radius error's interval) only when the numbers both have agree, i.e. when they scored the same samples."""
    from mrdiff.evidence.summary import merged

    first = {"one_sun_rate": 0.83, "spectrum_distance": 0.043, "radius_error": 0.056, "kid": 0.0558}
    same = {"one_sun_rate": 0.83, "spectrum_distance": 0.043, "radius_error": 0.056, "radius_error_lo": 0.04,
            "radius_error_hi": 0.07, "kid": 0.9}
    other = {**same, "one_sun_rate": 0.80}
    meta = {"command": "c", "base_resolution": 32}
    out = merged([{"meta": meta, "cells": {"m": {"64": first}}}, {"meta": meta, "cells": {"m": {"64": same}}}])
    assert out["cells"]["m"]["64"] == {**first, "radius_error_lo": 0.04, "radius_error_hi": 0.07}  # kid kept
    out = merged([{"meta": meta, "cells": {"m": {"64": first}}}, {"meta": meta, "cells": {"m": {"64": other}}}])
    assert out["cells"]["m"]["64"] == first


def test_the_verdict_leaves_out_trained_models_rows_and_says_when_nothing_trades_off(tmp_path):
    """A trained model's own '+ redenoise' row is no baseline; rows only dominated or unresolved are no
    trade-off; intervals that touch as printed tie; no training-free row at all is one error line."""


    rate = lambda v, lo, hi: {"one_sun_rate": v, "one_sun_rate_lo": lo, "one_sun_rate_hi": hi}  # noqa: E731
    cells = {"mr": rate(0.80, 0.76, 0.84), "mr + redenoise": rate(1.0, 0.99, 1.0),  # better, but mr's own row
             "fixed + redilation": rate(0.60, 0.55, 0.65), "fixed + upsample": rate(0.80, 0.77, 0.83),
             "fixed + window_fusion": rate(0.90, 0.843, 0.95)}  # 0.84 and 0.84 as printed: they touch, a tie

    lines = summary_at_64(tmp_path, cells, "a.md", "mr")
    judged = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("**Verdict")):])
    assert "| mr + redenoise |" not in judged and "| fixed + window_fusion | = | no difference" in judged
    assert lines[-1] == ("Verdict: no training-free row dominates the trained models or trades off against them; "
                         "1 dominated, 2 no difference resolved.")
    cells = {"mr": rate(0.80, 0.76, 0.84), "mr + redenoise": rate(1.0, 0.99, 1.0)}
    with pytest.raises(SystemExit, match="--verdict: the reports have no a training-free row"):
        summary_at_64(tmp_path, cells, "b.md", "mr")


def test_a_summary_refuses_reports_on_other_seeds_and_takes_a_size_the_first_lacks(tmp_path):
    from mrdiff.evidence.summary import merged

    meta = {"command": "c", "base_resolution": 32, "first_seed": 0, "num_samples": 400, "sampler": "ddim",
            "steps": 25, "eta": 1.0}
    a = {"meta": meta, "cells": {"m": {"64": {"one_sun_rate": 0.8}}}}
    b = {"meta": meta, "cells": {"m": {"48": {"one_sun_rate": 0.9}, "64": {"kid": 0.1}}}}  # no shared metric
    out = merged([a, b])["cells"]["m"]
    assert out == {"64": {"one_sun_rate": 0.8}, "48": {"one_sun_rate": 0.9}}  # 64: nothing to check it by
    with pytest.raises(ValueError, match="differs from the first report in first_seed"):
        merged([a, {**b, "meta": {**meta, "first_seed": 1000}}])


def test_a_summary_never_replaces_a_different_one_unless_asked(tmp_path):
    """Rewriting the same summary is a no-op; a different one is refused (file untouched) until --replace."""
    rate = {"one_sun_rate": 0.8, "one_sun_rate_lo": 0.7, "one_sun_rate_hi": 0.9}
    cells = {"mr": rate, "fixed + upsample": {**rate, "one_sun_rate": 0.5, "one_sun_rate_hi": 0.6}}
    first = summary_at_64(tmp_path, cells, "s.md", "mr")
    assert summary_at_64(tmp_path, cells, "s.md", "mr") == first
    cells["mr"] = {**rate, "one_sun_rate": 0.85}
    with pytest.raises(SystemExit, match="holds another summary: pass --replace"):
        summary_at_64(tmp_path, cells, "s.md", "mr")
    assert (tmp_path / "s.md").read_text().splitlines() == first
    assert summary_at_64(tmp_path, cells, "s.md", "mr", "--replace") != first
