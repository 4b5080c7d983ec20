"""Markdown tables of the blind DN/CAR reference models from their committed eval records.

    python docs/reference/blind_tables.py            # reads docs/reference/eval_swinir_1_*.json
    python docs/reference/blind_tables.py --dir DIR  # records elsewhere (same file names)
    python docs/reference/blind_tables.py --val      # validation curves from train_*.jsonl

For each task: one block of rows per noise level / JPEG quality -- the degraded
input itself, ``ln``, ``iln`` and the gap ``iln - ln`` -- and, where the i-LN paper
reports that level (Table 2c: sigma 15 and 25; Table 2d: quality 10 and 40, SwinIR_1,
trained per level for 300K iterations), the paper's LN / i-LN rows and gap. Every number
printed comes from the JSON records or from the constants below (copied from the paper).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PAPER_DN: dict[float, dict[str, dict[str, float]]] = {
    # i-LN paper, Table 2(c): SwinIR_1 colour denoising, PSNR (dB) only.
    15.0: {
        "ln": {"Urban100": 35.077, "CBSD68": 34.164, "Kodak24": 35.147, "McMaster": 35.183},
        "iln": {"Urban100": 35.138, "CBSD68": 34.181, "Kodak24": 35.177, "McMaster": 35.223},
    },
    25.0: {
        "ln": {"Urban100": 32.753, "CBSD68": 31.480, "Kodak24": 32.643, "McMaster": 32.829},
        "iln": {"Urban100": 32.803, "CBSD68": 31.489, "Kodak24": 32.660, "McMaster": 32.848},
    },
}
PAPER_CAR: dict[int, dict[str, dict[str, tuple[float, float]]]] = {
    # i-LN paper, Table 2(d): SwinIR_1 JPEG artifact removal, PSNR (dB) / SSIM.
    10: {
        "ln": {"Urban100": (27.86, 0.8400), "LIVE1": (27.65, 0.7995), "classic5": (29.72, 0.8111)},
        "iln": {"Urban100": (27.92, 0.8410), "LIVE1": (27.62, 0.7993), "classic5": (29.72, 0.8111)},
    },
    40: {
        "ln": {"Urban100": (32.62, 0.9245), "LIVE1": (32.34, 0.9127), "classic5": (34.11, 0.9036)},
        "iln": {"Urban100": (32.68, 0.9252), "LIVE1": (32.35, 0.9129), "classic5": (34.12, 0.9038)},
    },
}


def _records(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [data]


def _level(record: dict, task: str) -> float:
    return float(record["sigma"] if task == "dn" else record["quality"])


def _means(record: dict) -> dict[str, tuple[float, float]]:
    return {b["benchmark"]: (b["psnr"], b["ssim"]) for b in record["benchmarks"]}


def table(task: str, folder: Path) -> str:
    """The markdown table of one task (both norms' records must exist)."""
    stems = {norm: f"swinir_1_{task}_{norm}" for norm in ("ln", "iln")}
    by_norm: dict[str, dict[float, dict]] = {}
    baseline: dict[float, dict] = {}
    for norm, stem in stems.items():
        for record in _records(folder / f"eval_{stem}.json"):
            level = _level(record, task)
            if record["model"] == stem:
                by_norm.setdefault(norm, {})[level] = record
            else:
                baseline[level] = record  # the noisy / JPEG input (identical in both files)
    levels = sorted(by_norm["ln"])
    if sorted(by_norm["iln"]) != levels:
        raise ValueError(f"{task}: the ln and iln records cover different levels")
    sets = [b["benchmark"] for b in by_norm["ln"][levels[0]]["benchmarks"]]
    dn = task == "dn"
    setting = "sigma" if dn else "q"
    head = f"| {setting} | model | " + " | ".join(f"{s} PSNR / SSIM" for s in sets) + " |"
    lines = [head, "|" + "---|" * (len(sets) + 2)]

    def cell(psnr: float, ssim: float | None, digits: int) -> str:
        return f"{psnr:.{digits}f}" + ("" if ssim is None else f" / {ssim:.4f}")

    def gap(a: float, b: float, digits: int) -> str:
        return f"{b - a:+.{digits}f}"

    for level in levels:
        shown = f"{level:g}"
        rows = [("noisy input" if dn else "JPEG input", baseline.get(level))]
        rows += [(f"`{norm}` (ours)", by_norm[norm][level]) for norm in ("ln", "iln")]
        for label, record in rows:
            if record is None:
                continue
            means = _means(record)
            cells = [cell(*means[s], 3 if dn else 2) if s in means else "-" for s in sets]
            lines.append(f"| {shown} | {label} | " + " | ".join(cells) + " |")
        ln, iln = _means(by_norm["ln"][level]), _means(by_norm["iln"][level])
        gaps = [
            f"**{gap(ln[s][0], iln[s][0], 3 if dn else 2)}** / {gap(ln[s][1], iln[s][1], 4)}"
            if s in ln and s in iln
            else "-"  # a record still being written: this set is not scored yet
            for s in sets
        ]
        lines.append(f"| {shown} | `iln` - `ln` (ours) | " + " | ".join(gaps) + " |")
        paper = (PAPER_DN if dn else PAPER_CAR).get(level if dn else int(level))
        if paper is None:
            continue
        for norm in ("ln", "iln"):
            cells = []
            for s in sets:
                value = paper[norm].get(s)
                if value is None:
                    cells.append("-")
                elif dn:
                    cells.append(f"{value:.3f}")
                else:
                    cells.append(cell(value[0], value[1], 2))
            name = "LN" if norm == "ln" else "i-LN"
            lines.append(f"| {shown} | paper SwinIR_1 + {name} | " + " | ".join(cells) + " |")
        cells = []
        for s in sets:
            a, b = paper["ln"].get(s), paper["iln"].get(s)
            if a is None or b is None:
                cells.append("-")
            elif dn:
                cells.append(gap(a, b, 3))
            else:
                cells.append(f"{gap(a[0], b[0], 2)} / {gap(a[1], b[1], 4)}")
        lines.append(f"| {shown} | paper i-LN - LN | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_table(task: str, folder: Path) -> str:
    """PSNR / SSIM of the runs' validation (the config's ``val``) at each iteration it ran,
    ``ln`` vs ``iln``, from ``train_swinir_1_<task>_<norm>.jsonl`` (a run's metrics.jsonl;
    a resumed run's repeated iterations keep their last value)."""
    curves: dict[str, dict[int, dict[str, float]]] = {}
    sets: set[str] = set()
    for norm in ("ln", "iln"):
        path = folder / f"train_swinir_1_{task}_{norm}.jsonl"
        for line in path.read_text().splitlines():
            row = json.loads(line)
            vals = {k.split("/")[-1]: v for k, v in row.items() if k.startswith("val/")}
            sets |= {k.split("/")[1] for k in row if k.startswith("val/")}
            if vals:
                curves.setdefault(norm, {})[int(row["iter"])] = vals
    lines = [
        f"| iteration | `ln` {'/'.join(sorted(sets))} PSNR / SSIM | `iln` | `iln` - `ln` |",
        "|---|---|---|---|",
    ]
    for it in sorted(set(curves.get("ln", {})) & set(curves.get("iln", {}))):
        ln, iln = curves["ln"][it], curves["iln"][it]
        lines.append(
            f"| {it} | {ln['psnr']:.3f} / {ln['ssim']:.4f} | {iln['psnr']:.3f} / "
            f"{iln['ssim']:.4f} | {iln['psnr'] - ln['psnr']:+.3f} / "
            f"{iln['ssim'] - ln['ssim']:+.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=HERE, help="folder of the eval_*.json files")
    parser.add_argument(
        "--val", action="store_true", help="the validation curves (train_*.jsonl) instead"
    )
    args = parser.parse_args(argv)
    if args.val:
        for task, title in (("dn", "Colour denoising"), ("car", "JPEG artifact removal")):
            print(
                f"### {title}: validation during training\n\n{validation_table(task, args.dir)}\n"
            )
        return 0
    for task, title in (("dn", "Colour denoising"), ("car", "JPEG artifact removal")):
        print(f"### {title}\n\n{table(task, args.dir)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
