"""``irformer models``: list the presets, inspect a weights file."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from irformer import archs


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
        "export", help="weights only (one state dict + irformer metadata) from a checkpoint"
    )
    export.add_argument("checkpoint", help="training checkpoint or weights file")
    export.add_argument("output", help="destination .safetensors or .pth (never overwritten)")
    export.add_argument(
        "--param-key", help="which weights of a training checkpoint (default: params_ema)"
    )
    export.set_defaults(func=export_command)


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
    """Export one set of weights; refuses an existing output so nothing is lost."""
    from pathlib import Path

    output = Path(args.output)
    if output.exists():
        raise FileExistsError(f"{output} exists; choose another name or remove it first")
    model, meta = archs.load_checkpoint_model(args.checkpoint, param_key=args.param_key)
    path = archs.save_model_weights(output, model, meta)
    print(f"wrote {path} ({archs.count_parameters(model):,} parameters, norm {meta['norm']})")
    return 0
