"""Bad input gets a clear error that names the problem and the fix, and nothing is lost."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mrdiff.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint
from mrdiff.cli import main
from mrdiff.data.datamodule import MultiResDataModule
from mrdiff.data.images import ImageFolder, load_image
from mrdiff.nonfinite import NonFiniteGuard, NonFiniteLossError

# -- data ---------------------------------------------------------------------------------------------


def good_image(path, size=(48, 40), mode="RGB"):
    colours = {"L": 120, "P": 120, "LA": (120, 200), "RGBA": (200, 30, 60, 128), "CMYK": (10, 200, 30, 0)}
    Image.new(mode, size, colours.get(mode, (200, 30, 60))).save(path)


def test_corrupt_and_truncated_images_are_listed_or_skipped_with_a_count(tmp_path, capsys):
    for i in range(4):
        good_image(tmp_path / f"ok{i}.png")
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a jpeg")
    whole = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"2 of 6 images .* cannot be read") as info:
        ImageFolder(tmp_path, size=32)
    assert "garbage.jpg" in str(info.value) and "truncated.png" in str(info.value)
    assert "data.on_corrupt=skip" in str(info.value)
    dataset = ImageFolder(tmp_path, size=32, on_corrupt="skip")
    assert len(dataset) == 4 and dataset.skipped == 2
    assert "skipping 2 unreadable image(s) of 6" in capsys.readouterr().out


def test_image_scan_is_cached_and_redone_for_changed_files(tmp_path, monkeypatch, capsys):
    from mrdiff.data import images

    for i in range(5):
        good_image(tmp_path / f"ok{i}.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    decoded = []
    real = images.inspect_image
    monkeypatch.setattr(images, "inspect_image", lambda p: decoded.append(p.name) or real(p))
    assert len(ImageFolder(tmp_path, size=32, on_corrupt="skip")) == 5 and len(decoded) == 6
    decoded.clear()
    dataset = ImageFolder(tmp_path, size=32, on_corrupt="skip")
    assert len(dataset) == 5 and dataset.skipped == 1 and decoded == ["bad.jpg"]  # only the unverified file
    whole = (tmp_path / "ok3.png").read_bytes()
    (tmp_path / "ok3.png").write_bytes(whole[: len(whole) // 2])  # new size and mtime: decoded again
    decoded.clear()
    dataset = ImageFolder(tmp_path, size=32, on_corrupt="skip")
    assert sorted(decoded) == ["bad.jpg", "ok3.png"] and dataset.skipped == 2
    images.scan_cache_path(tmp_path).write_text("{ torn")
    decoded.clear()
    assert len(ImageFolder(tmp_path, size=32, on_corrupt="skip")) == 4 and len(decoded) == 6
    assert "scan cache" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
    if mode == "I;16":
        Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(path)
    else:
        good_image(path, mode=mode)
    x = load_image(path, 32)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    if mode == "I;16":  # 40000/65535 of full scale, not clipped to white
        assert x.mean().item() == pytest.approx(40000 / 65535 * 2 - 1, abs=0.02)


def test_small_images_fail_clearly_or_are_upscaled(tmp_path):
    good_image(tmp_path / "tiny.png", size=(20, 20))
    with pytest.raises(ValueError, match=r"20x20 pixels, smaller than the 32 .* data.upscale_small=true"):
        load_image(tmp_path / "tiny.png", 32)
    assert load_image(tmp_path / "tiny.png", 32, upscale=True).shape == (3, 32, 32)


def test_small_images_are_found_by_the_folder_scan_not_in_a_worker(tmp_path, monkeypatch):
    from mrdiff.data import images

    for i in range(3):
        good_image(tmp_path / f"ok{i}.png", size=(48, 40))
    good_image(tmp_path / "narrow.png", size=(31, 80))
    with pytest.raises(ValueError, match=r"1 of 4 images .* smaller than the 32 pixels needed:\n  .*narrow.png: "
                                         r"31x80\n.*data.upscale_small=true"):
        ImageFolder(tmp_path, size=32)
    assert len(ImageFolder(tmp_path, size=32, upscale_small=True)) == 4
    # the scan cache remembers sizes: a second scan refuses the same image without decoding anything
    decoded = []
    real = images.inspect_image
    monkeypatch.setattr(images, "inspect_image", lambda p: decoded.append(p.name) or real(p))
    with pytest.raises(ValueError, match=r"(?s)1 of 4 .*narrow.png: 31x80"):
        ImageFolder(tmp_path, size=32)
    assert decoded == []
    assert len(ImageFolder(tmp_path, size=31)) == 4


def test_a_crop_larger_than_the_image_is_not_padded_with_black(tmp_path):
    good_image(tmp_path / "x.png", size=(30, 60))
    x = load_image(tmp_path / "x.png", 16, crop=40)  # the crop is limited to the 30-pixel side
    assert x.shape == (3, 16, 16) and x.min().item() > -0.9  # no black (−1) border
    with pytest.raises(ValueError, match="30x60 pixels, smaller than the 32"):
        load_image(tmp_path / "x.png", 32, crop=40)


def test_empty_folder_and_wrong_path(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images .* under .*check data.root"):
        ImageFolder(tmp_path, size=32)
    with pytest.raises(FileNotFoundError, match="does not exist .*check data.root"):
        ImageFolder(tmp_path / "missing", size=32)
    with pytest.raises(FileNotFoundError, match="CelebA not found: expected .*img_align_celeba"):
        MultiResDataModule(source="celeba", root=str(tmp_path), image_size=128, s_min=64, s_max=128,
                           patch_size=64).setup()


# -- configuration --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("--data.patch_size=48", "patch_size <= s_min <= s_max"),
    ("--data.s_min=40", "patch_size <= s_min <= s_max"),
    ("--data.batch_size=0", "data.batch_size must be positive"),
    ("--model.net.init_args.attention_levels=[5]", r"attention_levels \[5\] do not exist"),
    ("--data.patch_size=15", "not divisible by the U-Net's downsampling factor"),
])
def test_impossible_settings_fail_before_training(tiny_config_file, override, message):
    config = tiny_config_file(**{"data.s_min": 16 if "15" not in override else 15})
    with pytest.raises((ValueError, SystemExit)) as info:
        main(["fit", "--config", str(config), override])
    if info.type is SystemExit:
        pytest.fail(f"expected a ValueError naming the problem, got SystemExit for {override}")
    assert info.match(message)


def test_sampling_resolution_not_divisible_is_refused_before_sampling(tiny_config_file, tmp_path):
    config = tiny_config_file()
    main(["fit", "--config", str(config)])
    with pytest.raises(ValueError, match=r"resolution 25x25 is not divisible .* factor 2"):
        main(["sample", "--config", str(config), f"--ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}",
              "--resolutions=[16,25]"])


def test_unknown_keys_and_wrong_types_name_the_key(tiny_config_file, capsys):
    config = tiny_config_file()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.learning_rate=1"])
    assert "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--data.batch_size=many"])
    assert "batch_size" in capsys.readouterr().err


# -- training -------------------------------------------------------------------------------------------


def test_nonfinite_loss_stops_with_step_and_cause_and_keeps_the_checkpoint(tiny_config_file, tmp_path):
    config = tiny_config_file(**{"trainer.val_check_interval": 1})
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 2; the input batch has NaN/inf"):
        main(["fit", "--config", str(config), "--trainer.callbacks+=tests.helpers.PoisonBatch"])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_fused_adamw_skips_a_nonfinite_step_on_the_device_and_the_guard_records_it():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    guard = NonFiniteGuard(torch.device("cpu"))

    def step(x, index):
        loss = net(x).square().sum()
        guard.record_inputs(loss, x)
        loss.backward()
        opt.found_inf = guard.check_gradients([p.grad for p in net.parameters()], index)
        opt.step()
        opt.zero_grad()

    step(torch.ones(1, 3), 0)
    weights, counts = [p.clone() for p in net.parameters()], [opt.state[p]["step"].clone() for p in net.parameters()]
    step(torch.tensor([[float("nan"), 1.0, 1.0]]), 1)
    assert all(torch.equal(a, b) for a, b in zip(weights, net.parameters()))  # no update, no weight decay
    assert all(torch.equal(opt.state[p]["step"], c) for p, c in zip(net.parameters(), counts))  # Adam's t too
    step(torch.ones(1, 3), 2)
    assert not torch.equal(weights[0], net.weight)  # finite steps update again
    first_step, loss, inputs_ok = guard.first()
    assert int(guard.count) == 1 and first_step == 1 and math.isnan(loss) and not inputs_ok


def test_nonfinite_steps_can_be_skipped_and_counted(tiny_config_file, tmp_path, capsys):
    config = tiny_config_file(**{"model.nonfinite_loss": "skip"})
    main(["fit", "--config", str(config), "--trainer.callbacks+=tests.helpers.PoisonBatch"])
    assert "1 skipped so far" in capsys.readouterr().out
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()) and ckpt["mrdiff"]["skipped_steps"] == 1
    # the count survives a resume and goes on from there
    poison_later = '{"class_path": "tests.helpers.PoisonBatch", "init_args": {"step": 5}}'
    main(["fit", "--config", str(config), "--trainer.max_steps=7", f"--trainer.callbacks+={poison_later}",
          f"--ckpt_path={last}"])
    assert "2 skipped so far" in capsys.readouterr().out
    assert load_checkpoint(last)["mrdiff"]["skipped_steps"] == 2


# -- checkpoints ------------------------------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_truncated_foreign_and_missing_checkpoints_are_clear_errors(tiny_config_file, tmp_path):
    config = tiny_config_file()
    main(["fit", "--config", str(config)])
    good = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 3])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    cases = [(truncated, "truncated or corrupt"), (foreign, "not a Lightning checkpoint"),
             (tmp_path / "nope.ckpt", "does not exist")]
    for path, message in cases:
        with pytest.raises(CheckpointError, match=message):
            main(["sample", "--config", str(config), f"--ckpt_path={path}", "--resolutions=[16]"])
    other = tiny_config_file(**{"model.net.init_args.base_channels": 8})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        main(["sample", "--config", str(other), f"--ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}"])


def test_weights_from_before_the_groupnorm_fix_need_their_rule_said(tiny_config_file, tmp_path):
    """Shapes cannot tell the GroupNorm rule: a checkpoint without the stamp (pre-fix, t-blind at 16 channels)
    loads only into a U-Net told norm_group_channels=1; a stamped one only into a U-Net with its value."""
    config = tiny_config_file()
    main(["fit", "--config", str(config)])
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["mrdiff"]["norm_group_channels"] == 4
    del ckpt["mrdiff"]["norm_group_channels"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    args = ["sample", "--config", str(config), f"--ckpt_path={tmp_path / 'old.ckpt'}", "--resolutions=[16]",
            "--num_samples=1", "--steps=2", f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(CheckpointError, match=r"norm_group_channels=1.*did not see t"):
        main(args)
    main([*args, "--model.net.init_args.norm_group_channels=1"])
    assert (tmp_path / "out" / "samples_16.png").is_file()
    with pytest.raises(CheckpointError, match="norm_group_channels=4"):
        main(["sample", "--config", str(config), f"--ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}",
              "--model.net.init_args.norm_group_channels=1", "--resolutions=[16]"])


def test_atomic_writes_respect_the_umask_like_a_plain_open(tmp_path):
    """mkstemp's 0600 hid checkpoints and tables from the rest of a project group on a cluster."""
    import os

    from mrdiff.utils import atomic_write

    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "last.ckpt") as f:
            f.write(b"x")
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o640


def test_a_fit_removes_the_partial_checkpoint_writes_a_killed_save_left(tiny_config_file, tmp_path, capsys):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    leftover = checkpoints / ".last.ckpt.k3x9q_7a.tmp"  # what atomic_write leaves when SIGKILL hits mid-save
    leftover.write_bytes(b"\0" * 100)
    other = checkpoints / "notes.tmp"  # not ours: stays
    other.write_text("keep")
    main(["fit", "--config", str(tiny_config_file(**{"trainer.max_steps": 1}))])
    assert not leftover.exists() and other.read_text() == "keep"
    assert "removed 1 stale temporary file(s)" in capsys.readouterr().out
    assert (checkpoints / "last.ckpt").is_file()
