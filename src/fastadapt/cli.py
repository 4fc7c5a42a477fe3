"""The ``fastadapt`` command line: the only place that reads configuration files and flags."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from . import __version__
from . import data as _data  # noqa: F401  (registers datasets)
from . import methods as _methods  # noqa: F401  (registers methods)
from . import models as _models  # noqa: F401  (registers backbones)
from .config import DEFAULTS, check_same_run, default_run_dir, load_yaml, method_options, resolve, save_yaml
from .data import build_task_source
from .engine.allocator import tune_malloc
from .engine.evaluate import evaluate, format_result
from .engine.runs import open_run
from .engine.trainer import CHECKPOINT, CURVE, METRICS, TrainSettings, meta_train, plot_learning_curve
from .errors import ConfigError, FastAdaptError
from .io import atomic_write_text
from .registry import BACKBONES, DATASETS, METHODS
from .tta.cli import add_tta_parser

TRAIN_KEYS = ("dataset", "data_dir", "download", "image_size", "train_split", "ways", "shots", "queries", "steps",
              "meta_batch", "lr", "lr_decay_every", "lr_decay", "weight_decay", "seed", "device",
              "checkpoint_every", "log_every", "val_every", "val_episodes", "max_train_seconds")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _add_method_options(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per method option of any registered method (types from the defaults)."""
    g = p.add_argument_group("method options (each method reads its own; see README)")
    for key, default in method_options().items():
        if key in skip or key in DEFAULTS:
            continue
        if isinstance(default, bool):
            g.add_argument(_flag(key), dest=key, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {default})")
        else:
            typ = type(default) if default is not None else str
            g.add_argument(_flag(key), dest=key, type=typ, default=None, help=f"(default {default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastadapt",
        description="Efficient meta-learning and test-time adaptation on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"fastadapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="meta-train a method, then evaluate it on the test split",
                       description="Meta-train METHOD on episodes of --dataset, checkpointing into --out "
                                   "(re-running the same command resumes an interrupted run), then evaluate "
                                   "on unseen test classes.")
    t.add_argument("method", help=f"one of: {', '.join(METHODS.names())}")
    t.add_argument("--config", help="YAML preset (see configs/); flags override it")
    t.add_argument("--dataset", help=f"one of: {', '.join(DATASETS.names())} (default builtin: no download)")
    t.add_argument("--task", dest="dataset", help="alias of --dataset (e.g. --task sinusoid)")
    t.add_argument("--data-dir", help="dataset folder (Omniglot: holds images_background/ and images_evaluation/; "
                                      "default: $FASTADAPT_DATA/DATASET if it exists, else download)")
    t.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download missing datasets (default: yes)")
    t.add_argument("--image-size", type=int, help="resize images to this side (default: the dataset's)")
    t.add_argument("--train-split", choices=["train", "trainval"], help="classes to meta-train on (default train)")
    t.add_argument("--ways", type=int, help="classes per training episode")
    t.add_argument("--shots", type=int, help="support examples per class")
    t.add_argument("--queries", type=int, help="query examples per class")
    t.add_argument("--steps", type=int, help="meta-iterations (a larger value extends a finished run)")
    t.add_argument("--meta-batch", type=int, help="tasks per meta-iteration")
    t.add_argument("--lr", type=float, help="meta learning rate (Adam)")
    t.add_argument("--lr-decay-every", type=int, help="halve (x --lr-decay) the rate every N iterations; 0: never")
    t.add_argument("--lr-decay", type=float, help="learning-rate decay factor")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu or cuda")
    t.add_argument("--checkpoint-every", type=int, help="iterations between checkpoints")
    t.add_argument("--log-every", type=int, help="iterations between metrics-log lines")
    t.add_argument("--val-every", type=int, help="validate every N iterations (0: never)")
    t.add_argument("--val-episodes", type=int)
    t.add_argument("--max-train-seconds", type=float,
                   help="time budget: stop training (checkpointed) after this many seconds; 0: none")
    t.add_argument("--eval-ways", type=int, help="ways of the final test evaluation")
    t.add_argument("--eval-shots", type=int)
    t.add_argument("--eval-queries", type=int)
    t.add_argument("--eval-episodes", type=int)
    t.add_argument("--out", help="run directory (default runs/METHOD-DATASET-WAYSwSHOTSs-seedSEED)")
    t.add_argument("--no-progress", action="store_true", help="hide progress (bars, or periodic lines in logs)")
    _add_method_options(t)
    t.set_defaults(handler=cmd_train)

    e = sub.add_parser("eval", help="evaluate a trained run on unseen classes",
                       description="Adapt the learner of RUN_DIR to test episodes and print accuracy (or MSE) "
                                   "± 95%% CI with the adaptation time, meta-training time and peak memory.")
    e.add_argument("run_dir")
    e.add_argument("--ways", type=int)
    e.add_argument("--shots", type=int)
    e.add_argument("--queries", type=int)
    e.add_argument("--episodes", type=int)
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation episodes (default 0)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--data-dir", help="where the dataset is now, if it moved")
    e.add_argument("--device", help="cpu or cuda (default: the run's)")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    _add_method_options(e)
    e.set_defaults(handler=cmd_eval)

    ls = sub.add_parser("list", help="list the registered methods, datasets and backbones")
    ls.set_defaults(handler=cmd_list)

    add_tta_parser(sub)
    return parser


def _method_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in method_options() if k not in DEFAULTS and getattr(args, k, None) is not None}


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def cmd_train(args: argparse.Namespace) -> int:
    preset = load_yaml(args.config) if args.config else {}
    flags: dict[str, Any] = {k: getattr(args, k) for k in TRAIN_KEYS}
    flags.update(_method_flags(args))
    ev = {k: getattr(args, f"eval_{k}") for k in ("ways", "shots", "queries", "episodes")}
    flags["eval"] = {k: v for k, v in ev.items() if v is not None} or None
    cfg = resolve(args.method, preset, flags)
    _check_device(cfg["device"])
    progress = not args.no_progress
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    if (run_dir / "config.yaml").is_file():
        check_same_run(yaml.safe_load((run_dir / "config.yaml").read_text()) or {}, cfg, run_dir)

    data_cfg = {**cfg, "progress": progress}
    torch.manual_seed(cfg["seed"])
    source = build_task_source(data_cfg, "train", cfg["ways"], cfg["shots"], cfg["queries"])
    ev = cfg["eval"]
    test_source = build_task_source(data_cfg, "test", ev["ways"], ev["shots"], ev["queries"])
    val_source = (build_task_source(data_cfg, "val", ev["ways"], ev["shots"], ev["queries"])
                  if cfg["val_every"] else None)
    learner = METHODS.get(cfg["method"]).from_config(cfg, source.in_shape)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", save_yaml(cfg))

    resuming = (run_dir / CHECKPOINT).is_file()
    print(f"{'resuming' if resuming else 'training'} {cfg['method']} on {cfg['dataset']} "
          f"({cfg['ways']}-way {cfg['shots']}-shot, {cfg['queries']} queries, {cfg['steps']} iterations) "
          f"-> {run_dir}", flush=True)
    settings = TrainSettings(**{k: cfg[k] for k in ("steps", "meta_batch", "lr", "lr_decay_every", "lr_decay",
                                                     "weight_decay", "seed", "device", "checkpoint_every",
                                                     "log_every", "val_every", "val_episodes",
                                                     "max_train_seconds")},
                             progress=progress)
    result = meta_train(learner, source, settings, run_dir, val_source)
    print(f"meta-training: {result.step} iterations, {result.train_seconds:.1f} s in all "
          f"({result.episodes_per_s:.1f} episodes/s in this invocation), peak memory {result.peak_mem_mb:.0f} MB",
          flush=True)
    res = evaluate(learner, test_source, ev["episodes"], seed=0, device=cfg["device"], progress=progress,
                   desc="test")
    res.update(ways=ev["ways"], shots=ev["shots"], queries=ev["queries"], split="test", step=result.step,
               meta_train_seconds=result.train_seconds, train_episodes_per_s=result.episodes_per_s,
               train_peak_mem_mb=result.peak_mem_mb)
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2) + "\n")
    plot_learning_curve(run_dir / METRICS, run_dir / CURVE)  # again, now with the test result
    print(f"test {ev['ways']}-way {ev['shots']}-shot: {format_result(res)}")
    print(f"outputs: {run_dir}/ (config.yaml, checkpoint.pt, metrics.jsonl, learning_curve.png, results.json)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.device:
        _check_device(args.device)
    progress = not args.no_progress
    run = open_run(args.run_dir, args.device, {**_method_flags(args), "data_dir": args.data_dir}, progress=progress)
    cfg, learner = run.config, run.learner
    ev = dict(cfg["eval"])
    for k in ("ways", "shots", "queries", "episodes"):
        if getattr(args, k) is not None:
            ev[k] = getattr(args, k)
    source = build_task_source({**cfg, "progress": progress}, args.split, ev["ways"], ev["shots"], ev["queries"])
    res = evaluate(learner, source, ev["episodes"], seed=args.seed, device=cfg["device"], progress=progress,
                   desc=args.split)
    res.update(ways=ev["ways"], shots=ev["shots"], queries=ev["queries"], split=args.split, seed=args.seed,
               method=cfg["method"], dataset=cfg["dataset"], step=run.step, meta_train_seconds=run.train_seconds)
    print(f"{args.split} {ev['ways']}-way {ev['shots']}-shot: {format_result(res)}")
    print(f"meta-training time: {res['meta_train_seconds']:.1f} s ({res['step']} iterations)")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for title, reg in (("methods", METHODS), ("datasets", DATASETS), ("backbones", BACKBONES)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Reuse freed tensor memory instead of unmapping it every iteration (see engine/allocator.py;
    # a no-op off glibc or when MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ are set).
    tune_malloc()
    try:
        return args.handler(args)
    except FastAdaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the run was checkpointed; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
