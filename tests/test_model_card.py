"""``irformer models card``: hub / OpenModelDB fields read from the file, its config and evals."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
import yaml

from irformer.archs import build_model, save_model_weights
from irformer.cli import main
from irformer.export.cards import find_card_sources, model_card

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from export_cases import EXPORT_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "irformer" / "weights" / "swinir_light_x2_iln.safetensors"
TINY = EXPORT_TINY["swinir_light"][1]  # the export tests' tiny SwinIR-light


def front_matter(card: str) -> dict[str, object]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped x2 i-LN weights are absent")
def test_card_of_a_shipped_file() -> None:
    sources = find_card_sources(SHIPPED, REPO)
    assert sources.config == REPO / "configs" / "reference" / "swinir_light_x2_iln.yaml"
    assert sources.evaluations
    card = model_card(SHIPPED, sources, root=REPO)
    front = front_matter(card)
    assert (front["arch"], front["norm"], front["scale"], front["task"]) == (
        "swinir",
        "iln",
        2,
        "sr",
    )
    assert front["sha256"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert front["fp16_safe"] is True and 0 < front["fp16_max_abs"] < 65504 / 4
    assert front["trainingIterations"] > 0 and front["dataset"]
    assert "Set5" in front["metrics"]  # type: ignore[operator]
    assert (
        "irformer eval --model src/irformer/weights/swinir_light_x2_iln.safetensors --task sr "
        "--scale 2" in card
    )
    assert "## fp16 safety" in card and "## Licence" in card


def test_card_without_sources_and_cli(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "tiny_ln.safetensors"
    save_model_weights(weights, build_model("swinir", norm="ln", **TINY))
    out = tmp_path / "tiny_ln.md"
    assert main(["models", "card", str(weights), "-o", str(out), "--root", str(tmp_path)]) == 0
    card = out.read_text()
    front = front_matter(card)
    assert front["norm"] == "ln" and front["parameters"] > 0
    assert isinstance(front["fp16_safe"], bool) and front["fp16_max_layer"]
    assert "trainingIterations" not in front and "metrics" not in front
    assert card.count("Not recorded") == 2
    # Never overwritten; a missing explicit source is one clear error.
    assert main(["models", "card", str(weights), "-o", str(out)]) == 2
    missing = tmp_path / "nope.json"
    assert main(["models", "card", str(weights), "--eval-json", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_card_refuses_a_file_without_irformer_metadata(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model("swinir", norm="ln", **TINY)
    official = tmp_path / "official.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(official))
    with pytest.raises(ValueError, match="no irformer metadata"):
        model_card(official)


def test_card_of_a_multi_level_record(tmp_path: Path) -> None:
    """A blind DN model's eval file is a list (levels x {noisy input, model}): the card
    lists the model's rows per level, leaves the baseline out and gives one command."""
    import json

    torch.manual_seed(0)
    weights = tmp_path / "tiny_dn_iln.safetensors"
    save_model_weights(weights, build_model("swinir", norm="iln", **TINY))
    records = []
    for sigma, base, ours in ((15.0, 24.6, 31.2), (50.0, 14.4, 25.9)):
        for model, psnr in (("noisy input", base), ("tiny_dn_iln", ours)):
            bench = {"benchmark": "CBSD68", "psnr": psnr, "ssim": 0.8, "num_images": 68}
            records.append(
                {
                    "model": model,
                    "task": "dn",
                    "scale": 1,
                    "sigma": sigma,
                    "quality": None,
                    "precision": "fp32",
                    "benchmarks": [bench],
                }
            )
    record = tmp_path / "docs" / "reference" / "eval_tiny_dn_iln.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps(records))
    sources = find_card_sources(weights, tmp_path)
    assert sources.evaluations == (record,)
    card = model_card(weights, sources, root=tmp_path)
    assert front_matter(card)["metrics"] == {
        "CBSD68 (sigma 15)": {"psnr": 31.2, "ssim": 0.8},
        "CBSD68 (sigma 50)": {"psnr": 25.9, "ssim": 0.8},
    }
    assert "| CBSD68 (sigma 50) | 68 | 25.90 | 0.8000 |" in card and "24.60" not in card
    assert "--task dn --sigma 15,50 --bench CBSD68" in card
