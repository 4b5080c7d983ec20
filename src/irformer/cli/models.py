"""``irformer models``: list the presets, inspect, export and describe a weights file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from irformer import archs

EXPORT_HELP = """Export a checkpoint (irformer or official weights, a training checkpoint).

formats (default from the output suffix):
  safetensors  irformer weights + metadata (.safetensors, or .pth as {"params", "irformer"})
  onnx         opset 18, dynamic batch/height/width (any input size: the reflect padding
               to the window multiple is inside the graph), plain ops; written only after
               ONNX Runtime matched PyTorch on two input sizes (fp32: max abs diff <= 1e-4)
  pt2          torch.export program with dynamic batch/height/width (torch.export.load)
  official     LN models in the original key layout with the buffers spandrel/chaiNNer
               need (.pth or .safetensors); i-LN and other norms are refused, because
               readers of that layout would run them as LayerNorm

Every file but 'official' records fp16_safe and the measured max |feature| in its metadata.
"""

CARD_HELP = """Model card of an irformer weights file: Markdown with YAML front matter
(hub / OpenModelDB fields), facts read from the file, its training config and its
`irformer eval --out-json` records; fp16 safety measured now. For a shipped file run
from the repository root: irformer models card src/irformer/weights/NAME.safetensors
-o src/irformer/weights/NAME.md
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list model presets, inspect checkpoints")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    lister = sub.add_parser(
        "list", help="presets with their parameter counts, and the shipped weights"
    )
    lister.add_argument("--arch", help="only this architecture")
    lister.add_argument("--json", action="store_true", help="machine-readable output")
    lister.set_defaults(func=list_command)
    info = sub.add_parser("info", help="metadata and detected architecture of a weights file")
    info.add_argument("checkpoint", help=".pth or .safetensors file, or a shipped model's name")
    info.add_argument("--param-key", help="state-dict key inside a .pth (default: params_ema)")
    info.set_defaults(func=info_command)
    export = sub.add_parser(
        "export",
        help="export a checkpoint: weights, ONNX, torch.export (pt2) or the official layout",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "checkpoint", help="training checkpoint, weights file or shipped model's name"
    )
    export.add_argument(
        "output",
        help="destination (never overwritten): .safetensors/.pth (weights), .onnx, .pt2",
    )
    export.add_argument(
        "--format",
        choices=("safetensors", "onnx", "pt2", "official"),
        default=None,
        help="default: from the output suffix (.safetensors/.pth: irformer weights)",
    )
    export.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="precision of onnx (fp32, fp16) and pt2 files; fp16 only for fp16-safe models "
        "(default: fp32)",
    )
    export.add_argument(
        "--param-key", help="which weights of a training checkpoint (default: params_ema)"
    )
    export.add_argument(
        "--no-check",
        action="store_true",
        help="write onnx/pt2 files without comparing them with the PyTorch model first",
    )
    export.set_defaults(func=export_command)
    card = sub.add_parser(
        "card",
        help="model card (Markdown, YAML front matter) of an irformer weights file",
        description=CARD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    card.add_argument("checkpoint", help="irformer .safetensors/.pth weights file")
    card.add_argument(
        "-o", "--out", help="write the card here (default: print it); never overwritten"
    )
    card.add_argument(
        "--config", help="training config of the weights (default: configs/reference/<stem>.yaml)"
    )
    card.add_argument(
        "--eval-json",
        action="append",
        default=None,
        metavar="JSON",
        help="`irformer eval --out-json` record of the weights, repeatable "
        "(default: docs/reference/eval_<stem>*.json)",
    )
    card.add_argument(
        "--root",
        default=".",
        help="repository root the defaults and the card's paths are relative to (default: .)",
    )
    card.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    card.set_defaults(func=card_command)


def preset_table(arch: str | None = None) -> list[dict[str, object]]:
    """One row per preset: name, arch, task, scale, parameter count (built on 'meta') and
    the shipped weights files of the preset (``--model`` names; empty: random weights only)."""
    from irformer.archs.zoo import shipped_models

    shipped = shipped_models()
    rows = []
    for name in archs.list_presets(arch):
        with torch.device("meta"):
            model = archs.build_model(name)
        meta = archs.model_meta(model)
        rows.append(
            {
                "preset": name,
                "arch": meta["arch"],
                "task": meta["task"],
                "scale": meta["scale"],
                "params": archs.count_parameters(model),
                "weights": [
                    {"name": m.name, "norm": m.norm, "path": str(m.path)}
                    for m in shipped
                    if m.preset == name
                ],
            }
        )
    return rows


def list_command(args: argparse.Namespace) -> int:
    rows = preset_table(args.arch)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(str(r["preset"])) for r in rows) if rows else 6
    print(f"{'preset':<{width}}  {'arch':<9} {'task':<5} {'scale':>5} {'params':>12}  weights")
    shipped = []
    for r in rows:
        files = r["weights"]
        assert isinstance(files, list)
        shipped += files
        names = ", ".join(f["name"] for f in files) or "-"
        print(
            f"{r['preset']:<{width}}  {r['arch']:<9} {r['task']:<5} {r['scale']:>5} "
            f"{r['params']:>12,}  {names}"
        )
    print(
        "\nweights: trained weights shipped with irformer (--model NAME); '-': random "
        "weights only (--model PRESET --random-weights)"
    )
    if shipped:
        print("Shipped files (what they are worth: docs/reference/MODEL_CARD.md):")
        for f in shipped:
            print(f"  {f['name']}  norm={f['norm']}  {f['path']}")
    return 0


def info_command(args: argparse.Namespace) -> int:
    from irformer.archs.zoo import weights_path

    info = archs.describe_checkpoint(weights_path(args.checkpoint), param_key=args.param_key)
    json.dump(info, sys.stdout, indent=2, default=str)
    print()
    if not info["meta"]:
        detected = info["detected"]
        hint = (
            f"detected {detected['arch']} (presets: {', '.join(detected['presets']) or 'none'})"
            if detected
            else "no known architecture matches"
        )
        print(f"no irformer metadata (an official file; loaded as norm 'ln'); {hint}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Export one model; refuses an existing output so nothing is lost."""
    from irformer.archs.zoo import weights_path
    from irformer.export import export_model, format_for_path

    output = Path(args.output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose another name or remove it first")
    fmt = format_for_path(output, args.format)
    source = weights_path(args.checkpoint)
    model, meta = archs.load_checkpoint_model(source, param_key=args.param_key)
    result = export_model(model, meta, output, fmt=fmt, dtype=args.dtype, check=not args.no_check)
    note = f"{archs.count_parameters(model):,} parameters, norm {meta['norm']}"
    print(f"wrote {result.path} ({result.format}, {result.dtype}; {note})")
    if "fp16_safe" in result.meta:
        print(
            f"fp16_safe: {str(result.meta['fp16_safe']).lower()} (max |x| "
            f"{result.meta['fp16_max_abs']} at {result.meta['fp16_max_layer']})"
        )
    if result.checks:
        runtime = "ONNX Runtime" if result.format == "onnx" else "exported program"
        for check in result.checks:
            print(f"  max |{runtime} - PyTorch| on {check.shape}: {check.max_abs_diff:.3g}")
        print(f"  within {result.tolerance:g}")
    return 0


def card_command(args: argparse.Namespace) -> int:
    """Print or write the model card of a weights file."""
    from irformer.data.io import check_writable
    from irformer.export.cards import CardSources, find_card_sources, model_card

    root = Path(args.root)
    found = find_card_sources(args.checkpoint, root)
    sources = CardSources(
        config=Path(args.config) if args.config else found.config,
        evaluations=tuple(Path(p) for p in args.eval_json)
        if args.eval_json is not None
        else found.evaluations,
        notes=found.notes,
    )
    for path in (sources.config, *sources.evaluations):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"card source not found: {path}")
    text = model_card(args.checkpoint, sources, root=root)
    if args.out is None:
        print(text, end="")
        return 0
    from irformer.files import atomic_write

    check_writable(Path(args.out), overwrite=args.overwrite)
    atomic_write(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
