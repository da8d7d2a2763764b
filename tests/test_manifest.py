"""models/MANIFEST.json (python -m mrdiff.manifest): the shipped weights, each sound and each accounted for."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mrdiff import manifest
from mrdiff.evidence.curves import pixels_per_step
from tests.conftest import ROOT


def shipped() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "models").rglob("*.pt"))


def test_every_shipped_weights_file_is_stamped_and_matches_its_manifest():
    """Only weights built after the GroupNorm fix ship (they carry net.norm_group_channels), every one of
    them is in the manifest with its sha256, and the manifest lists nothing else."""
    listed = {e["path"]: e for e in json.loads((ROOT / "models" / "MANIFEST.json").read_text())["files"]}
    assert shipped() and sorted(listed) == shipped()
    for rel, entry in listed.items():
        assert manifest.sha256(ROOT / rel) == entry["sha256"], rel
        payload = torch.load(ROOT / rel, map_location="cpu", weights_only=False)
        assert payload["net"].get("norm_group_channels") == entry["norm_group_channels"] == 4, rel
        assert manifest.LAYOUT.match(rel) and payload["global_step"] == entry["steps"], rel


def test_training_pixels_are_steps_times_the_expected_pixels_of_a_batch():
    """Images seen × pixels per image, from each file's own data settings (a quarter of the canvases model's
    batches are whole 64² canvases: 32 · (0.75 · 32² + 0.25 · 64²) pixels a step)."""
    for entry in json.loads((ROOT / "models" / "MANIFEST.json").read_text())["files"]:
        data = torch.load(ROOT / entry["path"], map_location="cpu", weights_only=False)["data"]
        assert entry["pixels_per_step"] == pixels_per_step(data)
        assert entry["training_pixels"] == round(entry["steps"] * entry["pixels_per_step"])
        if data.get("canvas_fraction") == 0.25 and data.get("canvas_sizes") == [64]:
            assert entry["pixels_per_step"] == 32 * (0.75 * 32**2 + 0.25 * 64**2)


def test_the_recipe_is_read_from_the_call_not_from_the_prose_around_it():
    command = ("mrdiff fit --config a.yaml --config b.yaml --model.init_weights=models/x.pt "
               "--trainer.max_time=00:00:20:00 --trainer.default_root_dir=runs/x, then resumed with "
               "--ckpt_path=last --trainer.max_time=00:00:35:00 (OMP_NUM_THREADS=2)")
    assert manifest.fit_recipe(command) == (["a.yaml", "b.yaml"],
                                            ["--model.init_weights=models/x.pt", "--trainer.max_time=00:00:20:00"])
    quoted = 'OMP_NUM_THREADS=1 mrdiff fit --config a.yaml "--data.canvas_sizes=[64]" (stopped at step 11,000)'
    assert manifest.fit_recipe(quoted) == (["a.yaml"], ["--data.canvas_sizes=[64]"])


def check_error(root: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        manifest.main(["--check", "--root", str(root)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("mrdiff: error: "), err
    return err


def test_check_catches_a_tampered_copy_an_unlisted_file_and_a_missing_stamp(tmp_path, capsys):
    """--check on a copy outside git: it passes on what the command wrote, and fails with one line on a
    changed byte, on a file the manifest does not list, and on weights without the stamp."""
    source = ROOT / "models" / "fixed" / "seed0_14000.pt"
    (tmp_path / "models" / "fixed").mkdir(parents=True)
    copy = tmp_path / "models" / "fixed" / "seed0_14000.pt"
    shutil.copy(source, copy)
    manifest.main(["--root", str(tmp_path)])
    written = json.loads((tmp_path / "models" / "MANIFEST.json").read_text())["files"]
    assert [e["path"] for e in written] == ["models/fixed/seed0_14000.pt"] and written[0]["recipe"] == "fixed"
    assert written[0]["sha256"] == manifest.sha256(source) and written[0]["steps"] == 14000
    manifest.main(["--check", "--root", str(tmp_path)])
    assert "matches the 1 weights files" in capsys.readouterr().out

    with copy.open("ab") as f:  # one byte appended: torch still reads it, the hash does not match
        f.write(b"\0")
    assert "models/fixed/seed0_14000.pt has sha256" in check_error(tmp_path, capsys)
    shutil.copy(source, copy)
    manifest.main(["--check", "--root", str(tmp_path)])
    capsys.readouterr()

    shutil.copy(source, tmp_path / "models" / "fixed" / "seed0.pt")
    assert "models/fixed/seed0.pt not in MANIFEST.json" in check_error(tmp_path, capsys)

    payload = torch.load(source, map_location="cpu", weights_only=False)
    del payload["net"]["norm_group_channels"]  # as the pre-fix exports were written
    torch.save(payload, tmp_path / "models" / "fixed" / "seed0.pt")
    manifest.main(["--root", str(tmp_path)])
    capsys.readouterr()
    assert "models/fixed/seed0.pt carries no norm_group_channels stamp" in check_error(tmp_path, capsys)

    (tmp_path / "models" / "fixed" / "seed0.pt").unlink()
    assert "lists models/fixed/seed0.pt, which is not under models/" in check_error(tmp_path, capsys)
