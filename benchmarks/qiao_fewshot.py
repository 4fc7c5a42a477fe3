"""Parameter prediction from activations (qiao) against ProtoNet and the nearest-class-mean
baseline (ncm), on the same backbone with the same wall-clock training budget per model.

    python benchmarks/qiao_fewshot.py --data-dir ../shared/data/omniglot --budget 200
    python benchmarks/qiao_fewshot.py --dataset imagefolder --data-dir my_data --image-size 84 --budget 600

Models (each trained for ``--budget`` seconds of training time, then tested on 5-way 1-shot and
5-shot episodes of unseen classes, 15 queries per class, mean accuracy with its 95% CI):

* ``ncm``: the backbone pre-trained as a cosine classifier of all training classes for the whole
  budget; nearest support mean (cosine). One model serves both shots.
* ``qiao``: the same pre-training for the first ``--pretrain-share`` of the iterations ncm reached
  in its budget (same seed: the same batches, so its extractor at the switch is ncm's at that
  step), then the weight predictor meta-trained on ``--train-ways``-way 1-shot episodes for the
  rest of the budget. One model serves both shots; also tested in the joint setting (novel
  queries classified among the novel and all training classes).
* ``protonet``: one model per shot, trained with that shot on ``--train-ways``-way episodes (the
  paper's setting on Omniglot, from ``configs/protonet_omniglot_*shot.yaml``).

Beside accuracy: adaptation time per task (median ms), meta-training time and iterations,
parameter count, peak memory of training and of testing (each command runs in a fresh process),
threads and load average. An ablation evaluates qiao's extractor with its predictor back at
initialisation (the identity, i.e. cosine nearest mean of normalised activations) on the same
test episodes: what meta-training the predictor added. Reference
(the paper, miniImageNet 5-way 1/5-shot): 54.53 / 67.87 with a simple net, 59.60 / 73.74 with
WRN-28-10; figures from this script are for the dataset and budget it was run with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import CONFIGS, require_clean_tree, save

PAPER_MINIIMAGENET = {"simple net": {"5w1s": 54.53, "5w5s": 67.87}, "WRN-28-10": {"5w1s": 59.60, "5w5s": 73.74}}


def _log(msg: str) -> None:
    print(f"[qiao_fewshot] {msg}", flush=True)


def run(argv: list[str]) -> None:
    """One ``fastadapt`` command in a fresh process, so that each model's peak memory is its own
    (in one process, memory kept by the allocator from earlier models would count again)."""
    done = subprocess.run([sys.executable, "-m", "fastadapt", *argv])
    if done.returncode != 0:
        sys.exit(f"fastadapt {' '.join(argv)} failed with exit code {done.returncode}")


def _identity_predictor(run_dir: Path, shots: int, args: argparse.Namespace) -> dict:
    """qiao's extractor with its predictor back at initialisation (the identity: cosine nearest
    mean of the normalised activations), on the same test episodes: what meta-training phi adds."""
    import fastadapt as fa
    from fastadapt.methods.qiao import WeightPredictor

    learner, cfg = fa.load_run(run_dir, device="cpu")
    learner.predictor = WeightPredictor(learner.classifier.shape[1], learner.predictor.kind)
    test = fa.build_task_source({**cfg, "progress": False}, "test", 5, shots, 15)
    res = fa.evaluate(learner, test, args.episodes, seed=0, progress=False)
    return {"accuracy": round(res["accuracy"], 2), "ci95": round(res["ci95"], 2), "episodes": res["episodes"]}


def _eval(run_dir: Path, shots: int, args: argparse.Namespace, tag: str, *extra: str) -> dict:
    js = run_dir / f"eval_5w{shots}s{tag}.json"
    run(["eval", str(run_dir), "--ways", "5", "--shots", str(shots), "--queries", "15", "--episodes",
         str(args.episodes), "--threads", str(args.threads), "--json", str(js), *extra])
    return json.loads(js.read_text())


def _params(run_dir: Path) -> dict:
    from fastadapt import load_run

    learner, _ = load_run(run_dir, device="cpu")
    count = sum(p.numel() for p in learner.parameters())
    backbone = getattr(learner, "backbone", None)
    return {"params": count, "backbone_params": sum(p.numel() for p in backbone.parameters()) if backbone else count}


def _row(run_dir: Path, results: dict, by_shot: dict) -> dict:
    row = {"train_steps": results["step"], "meta_train_seconds": round(results["meta_train_seconds"], 1),
           "train_peak_mem_mb": round(results["train_peak_mem_mb"], 1), **_params(run_dir),
           "threads": results.get("threads"), "load_avg_at_train_end": results.get("load_avg")}
    for key, res in by_shot.items():
        row[key] = {"accuracy": round(res["accuracy"], 2), "ci95": round(res["ci95"], 2),
                    "adapt_ms": round(res["adapt_ms"], 2), "eval_peak_mem_mb": round(res["peak_mem_mb"], 1),
                    "episodes": res["episodes"], "load_avg": res.get("load_avg")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="omniglot", choices=["omniglot", "imagefolder", "builtin"])
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--image-size", type=int, default=None, help="default: the dataset's (28; image folders 84)")
    ap.add_argument("--backbone", default="conv4")
    ap.add_argument("--budget", type=float, default=200, help="training seconds per model")
    ap.add_argument("--pretrain-share", type=float, default=0.75,
                    help="qiao: share of ncm's iterations spent pre-training before meta-training")
    ap.add_argument("--train-ways", type=int, default=None, help="ways of training episodes (default 60 on "
                    "Omniglot as Snell et al., else 20)")
    ap.add_argument("--episodes", type=int, default=1000, help="test episodes per setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/bench-qiao")
    ap.add_argument("--name", default=None, help="results file name (default qiao_fewshot_DATASET_cpu)")
    args = ap.parse_args()
    if not 0 < args.pretrain_share < 1:
        sys.exit("--pretrain-share must be between 0 and 1")
    require_clean_tree()
    import torch

    torch.set_num_threads(args.threads)
    name = args.name or f"qiao_fewshot_{args.dataset}_cpu"
    ways = args.train_ways or (60 if args.dataset == "omniglot" else 20)
    out = Path(args.out_dir)
    data = ["--dataset", args.dataset, "--data-dir", args.data_dir] if args.dataset != "builtin" else []
    if args.image_size:
        data += ["--image-size", str(args.image_size)]
    common = [*data, "--backbone", args.backbone, "--seed", str(args.seed), "--threads", str(args.threads),
              "--max-train-seconds", str(args.budget), "--steps", "10000000", "--val-every", "0",
              "--checkpoint-every", "500", "--log-every", "50", "--eval-ways", "5", "--eval-shots", "1",
              "--eval-queries", "15", "--eval-episodes", str(args.episodes)]
    table: dict[str, dict] = {}

    _log(f"ncm: pre-training for {args.budget:g} s")
    ncm_dir = out / "ncm"
    run(["train", "ncm", *common, "--out", str(ncm_dir)])
    ncm = json.loads((ncm_dir / "results.json").read_text())
    table["ncm"] = _row(ncm_dir, ncm, {"5w1s": ncm, "5w5s": _eval(ncm_dir, 5, args, "")})

    pretrain = max(1, int(args.pretrain_share * ncm["step"]))
    _log(f"qiao: {pretrain} pre-training iterations ({args.pretrain_share:g} of ncm's {ncm['step']}), then the "
         f"predictor on {ways}-way 1-shot episodes, {args.budget:g} s in all")
    qiao_dir = out / "qiao"
    run(["train", "qiao", *common, "--pretrain-steps", str(pretrain), "--ways", str(ways), "--shots", "1",
         "--queries", "5", "--out", str(qiao_dir)])
    qiao = json.loads((qiao_dir / "results.json").read_text())
    table["qiao"] = _row(qiao_dir, qiao, {"5w1s": qiao, "5w5s": _eval(qiao_dir, 5, args, ""),
                                          "5w1s_joint": _eval(qiao_dir, 1, args, "_joint", "--joint"),
                                          "5w5s_joint": _eval(qiao_dir, 5, args, "_joint", "--joint")})
    table["qiao"]["pretrain_steps"] = pretrain
    table["qiao"]["untrained_predictor"] = {f"5w{k}s": _identity_predictor(qiao_dir, k, args) for k in (1, 5)}

    for shots in (1, 5):
        _log(f"protonet {shots}-shot: {args.budget:g} s")
        proto_dir = out / f"protonet_{shots}shot"
        preset = ["--config", str(CONFIGS / f"protonet_omniglot_{shots}shot.yaml")] if args.dataset == "omniglot" else []
        run(["train", "protonet", *preset, *common, "--ways", str(ways), "--shots", str(shots), "--queries", "5",
             "--eval-shots", str(shots), "--out", str(proto_dir)])
        proto = json.loads((proto_dir / "results.json").read_text())
        table[f"protonet_{shots}shot"] = _row(proto_dir, proto, {f"5w{shots}s": proto})

    for method, row in table.items():
        cells = [f"{k} {v['accuracy']:.2f} ± {v['ci95']:.2f} ({v['adapt_ms']:.1f} ms)"
                 for k, v in row.items() if isinstance(v, dict) and "accuracy" in v]
        _log(f"{method}: {'; '.join(cells)}; {row['train_steps']} iterations in {row['meta_train_seconds']} s, "
             f"{row['params']:,} parameters, training peak {row['train_peak_mem_mb']} MB")
    save(name, {"dataset": args.dataset, "data_dir": args.data_dir, "image_size": args.image_size,
                "backbone": args.backbone, "budget_seconds_per_model": args.budget,
                "pretrain_share": args.pretrain_share, "train_ways": ways, "episodes": args.episodes,
                "threads": args.threads, "seed": args.seed, "results": table,
                "paper_miniimagenet": PAPER_MINIIMAGENET})


if __name__ == "__main__":
    main()
