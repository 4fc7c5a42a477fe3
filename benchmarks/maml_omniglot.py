"""MAML on Omniglot in the paper's settings (Finn et al. 2017, Table 1), in a training budget.

Settings (``configs/maml_omniglot_*.yaml``): 5-way: 1 inner step of 0.4, meta-batch 32,
evaluated with 3 inner steps; 20-way: 5 inner steps of 0.1, meta-batch 16, evaluated with 5.
Each model trains for ``--budget`` seconds of wall clock (the paper: 60,000 meta-iterations),
then is evaluated on test-class episodes with 15 queries per class, with the training and with the
paper's number of inner steps.

    python benchmarks/maml_omniglot.py --data-dir ../shared/data/omniglot --budget 900 --settings 5w1s

``--batching loop,grouped`` trains one model per batching in each setting (same budget, one after
the other), to compare what each reaches in the same time.

Paper: 5w1s 98.7, 5w5s 99.9, 20w1s 95.8, 20w5s 98.9.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _common import CONFIGS, run_cli as run, save

PAPER = {"5w1s": 98.7, "5w5s": 99.9, "20w1s": 95.8, "20w5s": 98.9}
EVAL_STEPS = {"5": 3, "20": 5}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--budget", type=float, default=900, help="training seconds per model")
    ap.add_argument("--settings", default="5w1s,5w5s,20w1s,20w5s")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", default="runs/bench-maml-omniglot")
    ap.add_argument("--name", default="maml_omniglot_cpu")
    ap.add_argument("--batching", default="auto", help="comma-separated: a model per --batching value")
    args = ap.parse_args()

    results = {}
    runs = [(s, b) for s in args.settings.split(",") for b in args.batching.split(",")]
    for setting, batching in runs:
        ways, shots = setting.rstrip("s").split("w")
        key = setting if batching == "auto" else f"{setting}-{batching}"
        run_dir = Path(args.out_dir) / f"maml-omni-{key}"
        run(["train", "maml", "--config", str(CONFIGS / f"maml_omniglot_{setting}.yaml"), "--data-dir", args.data_dir,
             "--batching", batching,
             "--download", "--device", args.device, "--max-train-seconds", str(args.budget),
             "--eval-episodes", str(args.episodes), "--log-every", "5", "--checkpoint-every", "50",
             "--no-progress", "--out", str(run_dir)])
        train_res = json.loads((run_dir / "results.json").read_text())
        js = run_dir / "eval_paper_steps.json"
        run(["eval", str(run_dir), "--inner-steps", str(EVAL_STEPS[ways]), "--ways", ways, "--shots", shots,
             "--queries", "15", "--episodes", str(args.episodes), "--json", str(js), "--no-progress"])
        ev = json.loads(js.read_text())
        results[key] = {
            "paper": PAPER[setting], "batching": batching,
            "accuracy_train_inner_steps": round(train_res["accuracy"], 2), "ci95_train_inner_steps": round(train_res["ci95"], 2),
            "eval_inner_steps": EVAL_STEPS[ways], "accuracy": round(ev["accuracy"], 2), "ci95": round(ev["ci95"], 2),
            "meta_iterations": train_res["step"], "meta_train_seconds": round(train_res["meta_train_seconds"], 1),
            "adapt_ms": round(ev["adapt_ms"], 2), "peak_mem_mb": round(ev["peak_mem_mb"], 1),
            "train_peak_mem_mb": round(train_res["train_peak_mem_mb"], 1),
        }
        r = results[key]
        print(f"{key}: {r['accuracy']:.2f} ± {r['ci95']:.2f} % with {r['eval_inner_steps']} steps after "
              f"{r['meta_iterations']} meta-iterations (paper {r['paper']})", flush=True)
        # Saved after every setting, so a long run stopped part-way keeps what it finished.
        save(args.name, {"budget_seconds_per_model": args.budget, "device": args.device, "episodes": args.episodes,
                         "threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
