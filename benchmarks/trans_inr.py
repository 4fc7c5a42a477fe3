"""Trans-INR against Learned Init and a random initialisation, on the same INR and the same budget.

For each dataset, Trans-INR (Chen & Wang, ECCV 2022) and Learned Init (Tancik et al., CVPR 2021)
are meta-trained for the same wall-clock budget with the package defaults, then evaluated with
random init (the same INR and inner loop as Learned Init, nothing meta-trained) on the same held-out
test images: PSNR ± 95% CI, the paired PSNR difference Trans-INR - Learned Init on the same images,
adaptation time per image, peak memory, parameter counts and meta-training time. The two models
train in alternating slices (``--slice`` seconds each, resumed from their checkpoints) so that a
change in the machine's load falls on both alike.

    python benchmarks/trans_inr.py --data-root ../shared/data --budget 300 --datasets mnist-images,cifar10-images

Writes ``benchmarks/results/<name>.json`` and ``<name>.png`` (ground truth | each method, four test
images per dataset). The paper reports Trans-INR above Learned Init on CelebA, Imagenette and LSUN
Churches at 178 px after long GPU training.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from _common import require_clean_tree, save, save_figure

import fastadapt as fa
from fastadapt.config import resolve
from fastadapt.engine.reconstruct import reconstruct, show_image
from fastadapt.measure.stats import mean_ci95
from fastadapt.measure.threads import cost_context, set_threads
from fastadapt.models.inr import build_inr
from fastadapt.progress import progress_bar
from fastadapt.registry import METHODS

FOLDERS = {"mnist-images": "mnist", "cifar10-images": "cifar10", "omniglot-images": "omniglot"}
TRAINED = ("trans-inr", "learned-init")
METHOD_NAMES = ("trans-inr", "learned-init", "random-init")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(method: str, dataset: str, data_dir: str | None, seed: int) -> tuple[dict, object, object]:
    cfg = resolve(method, None, {"dataset": dataset, "data_dir": data_dir, "seed": seed})
    cfg["progress"] = False
    source = fa.build_task_source(cfg, "train", 1, 1, 1)
    torch.manual_seed(seed)
    return cfg, source, METHODS.get(method).from_config(cfg, source.in_shape)


def run_dataset(dataset: str, args: argparse.Namespace) -> tuple[dict, dict]:
    data_dir = str(Path(args.data_root) / FOLDERS[dataset]) if dataset in FOLDERS else None
    learners, configs, train_info = {}, {}, {}
    sources = {}
    for method in METHOD_NAMES:
        configs[method], sources[method], learners[method] = build(method, dataset, data_dir, args.seed)
    # Alternate slices of training so that both models see the same mix of machine load.
    out = Path(args.out_dir) / dataset
    slices = max(1, math.ceil(args.budget / args.slice))
    load_log = []
    for k in progress_bar(range(1, slices + 1), desc=f"{dataset}: training slices", unit="slice"):
        limit = min(args.budget, k * args.slice)
        for method in TRAINED:
            cfg = configs[method]
            settings = fa.TrainSettings(steps=10**9, meta_batch=cfg["meta_batch"], lr=cfg["lr"], seed=args.seed,
                                        checkpoint_every=0, log_every=cfg["log_every"], max_train_seconds=limit,
                                        progress=False)
            result = fa.meta_train(learners[method], sources[method], settings, out / method)
            train_info[method] = {"iterations": result.step, "meta_train_seconds": round(result.train_seconds, 1),
                                  "train_peak_mem_mb": round(result.peak_mem_mb, 1),
                                  "images_per_s": round(result.step * cfg["meta_batch"] / result.train_seconds, 1),
                                  "meta_batch": cfg["meta_batch"], "lr": cfg["lr"]}
        load_log.append(cost_context()["load_avg"])
    train_info["random-init"] = {"iterations": 0, "meta_train_seconds": 0.0}

    test_cfg = {**configs["trans-inr"], "progress": False}
    test = fa.build_task_source(test_cfg, "test", 1, 1, 1)
    rows, scores, grids = {}, {}, {}
    for method in METHOD_NAMES:
        res = fa.evaluate(learners[method], test, episodes=args.eval_images, seed=0, progress=False, keep_scores=True)
        scores[method] = res.pop("scores")
        inr = build_inr(configs[method], test.in_shape)
        rows[method] = {
            "psnr": round(res["psnr"], 2), "ci95": round(res["ci95"], 2),
            "adapt_ms_per_image": round(res["adapt_ms"], 2), "eval_peak_mem_mb": round(res["peak_mem_mb"], 1),
            "parameters": count(learners[method]), "inr_parameters": count(inr),
            **train_info[method], **{k: configs[method][k] for k in configs[method]
                                     if k in ("inner_steps", "inner_lr", "first_order", "inner_optim")},
        }
        grids[method] = reconstruct(learners[method], test, count=args.grid_images, seed=0)
    diff = [a - b for a, b in zip(scores["trans-inr"], scores["learned-init"])]
    mean, ci = mean_ci95(diff)
    paired = {"trans_inr_minus_learned_init_db": round(mean, 2), "ci95": round(ci, 2),
              "significant": abs(mean) > ci, "images": len(diff)}
    info = {"image_shape": list(test.in_shape), "train_images": len(sources["trans-inr"]), "test_images": len(test),
            "eval_images": args.eval_images, "load_avg_after_each_slice": load_log, "results": rows, "paired": paired,
            **cost_context()}
    grid = {"ground truth": grids["trans-inr"]["ground truth"], **{m: grids[m]["reconstruction"] for m in METHOD_NAMES}}
    return info, grid


def figure(grids: dict[str, dict[str, torch.Tensor]], rows: dict[str, dict]) -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["ground truth", *METHOD_NAMES]
    n = sum(len(g["ground truth"]) for g in grids.values())
    fig, axes = plt.subplots(n, len(columns), figsize=(1.3 * len(columns), 1.2 * n + 0.4 * len(grids)), squeeze=False)
    r = 0
    for dataset, grid in grids.items():
        for i in range(len(grid["ground truth"])):
            for j, col in enumerate(columns):
                ax = axes[r][j]
                show_image(ax, grid[col][i])
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:  # each dataset's block is headed by the method and its mean test PSNR
                    head = dataset if j == 0 else f"{col}\n{rows[dataset]['results'][col]['psnr']:.1f} dB"
                    ax.set_title(head, fontsize=7)
            r += 1
    fig.tight_layout(pad=0.3)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--datasets", default="mnist-images,cifar10-images")
    ap.add_argument("--budget", type=float, default=300, help="meta-training seconds per model")
    ap.add_argument("--slice", type=float, default=60, help="seconds of one training slice before switching model")
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--grid-images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default="runs/bench-trans-inr")
    ap.add_argument("--name", default="trans_inr_cpu")
    args = ap.parse_args()
    require_clean_tree()
    set_threads(args.threads)
    start = time.perf_counter()
    results, grids = {}, {}
    for dataset in args.datasets.split(","):
        results[dataset], grids[dataset] = run_dataset(dataset, args)
        for method, row in results[dataset]["results"].items():
            print(f"{dataset} {method}: {row['psnr']:.2f} ± {row['ci95']:.2f} dB, adapt {row['adapt_ms_per_image']:.1f} "
                  f"ms/image, {row['iterations']} iterations", flush=True)
        p = results[dataset]["paired"]
        print(f"{dataset} trans-inr - learned-init: {p['trans_inr_minus_learned_init_db']:+.2f} ± {p['ci95']:.2f} dB",
              flush=True)
    save_figure(figure(grids, results), args.name)
    save(args.name, {"budget_seconds_per_model": args.budget, "slice_seconds": args.slice, "threads": args.threads,
                     "wall_seconds": round(time.perf_counter() - start, 1), "datasets": results})


if __name__ == "__main__":
    main()
