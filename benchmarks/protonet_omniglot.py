"""Reproduce the Prototypical Networks Omniglot table (Snell et al. 2017, Table 1) in a budget.

Trains two models as in the paper (60-way episodes, 5 queries per class, training shots = test
shots, Adam 1e-3 halved every 2000 episodes) for a fixed wall-clock budget each, then evaluates
5-way and 20-way accuracy on the 1692 test classes, 1000 episodes of 15 queries per class each.

    python benchmarks/protonet_omniglot.py --data-dir ../shared/data/omniglot --budget 900

Paper: 5w1s 98.8, 5w5s 99.7, 20w1s 96.0, 20w5s 98.9.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import CONFIGS, run_cli as run, save

PAPER = {"5w1s": 98.8, "5w5s": 99.7, "20w1s": 96.0, "20w5s": 98.9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--budget", type=float, default=900, help="training seconds per model")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default="runs/bench-protonet-omniglot")
    ap.add_argument("--name", default="protonet_omniglot_cpu")
    args = ap.parse_args()

    results, training = {}, {}
    for shots in (1, 5):
        run_dir = Path(args.out_dir) / f"{shots}shot"
        run(["train", "protonet", "--config", str(CONFIGS / f"protonet_omniglot_{shots}shot.yaml"),
             "--data-dir", args.data_dir, "--device", args.device, "--max-train-seconds", str(args.budget),
             "--steps", "100000", "--eval-episodes", str(args.episodes), "--no-progress", "--out", str(run_dir)])
        five = json.loads((run_dir / "results.json").read_text())
        results[f"5w{shots}s"] = five
        js = run_dir / "eval_20way.json"
        run(["eval", str(run_dir), "--ways", "20", "--shots", str(shots), "--queries", "15",
             "--episodes", str(args.episodes), "--json", str(js), "--no-progress"])
        results[f"20w{shots}s"] = json.loads(js.read_text())
        training[f"{shots}shot"] = {k: five[k] for k in ("step", "meta_train_seconds", "train_episodes_per_s",
                                                         "train_peak_mem_mb")}
    table = {k: {"accuracy": round(v["accuracy"], 2), "ci95": round(v["ci95"], 2), "paper": PAPER[k],
                 "adapt_ms": round(v["adapt_ms"], 2), "peak_mem_mb": round(v["peak_mem_mb"], 1)}
             for k, v in results.items()}
    for k, v in table.items():
        print(f"{k}: {v['accuracy']:.2f} ± {v['ci95']:.2f} %   (paper {v['paper']})")
    save(args.name, {"budget_seconds_per_model": args.budget, "device": args.device, "episodes": args.episodes,
                     "training": training, "results": table})


if __name__ == "__main__":
    main()
