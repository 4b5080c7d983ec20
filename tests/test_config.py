"""Config loading: strict keys with suggestions, typed overrides, round trips, shipped configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from irformer.engine.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_ROOT / "configs").rglob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_paper() -> None:
    cfg = Config()
    assert cfg.train.lr == 2e-4
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.train.ema == 0.999
    assert cfg.train.gamma == 0.5
    assert cfg.train.scheduler == "steplr"
    assert cfg.data.train == ("datasets/DF2K/HR",)


def test_yaml_loads_into_typed_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name: x
model: {arch: swinir_light_x4, norm: iln, scale: 4, overrides: {depths: [2, 2]}}
data: {train: some/folder, patch_size: 128, batch_size: 4}
train: {lr: 1e-4, milestones: [10, 20], scheduler: multisteplr, betas: [0.8, 0.9]}
""",
    )
    cfg = load_config(path)
    assert cfg.model.overrides == {"depths": [2, 2]}
    assert cfg.data.train == ("some/folder",)  # a single folder becomes a tuple
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.milestones == (10, 20)
    assert cfg.train.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {lrr: 1}", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        ("trian: {lr: 1}", "unknown config key 'trian'; did you mean 'train'?"),
        ("log: {chekpoint_every: 5}", "did you mean 'log.checkpoint_every'?"),
        ("train: {iters: many}", "train.iters: expected an integer, got 'many'"),
        ("train: {betas: [0.9]}", "train.betas: expected 2 values"),
        ("data: {task: inpaint}", "data.task: 'inpaint' is not one of sr, dn, car, dr"),
        ("data: {task: dn}", "model.scale: task 'dn' restores at scale 1, got 2"),
        ("data: {patch_size: 65}", "data.patch_size: 65 is not divisible by model.scale 2"),
        ("train: {ema: 1.0}", "train.ema"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_overrides_are_typed_by_the_field() -> None:
    cfg = load_config(
        None,
        [
            "train.lr=1e-4",
            "train.iters=1_000",
            "train.bf16=true",
            "train.warm_start=null",
            "train.milestones=[5, 7]",
            "data.train=[a, b]",
            "model.norm=iln",
            "model.overrides.embed_dim=30",
            "model.overrides.depths=[1, 2]",
            "val.benchmarks=Set14",
        ],
    )
    assert cfg.train.lr == 1e-4 and cfg.train.iters == 1000 and cfg.train.bf16 is True
    assert cfg.train.warm_start is None
    assert cfg.train.milestones == (5, 7)
    assert cfg.data.train == ("a", "b")
    assert cfg.model.overrides == {"embed_dim": 30, "depths": [1, 2]}
    assert cfg.val.benchmarks == ("Set14",)


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {lr: 0.5, iters: 10}\nmodel: {overrides: {a: 1}}")
    cfg = load_config(path, ["train.lr=0.25", "model.overrides.b=2"])
    assert cfg.train.lr == 0.25 and cfg.train.iters == 10
    assert cfg.model.overrides == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrate=1", "did you mean 'train.lr'?"),
        ("train.lr", "expected KEY=VALUE"),
        ("train.lr.x=1", "'train.lr' is a value, not a section"),
        ("train.bf16=maybe", "train.bf16: expected true/false"),
    ],
)
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(None, [override])


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.milestones=[1, 2]", "model.overrides.depths=[2]"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.train = None  # type: ignore[misc]


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.skipif(not CONFIGS, reason="no configs/ shipped yet")
def test_every_shipped_config_loads() -> None:
    names = set()
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.name not in names, f"duplicate run name {cfg.name} in {path}"
        names.add(cfg.name)
        assert cfg.log.out_dir.endswith(cfg.name), path
    # 6 variants x tasks x {ln, iln}, Table 1 (9 norms), Table 7 (2), reference runs (2).
    assert len(CONFIGS) >= 53


def test_generated_configs_are_current() -> None:
    script = REPO_ROOT / "configs" / "generate.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_paper_settings_in_shipped_configs() -> None:
    hat = load_config(REPO_ROOT / "configs" / "hat_2" / "sr_x4_iln.yaml")
    assert hat.train.milestones == (250_000, 400_000, 450_000, 475_000)
    assert hat.train.iters == 500_000 and hat.model.overrides == {"stdnorm": True}
    dagger = load_config(REPO_ROOT / "configs" / "hat_dagger" / "sr_x4_ln.yaml")
    assert dagger.train.lr == 1e-4 and dagger.data.patch_size == 256
    assert dagger.train.warm_start.endswith("hat_dagger_sr_x2_ln/checkpoints/iter_00500000.pth")
    dr = load_config(REPO_ROOT / "configs" / "swinir_1" / "dr_ln.yaml")
    assert (dr.data.patch_size, dr.data.batch_size, dr.model.scale) == (128, 8, 1)
    table1 = {p.stem.rsplit("_", 1)[-1] for p in (REPO_ROOT / "configs" / "table1").glob("*.yaml")}
    assert {"ln", "layerscale", "rms", "rezero", "none", "in", "bn", "star", "iln"} <= table1


def test_table3_ablation_configs() -> None:
    """HAT_2 (Table 13 setting) has all four Table 3 rows; the rescaled rows normalise
    the input (stdnorm) as the authors' i-LN configs do."""
    rows = {}
    for norm in ("ln", "ln_rs", "ln_star", "iln"):
        cfg = load_config(REPO_ROOT / "configs" / "hat_2" / f"sr_x4_{norm}.yaml")
        assert cfg.model.norm == norm and cfg.model.arch == "hat_2_x4"
        rows[norm] = cfg
    assert {n: c.model.overrides["stdnorm"] for n, c in rows.items()} == {
        "ln": False, "ln_rs": True, "ln_star": False, "iln": True}  # fmt: skip
    assert len({(c.train, c.data) for c in rows.values()}) == 1  # only the norm differs


@pytest.mark.parametrize(
    "path", ["docs/norm_study/base.yaml", "docs/norm_study/ablation/hat_base.yaml"]
)
def test_cpu_study_configs_build_every_table3_norm(path: str) -> None:
    """The CPU study bases load and build with each Table 3 norm (the study sets it)."""
    import dataclasses

    from irformer.engine.train import build_network

    base = load_config(REPO_ROOT / path)
    sizes = set()
    for norm in ("ln", "ln_rs", "ln_star", "iln"):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, norm=norm))
        model = build_network(cfg)
        assert model.norm_name == norm
        sizes.add(sum(p.numel() for p in model.parameters()))
    assert len(sizes) == 1 and 150_000 < sizes.pop() < 250_000  # small, same for all rows
