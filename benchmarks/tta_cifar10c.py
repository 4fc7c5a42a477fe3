"""Test-time adaptation on CIFAR-10-C-style corruptions: error per corruption and cost.

Evaluates source (no adaptation), BN adaptation, TENT (online), TTT and TTT-online on all 15
corruptions at one severity, from a source run folder written by ``fastadapt tta train-source
--rotation-head``. Writes JSON (resumable: cells already in the file with the same settings are
kept) and a bar plot next to it.

    python benchmarks/tta_cifar10c.py --run RUN_DIR --data-dir ../shared/data/cifar10 \
        --ttt-images 64 --ttt-online-images 500 --out benchmarks/results/tta_cifar10c_resnet8.json

TTT runs a per-image optimisation (10 SGD steps on 32 augmented copies per image); on a CPU it is
evaluated on a fixed seeded subset of the test stream (the first N images of the same seeded
order every method sees), and the source error on exactly those images is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from fastadapt.io import atomic_write_text
from fastadapt.engine.tta_eval import evaluate_run, format_tta_result
from fastadapt.tta.corruptions import CORRUPTIONS
from fastadapt.tta.train_source import read_run

PAPER = {
    "source": "ResNet-26, severity 5, mean over 15 corruptions: 40.8 (TENT paper, Table 2)",
    "bn": "17.3 (TENT paper, Table 2)",
    "tent": "14.3 (TENT paper, Table 2)",
    "ttt": "17.5 (TENT paper, Table 2, TTT with its joint-training baseline)",
    "ttt-online": "20.4 with its own baseline at 34.6 (TTT paper, severity 5, ResNet-26 with GroupNorm)",
}
METHODS = ("source", "bn", "tent", "ttt", "ttt-online")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(CORRUPTIONS) + ["mean"]
    methods = [m for m in METHODS if m in doc["results"]]
    fig, ax = plt.subplots(figsize=(14, 4.5))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        cells = doc["results"][m]
        vals = [cells[c]["error"] if c in cells else float("nan") for c in CORRUPTIONS]
        vals.append(doc["mean_error"].get(m, float("nan")))
        ax.bar([i + k * width for i in range(len(names))], vals, width,
               label=f"{m} ({doc['images_per_method'][m]} imgs/corruption)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=40, ha="right")
    ax.set_ylabel("error (%)")
    ax.set_title(f"CIFAR-10-C-style corruptions, severity {doc['severity']}, {doc['model']['arch']} "
                 f"({doc['model']['epochs']} epochs, CPU)")
    ax.legend(fontsize=8, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--corruptions", default="all")
    p.add_argument("--max-images", type=int, default=0, help="source/BN/TENT subset (0: all 10,000)")
    p.add_argument("--ttt-images", type=int, default=64)
    p.add_argument("--ttt-online-images", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ttt-bn", default="train", choices=["train", "frozen"],
                   help="TTT on a BatchNorm model: keep the source statistics or update them during the steps")
    p.add_argument("--out", default="benchmarks/results/tta_cifar10c_resnet8.json")
    p.add_argument("--merge", nargs="*", default=[],
                   help="JSON files of runs with the same settings (e.g. methods run in parallel) to take cells from")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    methods = args.methods.split(",")
    names = list(CORRUPTIONS) if args.corruptions == "all" else args.corruptions.split(",")
    run = Path(args.run)
    model_cfg, summary = read_run(run)
    images = {"source": args.max_images, "bn": args.max_images, "tent": args.max_images,
              "ttt": args.ttt_images, "ttt-online": args.ttt_online_images}
    settings = {"severity": args.severity, "seed": args.seed, "images": images}
    if args.ttt_bn != "train":
        settings["ttt_bn"] = args.ttt_bn
    doc = json.loads(out.read_text()) if out.is_file() else {}
    if doc.get("settings") != settings:
        doc = {"results": {}, "source_on_same_images": {}}
    doc.update(
        description="Error (%) of test-time adaptation methods on CIFAR-10 test images with the 15 CIFAR-10-C "
                    "corruptions (our vectorised implementation of the published parameters, seeded), "
                    "each corruption evaluated from the source model afresh; mean ± 95% CI over images.",
        command=" ".join([sys.executable.split('/')[-1]] + sys.argv),
        machine={"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "threads": args.threads, "device": "cpu",
                 "note": "2 CPU cores shared with other jobs: timings are noisy"},
        git_commit=_git_commit(),
        date=datetime.now(timezone.utc).isoformat(),
        settings=settings,
        severity=args.severity,
        model={"arch": model_cfg["arch"], "norm": model_cfg["norm"], "rotation_head": model_cfg["rotation_head"],
               "epochs": model_cfg["epochs"], "train_seconds": summary.get("train_seconds"),
               "clean_test_error": summary.get("clean_test_error"),
               "training": "SGD momentum 0.9 nesterov, lr 0.1 cosine, wd 5e-4, batch 128, crop+flip, "
                           "joint rotation loss; CPU, 1 thread",
               "train_command": (f"fastadapt tta train-source --dataset cifar10 --data-dir ../shared/data/cifar10 "
                                 f"--arch {model_cfg['arch']} --norm {model_cfg['norm']}"
                                 f"{' --rotation-head' if model_cfg['rotation_head'] else ''} "
                                 f"--epochs {model_cfg['epochs']} --out RUN_DIR")},
        figures_from=f"All figures come from the CPU-sized {model_cfg['arch']} trained here. No ResNet-26 figures: "
                     "ResNet-26 (fastadapt tta train-source --arch resnet26) needs a GPU that this machine lacks.",
        paper_anchors_mean_error_severity5=PAPER,
        images_per_method={m: images[m] or 10000 for m in methods},
        method_settings={
            "source": "eval mode, source BatchNorm statistics",
            "bn": "BatchNorm with test-batch statistics, batch 128",
            "tent": "online, Adam lr 1e-3, batch 128, one step per batch, BatchNorm affine only",
            "ttt": "reset per image, 10 plain SGD steps (lr 1e-3, as the authors' code) on 32 augmented randomly "
                   "rotated copies, trunk only; "
                   + ("BatchNorm keeps source statistics" if args.ttt_bn == "frozen" else
                      "BatchNorm in train mode during the steps (running statistics, momentum 0.1, move towards "
                      "the test image's; reset with the weights)"),
            "ttt-online": "weights and BatchNorm statistics kept across the stream, 1 step per image, otherwise as ttt",
        },
        stream="CIFAR-10 test set in a seeded random order (seed 0); methods with a subset see its first N images",
    )
    doc.setdefault("results", {})
    doc.setdefault("source_on_same_images", {})
    for part in args.merge:
        other = json.loads(Path(part).read_text())
        if other.get("settings") != settings:
            raise SystemExit(f"{part} was run with other settings; cannot merge it")
        doc.setdefault("merged_runs", [])
        if other.get("command") not in doc["merged_runs"]:
            doc["merged_runs"].append(other.get("command"))
        for key in ("results", "source_on_same_images"):
            for m, cells in other.get(key, {}).items():
                doc[key].setdefault(m, {}).update(cells)

    def save() -> None:
        doc["mean_error"] = {m: sum(c["error"] for c in cells.values()) / len(cells)
                             for m, cells in doc["results"].items() if len(cells) == len(CORRUPTIONS)}
        atomic_write_text(out, json.dumps(doc, indent=1) + "\n")

    for m in methods:
        cells = doc["results"].setdefault(m, {})
        for name in names:
            if name in cells:
                continue
            t0 = time.perf_counter()
            r = evaluate_run(run, m, [name], args.severity, args.data_dir, 128, images[m], args.seed,
                             options={"ttt_bn": args.ttt_bn}, progress=False)[0]
            r["wall_seconds"] = round(time.perf_counter() - t0, 1)
            cells[name] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            print(format_tta_result(r), flush=True)
            if images[m] and m != "source":
                same = evaluate_run(run, "source", [name], args.severity, args.data_dir, 128, images[m],
                                    args.seed, progress=False)[0]
                doc["source_on_same_images"].setdefault(m, {})[name] = round(same["error"], 3)
            save()
    save()
    for m, e in doc["mean_error"].items():
        extra = ""
        if m in doc["source_on_same_images"] and len(doc["source_on_same_images"][m]) == len(CORRUPTIONS):
            src = sum(doc["source_on_same_images"][m].values()) / len(CORRUPTIONS)
            extra = f"  (source on the same {images[m]} images: {src:.2f})"
        print(f"mean error {m:<10} {e:6.2f} %{extra}")
    _plot(doc, out.with_suffix(".png"))
    print(markdown_summary(doc))
    return 0


def markdown_summary(doc: dict) -> str:
    """The per-method table of the README: mean error, the source on the same images, costs."""
    rows = ["| method | images per corruption | mean error (%) | source on the same images (%) | ms per image | "
            "ms per batch | peak memory (MB) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    src_all = doc["mean_error"].get("source")
    for m in METHODS:
        if m not in doc["mean_error"]:
            continue
        cells = list(doc["results"][m].values())
        same = doc["source_on_same_images"].get(m)
        same_txt = f"{sum(same.values()) / len(same):.1f}" if same and len(same) == len(cells) else \
            (f"{src_all:.1f}" if src_all is not None else "-")
        ms_img = sorted(c["ms_per_image"] for c in cells)[len(cells) // 2]
        ms_batch = sorted(c["ms_per_batch"] for c in cells)[len(cells) // 2]
        peak = max(c["peak_mem_mb"] for c in cells)
        rows.append(f"| {m} | {doc['images_per_method'][m]} | {doc['mean_error'][m]:.1f} | {same_txt} | "
                    f"{ms_img:.1f} | {ms_batch:.0f} (batch {cells[0]['batch_size']}) | {peak:.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
