"""Fault cases of issue 21: no run overwritten, no NaN checkpoint called good, every bad
input one clear error.

One test per case; each failed on the code before the fix (the symptom it reproduces is
in its docstring). Tiny models, ``tmp_path`` only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irformer.archs import build_model, read_state_dict, save_model_weights
from irformer.cli import main as cli_main
from irformer.data.io import ImageTooLargeError, image_size, read_image, write_image
from irformer.engine.checkpoint import list_checkpoints, load_checkpoint, nonfinite_tensors
from irformer.engine.config import ConfigError, load_config
from irformer.engine.train import train
from irformer.errors import (
    CheckpointReadError,
    IrformerError,
    OutputNotWritableError,
    RunExistsError,
    UnsafeCheckpointError,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = """\
name: tiny
model:
  arch: swinir_light_x2
  norm: {norm}
  scale: 2
  overrides: {{embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 8,
              drop_path_rate: 0.0}}
data: {{train: [{data}], patch_size: 16, batch_size: 2, workers: 0}}
train: {{iters: 3, lr: 1.0e-3, step_size: 25, ema: 0.99}}
val: {{every: 0}}
log: {{out_dir: {out}, every: 1, checkpoint_every: 1, keep_last: 10, probe_interval: 0}}
"""
TINY_KWARGS = {
    "embed_dim": 12,
    "depths": (2,),
    "num_heads": (2,),
    "window_size": 4,
    "img_size": 8,
    "drop_path_rate": 0.0,
}


def make_images(folder: Path, count: int = 5, size: int = 40) -> Path:
    """Smooth colour images (as tests/test_resume.py makes them)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(folder / f"im{i}.png")
    return folder


@pytest.fixture
def tiny_run(tmp_path: Path):
    """``(config path, run dir)`` of a 3-iteration tiny SwinIR run on five 40x40 images."""

    def make(norm: str = "ln") -> tuple[Path, Path]:
        data = make_images(tmp_path / "data")
        out = tmp_path / "run"
        path = tmp_path / f"tiny_{norm}.yaml"
        path.write_text(CONFIG.format(norm=norm, data=data, out=out))
        return path, out

    return make


def run_cli(*args: object) -> int:
    return cli_main([str(a) for a in args])


def train_cli(config: Path, *extra: object) -> int:
    return run_cli("train", "--config", config, "--no-progress", *extra)


def one_error_line(err: str, command: str) -> str:
    """The stderr of a refused command: exactly one ``irformer CMD: error:`` line, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(f"irformer {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 greyscale PNG whose header claims ``width x height`` (a decompression bomb's
    header without the 100 MB of zeros)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    body = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Path:
    """An existing folder this process cannot write into, even as root (/sys is not
    writable for root; elsewhere a chmod 500 folder)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    folder = Path("/sys/kernel")
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    os.close(fd)
    os.unlink(probe)
    pytest.skip("no unwritable folder available to root here")


def tiny_weights(path: Path, norm: str, *, poison: bool = False) -> Path:
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", norm=norm, **TINY_KWARGS)
    if poison:
        with torch.no_grad():
            model.conv_first.bias[0] = float("nan")
    return save_model_weights(path, model)


# --------------------------------------------------------------------------- data loss


def test_train_refuses_an_existing_run_folder(tiny_run, capsys) -> None:
    """Was: a second ``irformer train`` without --resume truncated metrics.jsonl, replaced
    config.yaml with a warning and overwrote checkpoints, leaving the old run's later
    ones behind for a later --resume."""
    config, run = tiny_run()
    assert train_cli(config) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert train_cli(config, "--set", "train.iters=2") == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(run) in line and "--resume" in line and "log.out_dir" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    with pytest.raises(RunExistsError):
        train(load_config(config, ["train.iters=2"]))

    # --overwrite deletes the earlier run's artefacts (not other files) first.
    (run / "notes.txt").write_text("mine")
    assert train_cli(config, "--set", "train.iters=2", "--overwrite") == 0
    assert [it for it, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    assert [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):  # contradictory
        train_cli(config, "--resume", "--overwrite")


def test_pixel_limit_replaces_pillows_warning(tmp_path: Path, monkeypatch, capsys) -> None:
    """Was: a 10000x10000 PNG header (100 Mpx) passed Pillow with only a
    DecompressionBombWarning; above 2x Pillow's limit ``eval`` died in a traceback."""
    monkeypatch.delenv("IRFORMER_MAX_IMAGE_PIXELS", raising=False)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning on the way
        with pytest.raises(ImageTooLargeError, match=r"bomb\.png: 10000x10000 .*IRFORMER_MAX"):
            image_size(bomb)
        with pytest.raises(ImageTooLargeError, match=r"bomb\.png"):
            read_image(bomb)
    # One limit, configurable: 0 lifts it, a small one refuses a small image.
    monkeypatch.setenv("IRFORMER_MAX_IMAGE_PIXELS", "0")
    assert image_size(bomb) == (10_000, 10_000)
    small = write_image(tmp_path / "small.png", np.zeros((20, 20, 3), np.uint8))
    monkeypatch.setenv("IRFORMER_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(ImageTooLargeError, match="limit of 399"):
        read_image(small)
    monkeypatch.setenv("IRFORMER_MAX_IMAGE_PIXELS", "400")
    assert read_image(small).shape == (20, 20, 3)

    # eval reading benchmark sizes: one line naming the file, exit 2.
    monkeypatch.delenv("IRFORMER_MAX_IMAGE_PIXELS")
    root = tmp_path / "bench"
    (root / "Set5" / "HR").mkdir(parents=True)
    (root / "Set5" / "HR" / "a.png").write_bytes(png_declaring(14_000, 14_000))
    args = ["eval", "--model", "bicubic", "--scale", "2", "--bench", "Set5"]
    assert run_cli(*args, "--data-root", root, "--no-progress") == 2
    assert "a.png: 14000x14000" in one_error_line(capsys.readouterr().err, "eval")


def test_nonfinite_weights_are_never_checkpointed(tiny_run, capsys) -> None:
    """Was: lr=10 on i-LN wrote iter_00000002.pth with 25 NaN tensors and named it the
    last good checkpoint when the loss went NaN at iteration 3."""
    config, run = tiny_run("iln")
    assert train_cli(config, "--set", "train.lr=10", "train.iters=10") == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "non-finite weights after iteration 2" in line
    assert line.endswith("Last good checkpoint: " + str(run / "checkpoints" / "iter_00000001.pth"))
    assert [it for it, _ in list_checkpoints(run / "checkpoints")] == [1]
    ckpt = load_checkpoint(run / "checkpoints" / "iter_00000001.pth")
    assert nonfinite_tensors(ckpt["params"]) == [] and nonfinite_tensors(ckpt["params_ema"]) == []


def test_eval_flags_nonfinite_outputs(tmp_path: Path, capsys) -> None:
    """Was: a NaN checkpoint scored 7.63 dB on Set5 with exit status 0 and no warning."""
    ckpt = tiny_weights(tmp_path / "nan.safetensors", "ln", poison=True)
    root = tmp_path / "bench"
    for i in range(2):
        write_image(root / "Set5" / "HR" / f"{i}.png", np.full((16, 16, 3), 40 * i, np.uint8))
    out_json = tmp_path / "r.json"
    args = ["eval", "--model", ckpt, "--bench", "Set5", "--data-root", root, "--no-progress"]
    assert run_cli(*args, "--no-baseline", "--out-json", out_json) == 1
    printed = capsys.readouterr()
    assert "*" in printed.out.splitlines()[2]  # the Set5 PSNR is marked
    assert "* Set5: 512 output pixels non-finite in 2 of 2 images" in printed.out
    assert "non-finite outputs on Set5" in printed.err
    saved = json.loads(out_json.read_text())["benchmarks"][0]
    assert saved["nonfinite_pixels"] == 512
    assert [img["nonfinite_pixels"] for img in saved["images"]] == [256, 256]


def test_warm_start_checks_the_norm(tiny_run, tmp_path: Path, caplog) -> None:
    """Was: an x2 i-LN file loaded into an LN config ("328 tensors loaded"), silently."""
    caplog.set_level(logging.INFO, logger="irformer")
    config, _ = tiny_run("ln")
    iln = tiny_weights(tmp_path / "iln.safetensors", "iln")
    cfg = load_config(config, [f"train.warm_start={iln}", "train.iters=1"])
    with pytest.raises(IrformerError, match=r"norm 'iln' but model.norm is 'ln'.*ignore_norm"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before training
    # An official file (no metadata) counts as ln: refused for an i-LN config.
    torch.save({"params": read_state_dict(iln)[0]}, tmp_path / "official.pth")
    iln_config, _ = tiny_run("iln")
    cfg_iln = load_config(iln_config, [f"train.warm_start={tmp_path / 'official.pth'}"])
    with pytest.raises(IrformerError, match=r"norm 'ln' \(no irformer metadata"):
        train(cfg_iln)
    # The escape hatch: loads, and says so loudly.
    cfg = load_config(
        config, [f"train.warm_start={iln}", "train.iters=1", "train.warm_start_ignore_norm=true"]
    )
    assert train(cfg).iteration == 1
    assert "CROSS-NORM WARM START" in caplog.text
    assert f"warm start from {iln}: 38 tensors loaded" in caplog.text


def test_resume_falls_back_past_a_truncated_checkpoint(tiny_run, caplog) -> None:
    """Was: a truncated newest checkpoint stopped --resume with a raw OSError; orphaned
    .tmp files of interrupted writes stayed forever."""
    caplog.set_level(logging.INFO, logger="irformer")
    config, run = tiny_run()
    assert train_cli(config) == 0
    first = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    ckpts = run / "checkpoints"
    newest = ckpts / "iter_00000003.pth"
    newest.write_bytes(newest.read_bytes()[:20_000])
    orphan = ckpts / ".iter_00000004.pth.k2j4h6f8.tmp"
    orphan.write_bytes(b"x" * 1000)

    assert train_cli(config, "--resume") == 0
    assert "skipping iter_00000003.pth" in caplog.text and "truncated" in caplog.text
    assert "resumed from " + str(ckpts / "iter_00000002.pth") in caplog.text
    assert not orphan.exists()
    assert (ckpts / "iter_00000003.pth.skipped").is_file()  # set aside, never resumed again
    assert [it for it, _ in list_checkpoints(ckpts)] == [1, 2, 3]
    again = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert again == first  # iteration 3 re-run from iteration 2, bit for bit


def test_folder_restore_goes_on_and_skip_existing(tmp_path: Path, capsys) -> None:
    """Was: one unreadable file stopped a folder restore, leaving partial output and a
    rerun that needed --overwrite (and re-did everything)."""
    ckpt = tiny_weights(tmp_path / "m.safetensors", "ln")
    src = make_images(tmp_path / "in", count=3, size=12)
    (src / "im1.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert run_cli("restore", src, "--model", ckpt, "-o", out) == 1
    err = capsys.readouterr().err
    assert f"{src / 'im1.png'}: not a readable image file" in err.split("not restored:")[1]
    assert sorted(p.name for p in out.iterdir()) == ["im0.png", "im2.png"]

    # A rerun skips complete outputs and redoes an incomplete one (a cut write).
    done = (out / "im0.png").stat().st_mtime_ns
    full = (out / "im2.png").read_bytes()
    (out / "im2.png").write_bytes(full[: len(full) // 2])
    assert run_cli("restore", src, "--model", ckpt, "-o", out, "--skip-existing") == 1
    assert "1 complete output(s) skipped" in capsys.readouterr().err
    assert (out / "im0.png").stat().st_mtime_ns == done
    assert (out / "im2.png").read_bytes() == full
    assert read_image(out / "im2.png").shape == (24, 24, 3)


# --------------------------------------------------------------------------- one clear error


def test_unwritable_output_folder_is_refused_before_work(
    tmp_path: Path, unwritable_dir: Path, tiny_run, capsys, monkeypatch
) -> None:
    """Was: restore ran the model and then died writing (PermissionError traceback);
    train failed the same way after building data and model."""
    ckpt = tiny_weights(tmp_path / "m.safetensors", "ln")
    image = make_images(tmp_path / "in", count=1, size=12) / "im0.png"
    import irformer.engine.infer as infer

    def no_inference(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model ran before the output folder was checked")

    monkeypatch.setattr(infer, "restore_tensor", no_inference)
    for out in (unwritable_dir, unwritable_dir / "sub"):
        assert run_cli("restore", image, "--model", ckpt, "-o", out) == 2
        assert f"output folder {out} is not writable" in one_error_line(
            capsys.readouterr().err, "restore"
        )
    with pytest.raises(OutputNotWritableError):
        infer.restore_files(torch.nn.Identity(), [image], unwritable_dir)

    config, _ = tiny_run()
    missing_data = tmp_path / "no_such_data"
    run = unwritable_dir / "run"
    assert train_cli(config, "--set", f"log.out_dir={run}", f"data.train=[{missing_data}]") == 2
    assert f"output folder {run} is not writable" in one_error_line(
        capsys.readouterr().err, "train"
    )


def test_corrupt_safetensors_is_one_error(tmp_path: Path, capsys) -> None:
    """Was: a random or cut file named .safetensors raised the library's bare
    SafetensorError (traceback, no file name)."""
    good = tiny_weights(tmp_path / "good.safetensors", "ln")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(np.random.default_rng(0).bytes(1000))
    for path in (cut, noise):
        with pytest.raises(CheckpointReadError, match=f"{path}: not a readable safetensors"):
            read_state_dict(path)
        assert run_cli("models", "info", path) == 2
        assert str(path) in one_error_line(capsys.readouterr().err, "models")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("log.checkpoint_every=0", "log.checkpoint_every"),
        ("log.checkpoint_every=-5", "log.checkpoint_every"),
        ("val.every=-1", "val.every"),
        ("train.gamma=0", "train.gamma"),
        ("train.gamma=-0.5", "train.gamma"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.betas=[0.9, 1.0]", "train.betas[1]"),
        ("train.betas=[-0.1, 0.99]", "train.betas[0]"),
        ("data.workers=-1", "data.workers"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.grad_clip=-1", "train.grad_clip"),
        ("train.kl_weight=nan", "train.kl_weight"),
        ("train.step_size=0", "train.step_size"),
        ("train.time_limit_min=-1", "train.time_limit_min"),
        ("log.probe_interval=-1", "log.probe_interval"),
        ("data.quality=0", "data.quality"),
        ("data.sigma=-5", "data.sigma"),
        ("train.milestones=[0, 10]", "train.milestones[0]"),
    ],
)
def test_numeric_config_values_are_checked_at_load(override: str, key: str) -> None:
    """Was: log.checkpoint_every=0 died mid-run in a ZeroDivisionError; train.gamma <= 0
    turned the learning rate negative; the others were accepted silently."""
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ": must be"):
        load_config(None, [override])


def test_cli_maps_irformer_errors_to_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """Was: every RuntimeError and KeyError (bugs included) was cut to one line, and
    errors of other classes (SafetensorError, PermissionError) kept a traceback."""
    from irformer.cli import models as models_cli

    def fails_with(exc: BaseException):
        def run(args: object) -> int:
            raise exc

        return run

    cases = [
        (RunExistsError("run folder x holds a run"), 2),
        (PermissionError(13, "Permission denied", "/x/y"), 2),
        (FileNotFoundError(2, "No such file", "/x/z"), 2),
    ]
    for exc, code in cases:
        monkeypatch.setattr(models_cli, "list_command", fails_with(exc))
        assert run_cli("models", "list") == code
        one_error_line(capsys.readouterr().err, "models")
    # irformer's own checks raising builtins (KeyError: its message, not its repr).
    args = ["eval", "--model", "bicubic", "--scale", "2", "--bench", "Set6"]
    assert run_cli(*args, "--data-root", tmp_path) == 2
    assert "error: unknown benchmark 'Set6'" in one_error_line(capsys.readouterr().err, "eval")
    # An unexpected failure inside a library keeps its traceback.
    for exc in (RuntimeError("kernel failed"), ZeroDivisionError("modulo by zero")):
        monkeypatch.setattr(models_cli, "list_command", fails_with(exc))
        with pytest.raises(type(exc)):
            run_cli("models", "list")


def test_unsafe_pickle_names_the_global_without_pytorchs_advice(tmp_path: Path, capsys) -> None:
    """Was: the refusal repeated PyTorch's "Re-running torch.load with weights_only set to
    False will likely succeed"; engine.checkpoint.load_checkpoint raised a raw
    UnpicklingError."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"params": Payload()}, evil)
    name = f"{os.system.__module__}.system"  # posix.system on Linux
    for load in (read_state_dict, load_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as caught:
            load(evil)
        message = str(caught.value)
        assert str(evil) in message and name in message and "execute code" in message
        assert "weights_only" not in message.replace("(weights-only)", "")
        assert "False" not in message
    assert run_cli("models", "info", evil) == 2
    line = one_error_line(capsys.readouterr().err, "models")
    assert name in line and "will not load" in line
