"""The ``fastadapt lopt`` commands: meta-train a learned optimizer, and evaluate it against tuned baselines."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import optim as _optim  # noqa: F401  (registers the learned rules)
from ..engine.lopt import (BASELINES, CHECKPOINT, CURVE, METRICS, RULE_FILE, RUN_KEYS, LoptSettings,
                           evaluate_optimizers, format_table, meta_train_lopt, plot_curves, read_lopt_config)
from ..engine.trainer import plot_learning_curve
from ..errors import ConfigError
from ..io import atomic_write_text, previous_checkpoint
from ..registry import LEARNED_RULES, OPTIMIZEES
from ..tasks.optimizee import make_problem


def _option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def _rule_options_help() -> str:
    parts = []
    for name in LEARNED_RULES.names():
        sig = inspect.signature(LEARNED_RULES.get(name).__init__)
        opts = ", ".join(f"{p.name}={p.default}" for p in sig.parameters.values() if p.name != "self")
        parts.append(f"{name}: {opts}")
    return "; ".join(parts)


def add_lopt_parser(subparsers: Any) -> argparse.ArgumentParser:
    lopt = subparsers.add_parser("lopt", help="learned optimizers: meta-train one, evaluate it against tuned baselines",
                                 description="Learned optimizers (the coordinatewise LSTM of Andrychowicz et al. "
                                             "2016, ...): meta-train on a family of optimizee problems, then train "
                                             "unseen problems with it and with tuned SGD, momentum, RMSprop and Adam.")
    sub = lopt.add_subparsers(dest="lopt_command", metavar="{train,eval}", required=True)
    rules, families = ", ".join(LEARNED_RULES.names()), ", ".join(OPTIMIZEES.names())
    d = LoptSettings()

    tr = sub.add_parser("train", help="meta-train a learned optimizer on an optimizee family",
                        description="Meta-train by truncated backpropagation through unrolled optimizee training. "
                                    "Writes OUT/config.yaml, checkpoint.pt, metrics.jsonl, learning_curve.png and "
                                    "lopt.pt (the rule with the lowest validation loss). Re-running the same command "
                                    "resumes; a larger --trajectories extends a finished run.")
    tr.add_argument("--optimizer", default=d.optimizer, help=f"learned rule: {rules} (default {d.optimizer})")
    tr.add_argument("--optimizee", default=d.optimizee, help=f"problem family: {families} (default {d.optimizee})")
    tr.add_argument("--out", required=True, help="run folder")
    tr.add_argument("--trajectories", type=int, default=d.trajectories,
                    help=f"problems trained from scratch during meta-training (default {d.trajectories})")
    tr.add_argument("--horizon", type=int, default=d.horizon, help=f"optimizee steps per trajectory (default {d.horizon})")
    tr.add_argument("--unroll", type=int, default=d.unroll,
                    help=f"steps per truncation: the rule is updated after each (default {d.unroll})")
    tr.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate of the rule's weights (default {d.lr:g})")
    tr.add_argument("--second-order", action="store_true",
                    help="keep the optimizee's second derivatives in the meta-gradient (the paper drops them)")
    tr.add_argument("--meta-gradient", default=d.meta_gradient,
                    help=f"meta-gradient estimator (default {d.meta_gradient}: backpropagation through the truncation)")
    tr.add_argument("--meta-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the meta-gradient estimator (repeatable)")
    tr.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                    help=f"an option of the learned rule (repeatable): {_rule_options_help()}")
    tr.add_argument("--val-every", type=int, default=d.val_every,
                    help=f"validate every N trajectories on {d.val_problems} held-out problems; 0: never, and lopt.pt "
                         f"is the last rule (default {d.val_every})")
    tr.add_argument("--val-problems", type=int, default=d.val_problems, help=f"(default {d.val_problems})")
    tr.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                    help=f"trajectories between checkpoints (default {d.checkpoint_every})")
    tr.add_argument("--max-train-seconds", type=float, default=0.0,
                    help="stop (checkpointed) after this many seconds; 0: none")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--data-dir", help="dataset folder of the optimizee (MNIST IDX files, CIFAR-10 archives); "
                                       "default $FASTADAPT_DATA/<dataset>")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(handler=cmd_lopt_train)

    ev = sub.add_parser("eval", help="train unseen problems with a learned optimizer and tuned baselines",
                        description="Train SEEDS unseen problems (test split, new initialisations) for STEPS steps with "
                                    "the learned rule of RUN (untuned) and with SGD, momentum, RMSprop and Adam, each "
                                    "with the learning rate of an 11-value grid (1e-4 to 10) that gives the lowest final "
                                    "loss on separate tuning problems. Prints a table (final loss, steps to the tuned "
                                    "Adam's final loss, ms per step) and writes curves (PNG) and a JSON summary.")
    ev.add_argument("run", help="a 'lopt train' folder or a lopt.pt file; 'none' for the baselines only")
    ev.add_argument("--optimizee", help="problem family (default: the run's)")
    ev.add_argument("--steps", type=int, help="steps per problem (default: the run's horizon)")
    ev.add_argument("--seeds", type=int, default=5, help="unseen problems (default 5)")
    ev.add_argument("--tune-seeds", type=int, default=2, help="problems the baselines' rates are tuned on (default 2)")
    ev.add_argument("--baselines", default=",".join(BASELINES), help=f"comma-separated (default {','.join(BASELINES)})")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--data-dir", help="dataset folder (default: the run's)")
    ev.add_argument("--json", help="summary JSON (default RUN/eval-OPTIMIZEE-STEPS.json)")
    ev.add_argument("--plot", help="loss curves PNG (default RUN/eval-OPTIMIZEE-STEPS.png)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=cmd_lopt_eval)
    return lopt


def _settings(args: argparse.Namespace) -> LoptSettings:
    return LoptSettings(
        optimizer=args.optimizer, optimizee=args.optimizee, trajectories=args.trajectories, horizon=args.horizon,
        unroll=args.unroll, lr=args.lr, second_order=args.second_order, seed=args.seed, device=args.device,
        data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None, rule_options=dict(args.option),
        meta_gradient=args.meta_gradient, meta_options=dict(args.meta_option), val_every=args.val_every,
        val_problems=args.val_problems, checkpoint_every=args.checkpoint_every,
        max_train_seconds=args.max_train_seconds, progress=not args.no_progress)


def cmd_lopt_train(args: argparse.Namespace) -> int:
    s = _settings(args)
    s.check()
    out = Path(args.out)
    resuming = (out / CHECKPOINT).is_file() or previous_checkpoint(out / CHECKPOINT).is_file()
    cfg = s.run_config()
    if resuming:
        saved = read_lopt_config(out) or {}
        diff = [k for k in RUN_KEYS if k in saved and saved[k] != cfg[k]]
        if diff:
            raise ConfigError(f"{out} holds a run with other settings ({', '.join(f'{k}: {saved[k]!r}' for k in diff)}); "
                              "use the same settings to resume, or another --out")
    # The optimizee's data is read before anything is written: a missing dataset leaves no folder.
    make_problem(s.optimizee, torch.Generator().manual_seed(s.seed), s.device, "train", s.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    print(f"{'resuming' if resuming else 'meta-training'} {s.optimizer} on {s.optimizee}: {s.trajectories} "
          f"trajectories of {s.horizon} steps in truncations of {s.unroll} ({s.meta_gradient} meta-gradient"
          f"{', second order' if s.second_order else ''}), Adam lr {s.lr:g} -> {out}", flush=True)
    try:
        result = meta_train_lopt(s, out)
    finally:
        plot_learning_curve(out / METRICS, out / CURVE, keys=("loss", "val_loss"), xlabel="trajectory")
    best = "" if result.best_val_loss is None else f", best validation loss {result.best_val_loss:.4g}"
    skipped = f", {result.skipped_truncations} diverged truncation(s) skipped" if result.skipped_truncations else ""
    print(f"meta-trained {result.trajectories} trajectories in {result.train_seconds:.1f} s{best}{skipped}")
    print(f"outputs: {out}/ (config.yaml, checkpoint.pt, metrics.jsonl, learning_curve.png, {RULE_FILE})")
    print(f"use it: fastadapt.optim.LearnedOptimizer(model.parameters(), {str(out / RULE_FILE)!r}); "
          f"compare: fastadapt lopt eval {out}")
    return 0


def cmd_lopt_eval(args: argparse.Namespace) -> int:
    run = None if args.run == "none" else Path(args.run)
    run_dir = run if run is not None and run.is_dir() else (run.parent if run is not None else None)
    cfg = (read_lopt_config(run_dir) if run_dir is not None else None) or {}
    if run is not None and not (run.is_file() or (run / RULE_FILE).is_file()):
        raise ConfigError(f"no learned optimizer in {run} (expected {RULE_FILE}); train one with 'fastadapt lopt train'")
    optimizee = args.optimizee or cfg.get("optimizee")
    if optimizee is None:
        raise ConfigError("--optimizee is needed (the run folder does not say which family it was trained on)")
    OPTIMIZEES.get(optimizee)
    steps = args.steps or cfg.get("horizon") or 100
    data_dir = args.data_dir or cfg.get("data_dir")
    baselines = tuple(b for b in args.baselines.split(",") if b)
    summary = evaluate_optimizers(run, optimizee, steps, args.seeds, baselines, args.tune_seeds, args.device,
                                  data_dir, progress=not args.no_progress)
    summary["command"] = args.command
    base = (run_dir or Path(".")) / f"eval-{optimizee}-{steps}"
    json_path = Path(args.json) if args.json else base.with_suffix(".json")
    plot_path = Path(args.plot) if args.plot else base.with_suffix(".png")
    atomic_write_text(json_path, json.dumps(summary, indent=1) + "\n")
    plot_curves(summary, plot_path)
    print(format_table(summary))
    print(f"outputs: {json_path}, {plot_path}")
    return 0


__all__ = ["add_lopt_parser"]
