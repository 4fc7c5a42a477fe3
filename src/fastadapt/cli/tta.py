"""The ``fastadapt tta`` commands: ``train-source`` and ``eval``.

:func:`add_tta_parser` adds the ``tta`` sub-command to the main parser's sub-parsers and sets
``handler`` to :func:`run_tta`. The work itself lives in :mod:`fastadapt.tta`
(:mod:`~fastadapt.tta.train_source`, :mod:`~fastadapt.tta.evaluate`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError, FastAdaptError
from ..io import atomic_write_text
from ..tta.corruptions import CORRUPTIONS, frost_photographs
from ..tta.evaluate import CLEAN, TTA_METHODS


def _severity(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"severity must be an integer from 1 to 5, got '{text}'") from None
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"severity must be from 1 to 5, got {value}")
    return value


def add_tta_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``tta train-source`` and ``tta eval`` on ``subparsers`` (from ``add_subparsers``)."""
    tta = subparsers.add_parser("tta", help="test-time adaptation: train a source model, evaluate BN/TENT/TTT",
                                description="Test-time adaptation on CIFAR-10-C-style corruptions.")
    sub = tta.add_subparsers(dest="tta_command", metavar="{train-source,eval}")
    sub.required = True

    tr = sub.add_parser("train-source", help="train the source CIFAR-10 ResNet (optionally with a rotation head)")
    tr.add_argument("--dataset", default="cifar10", help="only cifar10 (default)")
    tr.add_argument("--data-dir", default=None,
                    help="folder with cifar10-jpg-{train,test}.tar.gz or cifar-10-python.tar.gz "
                         "(default: download the official archive into the user cache)")
    tr.add_argument("--arch", default="resnet8", choices=["resnet8", "resnet26"],
                    help="resnet26 as in the TTT/TENT papers; resnet8 trains on a few CPU cores (default)")
    tr.add_argument("--width", type=int, default=1, help="channel multiplier (16w, 32w, 64w)")
    tr.add_argument("--norm", default="bn", choices=["bn", "gn"], help="BatchNorm (TENT, BN) or GroupNorm (TTT only)")
    tr.add_argument("--rotation-head", action="store_true", help="train jointly with 4-way rotation prediction (TTT)")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=0.1, help="SGD learning rate, cosine-decayed")
    tr.add_argument("--weight-decay", type=float, default=5e-4)
    tr.add_argument("--train-subset", type=int, default=0, help="train on a seeded subset of this size (0: all)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--log-every", type=int, default=50, help="iterations between lines of metrics.jsonl")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--out", required=True,
                    help="run folder: config.yaml, checkpoint.pt, metrics.jsonl, learning_curve.png, results.json "
                         "(resumed if it holds a checkpoint; Ctrl-C checkpoints the run where it is)")
    tr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="error (%% ± 95%% CI) and cost of a method on corrupted CIFAR-10",
                        description="Error (% ± 95% CI) and cost of a test-time method on corrupted CIFAR-10. "
                                    "The CI is per image for source and ttt (independent predictions) and over "
                                    "batch errors for bn, tent and ttt-online, whose predictions within a batch "
                                    "(and online, across the stream) are not independent; the JSON records which.")
    ev.add_argument("run_dir", help="folder written by 'fastadapt tta train-source'")
    ev.add_argument("--method", required=True, choices=list(TTA_METHODS))
    ev.add_argument("--corruption", default="all",
                    help=f"one of {', '.join(CORRUPTIONS)}, 'all' or '{CLEAN}' (all: frost is skipped with a warning "
                         "when its photographs are not installed)")
    ev.add_argument("--severity", type=_severity, default=5)
    ev.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: the one used for training)")
    ev.add_argument("--batch-size", type=int, default=128, help="test batch size (TENT paper: 128)")
    ev.add_argument("--max-images", type=int, default=0,
                    help="evaluate a seeded random subset of the test set of this size (0: all 10,000)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the corruption and of the stream order")
    ev.add_argument("--lr", type=float, default=None, help="TENT: Adam lr (1e-3); TTT: SGD lr (1e-3)")
    ev.add_argument("--steps", type=int, default=None, help="TENT: steps per batch (1); TTT: per image (10; online 1)")
    ev.add_argument("--episodic", action="store_true", help="TENT: reset to the source model after every batch")
    ev.add_argument("--copies", type=int, default=32, help="TTT: augmented copies per step")
    ev.add_argument("--ttt-head", default="train", choices=["train", "frozen"],
                    help="TTT: train the rotation head together with the shared trunk (default, as the authors' "
                         "code) or keep the head frozen and train the trunk only")
    ev.add_argument("--ttt-bn", default="train", choices=["train", "frozen"],
                    help="TTT on a BatchNorm model: BatchNorm in train mode during the steps (default, as the "
                         "authors' code) or frozen source statistics")
    ev.add_argument("--frost-dir", default=None, help="folder with the frost photographs (frost1.png ...)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--json", default=None,
                    help="also write the results to this JSON file, rewritten as each corruption completes")
    ev.add_argument("--no-progress", action="store_true")
    tta.set_defaults(handler=run_tta)
    return tta


def run_tta(args: argparse.Namespace) -> int:
    if args.tta_command == "train-source":
        return _train_source(args)
    return _eval(args)


def _saved_message(out: Path) -> str:
    """What a stopped train-source run left on disk, for the one line printed on Ctrl-C."""
    from ..tta.train_source import saved_progress

    try:
        p = saved_progress(out)
    except FastAdaptError as exc:
        return f"interrupted: the checkpoint in {out} cannot be read ({exc})"
    if p is None:
        return f"interrupted: nothing was saved yet (no checkpoint in {out}); the same command starts afresh"
    if p["step"]:
        where = (f"in epoch {p['epoch'] + 1} of {p['epochs']} after iteration {p['step']} of "
                 f"{p['steps_per_epoch']} (iteration {p['iteration']} in all)")
    else:
        where = f"at the end of epoch {p['epoch']} of {p['epochs']} (iteration {p['iteration']} in all)"
    return f"interrupted: the run in {out} is saved {where}; run the same command again to resume from there"


def _train_source(args: argparse.Namespace) -> int:
    from ..data.cifar10 import load_cifar10
    from ..measure.threads import cost_context
    from ..engine.trainer import _StopRequest, plot_learning_curve  # Ctrl-C/SIGTERM -> stop between iterations
    from ..tta.train_source import CURVE_FILE, LOG_FILE, RESULTS_FILE, train_source

    if args.dataset != "cifar10":
        raise ConfigError(f"tta train-source supports --dataset cifar10 only, got '{args.dataset}'")
    out = Path(args.out)
    cfg = dict(dataset=args.dataset, arch=args.arch, width=args.width, norm=args.norm,
               rotation_head=args.rotation_head, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               weight_decay=args.weight_decay, seed=args.seed, train_subset=args.train_subset,
               log_every=args.log_every, data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else None)
    try:
        xtr, ytr = load_cifar10("train", args.data_dir, progress=not args.no_progress)
        xte, yte = load_cifar10("test", args.data_dir, progress=not args.no_progress)
        with _StopRequest() as stop:
            summary = train_source(cfg, out, xtr, ytr, xte, yte, device=args.device,
                                   progress=not args.no_progress, stop=lambda: stop.requested)
    except KeyboardInterrupt:
        print("\n" + _saved_message(out), file=sys.stderr)
        return 130
    finally:
        if (out / LOG_FILE).is_file():
            plot_learning_curve(out / LOG_FILE, out / CURVE_FILE, keys=("loss", "rot_loss", "acc"), xlabel="iteration")
    results = {**summary, "arch": args.arch, "norm": args.norm, "rotation_head": args.rotation_head,
               "device": args.device, "cost_context": cost_context(),
               "command": args.command, "date": datetime.now(timezone.utc).isoformat(),
               "platform": platform.platform(), "torch": torch.__version__}
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    print(f"trained {args.arch} for {summary['epochs']} epochs in {summary['train_seconds']:.0f} s; "
          f"clean test error {summary['clean_test_error']:.2f} ± {summary['clean_test_ci95']:.2f} %")
    print(f"outputs: {out}/ (config.yaml, checkpoint.pt, metrics.jsonl, learning_curve.png, results.json)")
    return 0


def _corruption_names(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The corruptions to run and those skipped (name -> why), checked before any work."""
    if args.corruption == "all":
        names = list(CORRUPTIONS)
    elif args.corruption in CORRUPTIONS or args.corruption == CLEAN:
        names = [args.corruption]
    else:
        raise ConfigError(f"unknown corruption '{args.corruption}'; choose one of {', '.join(CORRUPTIONS)}, all, {CLEAN}")
    skipped: dict[str, str] = {}
    if "frost" in names:
        try:
            frost_photographs(args.frost_dir)
        except DataError:
            if args.corruption == "frost":
                raise  # asked for by name: fail at once
            names.remove("frost")
            skipped["frost"] = "frost photographs not installed"
            print("warning: skipping frost: its photographs are not installed (pip install --no-deps "
                  "imagecorruptions, set FASTADAPT_FROST_DIR, or pass --frost-dir to include it)",
                  file=sys.stderr, flush=True)
    return names, skipped


def _eval(args: argparse.Namespace) -> int:
    from ..measure.threads import cost_context
    from ..tta.evaluate import evaluate_run, format_tta_result

    names, skipped = _corruption_names(args)
    options = {"lr": args.lr, "steps": args.steps, "episodic": args.episodic, "copies": args.copies,
               "ttt_bn": args.ttt_bn, "ttt_head": args.ttt_head}
    results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "complete": False, "corruptions": names, "skipped": skipped, "results": results,
        "command": args.command, "date": datetime.now(timezone.utc).isoformat(),
        "platform": platform.platform(), "torch": torch.__version__, "options": options,
    }

    def save() -> None:  # after every corruption, so a failed or stopped run keeps what it finished
        if args.json:
            atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")

    def on_result(r: dict[str, Any]) -> None:
        results.append(r)
        print(format_tta_result(r), flush=True)
        save()

    def finished() -> str:
        if not results:
            return "no corruption was finished, nothing was saved"
        where = f"saved in {args.json}" if args.json else "printed above (--json FILE saves them)"
        return f"the {len(results)} finished corruption(s) are {where}"

    try:
        evaluate_run(args.run_dir, args.method, names, args.severity, args.data_dir, args.batch_size,
                     args.max_images, args.seed, options, args.frost_dir, args.device, not args.no_progress,
                     on_result=on_result)
    except KeyboardInterrupt:  # evaluation keeps no checkpoint: say what is kept
        print(f"\ninterrupted: {finished()}", file=sys.stderr)
        return 130
    except FastAdaptError as exc:
        if results:
            raise type(exc)(f"{exc} ({finished()})") from exc
        raise
    summary["complete"] = True
    summary["cost_context"] = cost_context()
    if len(results) > 1:
        mean = sum(r["error"] for r in results) / len(results)
        summary["mean_error"] = mean
        note = f" ({', '.join(skipped)} skipped)" if skipped else ""
        print(f"mean error over {len(results)} corruptions{note} at severity {args.severity}: {mean:.2f} %")
    save()
    return 0
