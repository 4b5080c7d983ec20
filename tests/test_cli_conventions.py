"""Issue 16: the CLI as users of BasicSR, chaiNNer and traiNNer expect it.

Paired folders of your own (``NAME=HR_DIR[,LR_DIR]``) through one benchmark resolver,
the model zoo by name, ``train --resume RUN_DIR``, progress and messages, one
vocabulary, files written with the user's umask. Each test failed on the code
before (the symptom is in its docstring). Tiny models, ``tmp_path`` only.
"""

from __future__ import annotations

import ast
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from irformer.archs import build_model, save_model_weights, zoo
from irformer.cli import build_parser
from irformer.cli import main as cli_main
from irformer.data.benchmarks import (
    load_benchmark,
    parse_paired_folders,
    resolve_benchmarks,
    split_benchmark_list,
)
from irformer.data.degradations import matlab_imresize
from irformer.data.io import read_image, write_image
from irformer.engine.config import ConfigError, config_from_dict, load_config
from irformer.engine.evaluate import BicubicModel, evaluate
from irformer.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src" / "irformer"

TINY = {
    "embed_dim": 12,
    "depths": (2,),
    "num_heads": (2,),
    "window_size": 4,
    "img_size": 8,
    "drop_path_rate": 0.0,
}


def run_cli(*args: object) -> int:
    return cli_main([str(a) for a in args])


def smooth(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "RGBA"
    return np.asarray(Image.fromarray(small, mode).resize((w, h), Image.BICUBIC))


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Two 24x20 HR images as a flat benchmark root (``Set5/HR``), the same images as a
    folder of one's own, and their MATLAB-bicubic x2 LR files with BasicSR's names."""
    flat, hr, lr = tmp_path / "root" / "Set5" / "HR", tmp_path / "mine_hr", tmp_path / "mine_lr"
    for i, name in enumerate(("a", "b")):
        img = smooth(24, 20, i)
        write_image(flat / f"{name}.png", img)
        write_image(hr / f"{name}.png", img)
        write_image(lr / f"{name}x2.png", matlab_imresize(img, 0.5))
    return {"root": tmp_path / "root", "hr": hr, "lr": lr}


# --------------------------------------------------------------------------- item 2


def test_split_and_parse_paired_folders() -> None:
    """Was: --bench accepted registered names only; a comma list could not carry folders."""
    assert split_benchmark_list("Set5, mine=data/hr,data/lr ,b100[:2],x=h") == [
        "Set5",
        "mine=data/hr,data/lr",
        "b100[:2]",
        "x=h",
    ]
    # The item after NAME=HR is its LR folder unless it is a benchmark or another NAME=.
    assert split_benchmark_list("mine=hr,Set14") == ["mine=hr", "Set14"]
    assert split_benchmark_list(["Set5", "mine=hr", "lr"]) == ["Set5", "mine=hr,lr"]
    folders = parse_paired_folders("mine[:3]=a/hr,a/lr")
    assert folders is not None
    assert (folders.name, folders.hr_dir, folders.lr_dir, folders.limit) == (
        "mine",
        Path("a/hr"),
        Path("a/lr"),
        3,
    )
    assert parse_paired_folders("Set5") is None
    with pytest.raises(ValueError, match="registered benchmark"):
        parse_paired_folders("set5=my/folder")
    with pytest.raises(ValueError, match="NAME=HR_DIR"):
        parse_paired_folders("=x")


def test_eval_paired_folders_label_and_match_the_named_set(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Was: ``--bench mine=HR`` -> "unknown benchmark"."""
    named = evaluate("bicubic", task="sr", scale=2, benchmarks="Set5", data_root=folders["root"])
    # HR only: LR made with MATLAB bicubic, exactly as for a registered set; no data root.
    made = evaluate(
        "bicubic", task="sr", scale=2, benchmarks=f"mine={folders['hr']}", data_root=None
    )
    # HR and LR folders (BasicSR's dataroot_gt / dataroot_lq), paired by stem (``ax2``).
    given = resolve_benchmarks(f"mine={folders['hr']},{folders['lr']}", None, task="sr", scale=2)
    assert [b.name for b in given] == ["mine"] and given[0].source_paths(0)[1].name == "ax2.png"
    paired = evaluate(
        "bicubic",
        task="sr",
        scale=2,
        benchmarks=f"mine={folders['hr']},{folders['lr']}",
        data_root=None,
    )
    assert made["mine"].psnr == pytest.approx(named["Set5"].psnr, abs=1e-9)
    assert paired["mine"].psnr == pytest.approx(named["Set5"].psnr, abs=1e-9)
    # The CLI: the user's name in the table, beside a registered set, subsets too.
    argv = ["eval", "--model", "bicubic", "--scale", "2", "--no-progress"]
    bench = f"Set5,mine[:1]={folders['hr']},{folders['lr']}"
    assert run_cli(*argv, "--bench", bench, "--data-root", folders["root"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "Method",
        "Scale",
        "Set5",
        "mine[:1]",
    ]
    # Denoising: the clean folder gets the seeded noise of the named sets.
    assert (
        run_cli(*argv[:3], "--task", "dn", "--sigma", "25", "--bench", f"mine={folders['hr']}") == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["Method", "Sigma", "mine"] and out[2].startswith("noisy input")
    # Bad input: one line naming the folder.
    assert run_cli(*argv, "--bench", f"mine={folders['hr'] / 'nope'}") == 2
    assert "ground-truth folder not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"size mismatch|no partner"):
        resolve_benchmarks(f"x={folders['hr']},{folders['lr']}", None, task="sr", scale=4)


def test_training_validation_takes_paired_folders(folders: dict[str, Path]) -> None:
    """Was: val.benchmarks named registered sets only (no dataroot_gt/dataroot_lq)."""
    from irformer.engine.train import default_validator

    cfg = config_from_dict(
        {
            "model": {"arch": "swinir_light_x2", "scale": 2},
            "val": {
                "benchmarks": ["Set5", f"mine={folders['hr']}", str(folders["lr"])],
                "root": str(folders["root"]),
            },
        }
    )
    scores = default_validator(cfg, torch.device("cpu"))(BicubicModel(2))
    assert set(scores) == {"Set5/psnr", "Set5/ssim", "mine/psnr", "mine/ssim"}
    assert scores["mine/psnr"] == pytest.approx(scores["Set5/psnr"], abs=1e-9)


def test_one_benchmark_resolver() -> None:
    """Was: ``eval`` canonicalised names itself (and lost ``[:N]``); experiments, training
    validation and eval each called ``load_benchmark`` their own way."""
    callers = []
    for path in SRC.rglob("*.py"):
        if path.name == "benchmarks.py" and path.parent.name == "data":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in ("load_benchmark", "get_benchmark", "find_benchmark_dir"):
                    callers.append(f"{path.relative_to(SRC)}: {name}")
    assert callers == []


def test_lowprec_takes_paired_folders_and_shipped_names(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Was: lowprec resolved names only and needed paths to existing files."""
    from irformer.experiments.lowprec import lowprec_report

    paths = []
    for norm in ("ln", "iln"):
        torch.manual_seed(0)
        model = build_model("swinir_light_x2", norm=norm, **TINY)
        paths.append(save_model_weights(tmp_path / f"{norm}.safetensors", model))
    calls: list[tuple[int, int, str]] = []
    report = lowprec_report(
        *paths,
        benchmarks=f"mine={folders['hr']},{folders['lr']}",
        data_root=None,
        settings=["fp32"],
        progress=lambda done, total, label: calls.append((done, total, label)),
    )
    assert report.benchmarks == ("mine",) and len(report.rows) == 2
    assert calls == [(0, 2, "lowprec"), (1, 2, "lowprec"), (2, 2, "lowprec")]


# --------------------------------------------------------------------------- item 3


def test_model_zoo_by_name(tmp_path: Path, monkeypatch, capsys) -> None:
    """Was: ``--model swinir_light_x4_iln`` -> unknown; ``--model swinir_light_x4`` ran
    random weights with a warning only."""
    choice = zoo.resolve_model("swinir_light_x4_iln")
    assert choice.kind == "shipped" and choice.path == zoo.WEIGHTS_DIR / (
        "swinir_light_x4_iln.safetensors"
    )
    assert zoo.weights_path("swinir_light_x2_ln").name == "swinir_light_x2_ln.safetensors"
    from irformer.experiments.compression import checkpoint_scale

    assert checkpoint_scale("swinir_light_x4_ln") == 4  # compress takes shipped names
    with pytest.raises(zoo.UntrainedModelError, match="--random-weights") as refused:
        zoo.resolve_model("swinir_light_x4")
    assert "swinir_light_x4_iln" in str(refused.value)  # names the shipped weights
    assert zoo.resolve_model("swinir_light_x4", random_weights=True).kind == "preset"
    with pytest.raises(FileNotFoundError, match="did you mean 'swinir_light_x4_iln'"):
        zoo.resolve_model("swinir_light_x4_ilm")
    shipped = {m.name: m for m in zoo.shipped_models()}
    assert (shipped["swinir_light_x2_iln"].norm, shipped["swinir_light_x2_iln"].scale) == (
        "iln",
        2,
    )
    # The CLI: eval / restore refuse a preset unless --random-weights.
    img = tmp_path / "in" / "a.png"
    write_image(img, smooth(12, 12, 0))
    assert run_cli("restore", img, "--model", "swinir_light_x2", "-o", tmp_path / "o1") == 2
    assert "--random-weights" in capsys.readouterr().err
    argv = ["eval", "--bench", f"mine={img.parent}", "--no-progress", "--no-baseline"]
    assert run_cli(*argv, "--model", "swinir_light_x2") == 2
    assert "a preset has no trained weights" in capsys.readouterr().err
    # models list marks the presets with shipped weights and lists the files.
    assert run_cli("models", "list", "--arch", "swinir", "--json") == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert {w["name"] for w in rows["swinir_light_x4"]["weights"]} == {
        "swinir_light_x4_ln",
        "swinir_light_x4_iln",
    }
    assert rows["swinir_light_x3"]["weights"] == []
    assert {r["task"] for r in rows.values()} <= set(TASKS)  # one task vocabulary
    assert run_cli("models", "list") == 0
    listed = capsys.readouterr().out
    assert "swinir_light_x2_ln, swinir_light_x2_iln" in listed or (
        "swinir_light_x2_iln, swinir_light_x2_ln" in listed
    )


def test_eval_takes_task_and_scale_from_a_shipped_name(tmp_path: Path, monkeypatch, capsys) -> None:
    """Was: ``eval --model NAME`` needed a path, and --scale/--task given by hand."""
    weights = tmp_path / "weights"
    torch.manual_seed(0)
    save_model_weights(
        weights / "tiny_x2_iln.safetensors", build_model("swinir_light_x2", norm="iln", **TINY)
    )
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", weights)
    hr = tmp_path / "hr"
    write_image(hr / "a.png", smooth(16, 16, 0))
    argv = ["eval", "--bench", f"mine={hr}", "--no-progress"]
    assert run_cli(*argv, "--model", "tiny_x2_iln") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:2] == ["bicubic", "x2"] and lines[3].split()[:2] == [
        "tiny_x2_iln",
        "x2",
    ]
    assert run_cli(*argv, "--model", "tiny_x2_iln", "--scale", "4") == 2
    assert "is an x2 model" in capsys.readouterr().err
    # A preset with --random-weights runs (its task and scale from the preset).
    assert run_cli(*argv, "--model", "swinir_light_x2", "--random-weights", "--no-baseline") == 0


# --------------------------------------------------------------------------- item 6

CONFIG = """\
name: tiny
model:
  arch: swinir_light_x2
  norm: ln
  scale: 2
  overrides: {{embed_dim: 12, depths: [2], num_heads: [2], window_size: 4, img_size: 8,
              drop_path_rate: 0.0}}
data: {{train: [{data}], patch_size: 16, batch_size: 2, workers: 0}}
train: {{iters: 2, lr: 1.0e-3, step_size: 25, ema: 0.0}}
val: {{every: 0}}
log: {{out_dir: {out}, every: 1, checkpoint_every: 1, keep_last: 10, probe_interval: 0}}
"""


def test_resume_run_dir(tmp_path: Path, caplog, capsys) -> None:
    """Was: --resume was a flag needing --config; a changed architecture on resume was a
    PyTorch error hundreds of lines long; a finished run was "resumed" silently."""
    caplog.set_level(logging.INFO, logger="irformer")
    data = tmp_path / "data"
    for i in range(3):
        write_image(data / f"im{i}.png", smooth(40, 40, i))
    run = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG.format(data=data, out=run))
    assert run_cli("train", "--config", config, "--no-progress") == 0
    config.unlink()  # the run folder alone is enough from now on
    metrics = (run / "metrics.jsonl").read_text()

    caplog.clear()
    assert run_cli("train", "--resume", run, "--no-progress") == 0  # finished: nothing to do
    assert "is finished (iteration 2 of 2" in caplog.text
    assert (run / "metrics.jsonl").read_text() == metrics

    caplog.clear()
    assert run_cli("train", "--resume", run, "--set", "train.iters=3", "--no-progress") == 0
    assert "train.iters: 2 -> 3" in caplog.text  # the override is logged
    assert "resumed from" in caplog.text
    assert [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    assert "iters: 3" in (run / "config.yaml").read_text()

    capsys.readouterr()
    argv = ["train", "--resume", run, "--set", "train.iters=5", "model.overrides.embed_dim=16"]
    assert run_cli(*argv, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.overrides.embed_dim: 12 -> 16" in err[0]
    assert "do not fit the model" in err[0]
    assert run_cli("train", "--resume", tmp_path / "nothing") == 2
    assert "no such run folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 7


@pytest.fixture
def tiny_iln(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("swinir_light_x2", norm="iln", **TINY)
    return save_model_weights(tmp_path / "tiny_iln.safetensors", model)


def test_restore_reports_each_image_once_and_warns_when_tiling_iln(
    tiny_iln: Path, tmp_path: Path, caplog, capsys
) -> None:
    """Was: every image was printed by the CLI and logged again by the library; tiling an
    i-LN model said nothing about per-tile statistics."""
    caplog.set_level(logging.INFO)
    src = tmp_path / "in"
    for name in ("a", "b"):
        write_image(src / f"{name}.png", smooth(12, 12, ord(name)))
    assert run_cli("restore", src, "--model", tiny_iln, "-o", tmp_path / "o", "--no-progress") == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err + caplog.text
    assert text.count(str(src / "a.png")) == 1 and text.count(str(src / "b.png")) == 1
    assert "tiles" not in caplog.text
    argv = ["restore", src / "a.png", "--model", tiny_iln, "-o", tmp_path / "t", "--tile", "8"]
    assert run_cli(*argv, "--tile-overlap", "2", "--no-progress") == 0
    assert "whole-image normalisation (HolisticLayerNorm)" in caplog.text
    assert "--exact-chunk" in caplog.text


def test_restore_alpha_keep_and_drop(tiny_iln: Path, tmp_path: Path, caplog) -> None:
    """Was: alpha was dropped with a Python warning per image, and never kept."""
    caplog.set_level(logging.INFO)
    rgba = smooth(12, 10, 3, channels=4)
    write_image(tmp_path / "in" / "logo.png", rgba)
    argv = ["restore", tmp_path / "in" / "logo.png", "--model", tiny_iln, "--no-progress"]
    assert run_cli(*argv, "-o", tmp_path / "keep") == 0  # the default
    kept = read_image(tmp_path / "keep" / "logo.png", channels="keep")
    assert kept.shape == (24, 20, 4)
    assert np.array_equal(kept[..., 3], matlab_imresize(rgba[..., 3], size=(24, 20)))
    assert "alpha" not in caplog.text
    assert run_cli(*argv, "-o", tmp_path / "drop", "--alpha", "drop") == 0
    dropped = read_image(tmp_path / "drop" / "logo.png", channels="keep")
    assert dropped.shape == (24, 20, 3) and np.array_equal(dropped, kept[..., :3])
    notices = [r for r in caplog.records if "alpha channel not written" in r.getMessage()]
    assert len(notices) == 1 and "alpha='drop'" in notices[0].getMessage()


def test_webp_is_read_or_named(tiny_iln: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    """Was: .webp files in a folder were skipped without a word."""
    import irformer.data.io as io

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(smooth(10, 10, 1)).save(src / "w.webp", lossless=True)
    write_image(src / "p.png", smooth(10, 10, 2))
    if io.WEBP_READABLE:
        assert (
            run_cli("restore", src, "--model", tiny_iln, "-o", tmp_path / "o", "--no-progress") == 0
        )
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["p.png", "w.png"]
        assert np.array_equal(read_image(src / "w.webp"), smooth(10, 10, 1))  # lossless
    monkeypatch.setattr(io, "READ_SUFFIXES", io.IMAGE_SUFFIXES)  # a Pillow without WebP
    caplog.set_level(logging.WARNING)
    assert [p.name for p in io.list_images(src)] == ["p.png"]
    assert "w.webp" in caplog.text and "cannot read" in caplog.text


def test_set_with_brackets_split_by_the_shell(tmp_path: Path, capsys) -> None:
    """Was: ``--set data.train=[a, b]`` unquoted reached irformer as two arguments and
    ended in a yaml ParserError traceback (or "expected KEY=VALUE" without the fix)."""
    config = tmp_path / "c.yaml"
    config.write_text("name: x\n")
    assert run_cli("train", "--config", config, "--set", "data.train=[a,", "b]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set 'data.train=[a, b]'" in err[0]
    with pytest.raises(ConfigError, match="quote"):
        load_config(None, ["b]"])
    with pytest.raises(ConfigError, match=r"unbalanced brackets.*quote"):
        load_config(None, ["model.overrides.depths=[a,"])
    with pytest.raises(ConfigError, match=r"cannot read .* as YAML.*quote"):
        load_config(None, ["model.overrides.depths=[a, 'b]"])
    with pytest.raises(ConfigError, match=r"data.train: cannot read .* as YAML.*quote"):
        load_config(None, ["data.train=[a, 'b]"])
    assert load_config(None, ["data.train=[a, b]"]).data.train == ("a", "b")


def test_progress_bars_follow_the_library_callbacks(capsys) -> None:
    from irformer.cli.progress import ProgressBars

    with ProgressBars(unit="img") as bars:
        for done in range(3):
            bars(done, 2, "Set5")
        bars(0, 1, "Set14")
        assert bars._label == "Set14" and bars._bar is not None and bars._bar.total == 1
    assert bars._bar is None
    assert "Set5" in capsys.readouterr().err


# --------------------------------------------------------------------------- item 8


def test_one_vocabulary(capsys) -> None:
    """Was: ``study --benchmarks`` beside ``--bench`` everywhere else, ``--set`` repeatable
    differently per command, help without defaults, no ``--version``."""
    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("irformer 0.")
    args = parser.parse_args(
        ["study", "norms", "--config", "c.yaml", "--iters", "1", "--bench", "Set5"]
    )
    assert args.bench == "Set5"
    args = parser.parse_args(
        ["study", "norms", "--config", "c", "--iters", "1", "--benchmarks", "B100"]
    )
    assert args.bench == "B100" and "--benchmarks is deprecated" in capsys.readouterr().err
    for command in (
        ["train", "--config", "c"],
        ["study", "scale", "--config", "c", "--iters", "1"],
    ):
        args = parser.parse_args([*command, "--set", "a=1", "b=2", "--set", "c=3"])
        assert args.overrides == ["a=1", "b=2", "c=3"]
    for command in (["eval"], ["restore"], ["compress", "run"], ["lowprec", "report"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*command, "--help"])
        assert "(default:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "--device DEVICE       auto, cpu, cuda or cuda:N (default: auto)" in text
    eval_task = next(
        a
        for a in parser._subparsers._group_actions[0].choices["eval"]._actions
        if "--task" in a.option_strings
    )
    assert tuple(eval_task.choices) == TASKS


# --------------------------------------------------------------------------- item 9


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Was: checkpoints and exports were 0600 (mkstemp) while images were 0644."""
    from irformer.engine.checkpoint import save_checkpoint
    from irformer.engine.evaluate import write_results_json

    previous = os.umask(umask)
    try:
        model = build_model("swinir_light_x2", **TINY)
        written = [
            save_checkpoint(
                tmp_path / "ckpt" / "iter_00000001.pth", {"params": model.state_dict()}
            ),
            save_model_weights(tmp_path / "w.safetensors", model),
            save_model_weights(tmp_path / "w.pth", model),
            write_image(tmp_path / "img.png", smooth(16, 16, 0)),
        ]
        result = evaluate(
            BicubicModel(1), task="dn", sigma=5, benchmarks=f"m={tmp_path}", data_root=None
        )
        written.append(write_results_json(result, tmp_path / "r.json"))
        assert run_cli("models", "export", tmp_path / "w.pth", tmp_path / "e.safetensors") == 0
        written.append(tmp_path / "e.safetensors")
    finally:
        os.umask(previous)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {p.name: oct(0o666 & ~umask) for p in written}


def test_shipped_benchmark_names_still_resolve(folders: dict[str, Path]) -> None:
    """``NAME[:N]`` and aliases through the one resolver (item 1, kept working)."""
    sub = load_benchmark("set5[:1]", folders["root"], task="sr", scale=2)
    assert sub.name == "Set5[:1]" and len(sub) == 1
    with pytest.raises(ValueError, match="needs a data root"):
        load_benchmark("Set5", None, task="sr", scale=2)


def test_a_closed_pipe_is_not_an_error() -> None:
    """Was: ``irformer models list | head`` ended with "error: [Errno 32] Broken pipe", exit 2."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "irformer", "models", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is printed
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err
