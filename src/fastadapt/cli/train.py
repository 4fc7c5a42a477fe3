"""``fastadapt train``, ``eval`` and ``list``: meta-training a registered method and evaluating it."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import data as _data  # noqa: F401  (registers datasets)
from .. import methods as _methods  # noqa: F401  (registers methods)
from .. import models as _models  # noqa: F401  (registers backbones)
from ..config import (DEFAULTS, adopt_run_decisions, check_same_run, default_run_dir, load_yaml,
                     method_options, resolve, save_yaml, validate)
from ..data import build_task_source
from ..engine.distributed import Processes, join_from_env, leave, processes
from ..engine.evaluate import evaluate, format_result
from ..measure.threads import cost_context
from ..engine.runs import open_run, read_run_config
from ..engine.trainer import (CHECKPOINT, CURVE, METRICS, RunInterrupted, TrainSettings, meta_train,
                               plot_learning_curve)
from ..errors import ConfigError, FastAdaptError
from ..io import atomic_write_text, previous_checkpoint
from .. import optim as _optim  # noqa: F401  (registers the learned optimizers)
from ..engine.graphs import usable as graphs_usable
from ..models.conv4 import apply_memory_format
from ..precision import MEMORY_FORMATS, PRECISIONS
from ..registry import BACKBONES, DATASETS, LEARNED_RULES, METHODS, OPTIMIZEES
from ..tasks.episode import check_shareable
from ..tasks.image_function import KIND as IMAGE_FUNCTION

TRAIN_KEYS = ("dataset", "data_dir", "download", "image_size", "train_split", "ways", "shots", "queries", "steps",
              "meta_batch", "lr", "lr_decay_every", "lr_decay", "weight_decay", "seed", "device",
              "checkpoint_every", "log_every", "val_every", "val_episodes", "max_train_seconds", "threads",
              "precision", "compile", "memory_format", "cuda_graphs")
EVAL_KEYS = ("ways", "shots", "queries", "episodes")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _defaults_text(key: str, base: dict[str, Any], by_dataset: dict[str, dict[str, Any]]) -> str:
    """``(default 0.4; sinusoid: 0.01)``: the method's default and where a task family changes it."""
    get = (lambda c: c["eval"][key[5:]]) if key.startswith("eval_") else (lambda c: c.get(key))
    text = f"default {_fmt(get(base))}"
    others = [f"{ds}: {_fmt(get(c))}" for ds, c in by_dataset.items() if get(c) != get(base)]
    return f"({text}{'; ' + ', '.join(others) if others else ''})"


CORE_HELP: dict[str, tuple[dict[str, Any], str]] = {
    "dataset": ({}, "dataset or task family: {datasets}"),
    "data_dir": ({}, "dataset folder (Omniglot: holds images_background/ and images_evaluation/); "
                     "without it: $FASTADAPT_DATA/DATASET if that exists, else a download"),
    "image_size": ({"type": int}, "resize images to this side"),
    "train_split": ({"choices": ["train", "trainval"]}, "classes to meta-train on"),
    "ways": ({"type": int}, "classes per training episode"),
    "shots": ({"type": int}, "support examples per class (sinusoid: support points)"),
    "queries": ({"type": int}, "query examples per class"),
    "steps": ({"type": int}, "meta-iterations (a larger value extends a finished run)"),
    "meta_batch": ({"type": int}, "tasks per meta-iteration"),
    "lr": ({"type": float}, "meta learning rate (Adam)"),
    "lr_decay_every": ({"type": int}, "multiply the rate by --lr-decay every N iterations; 0: constant"),
    "lr_decay": ({"type": float}, "learning-rate decay factor"),
    "weight_decay": ({"type": float}, "Adam weight decay"),
    "seed": ({"type": int}, "seed of the episode stream and the initial weights"),
    "device": ({}, "cpu or cuda"),
    "checkpoint_every": ({"type": int}, "iterations between checkpoints (0: only at the end and on stop)"),
    "log_every": ({"type": int}, "iterations between metrics-log lines"),
    "val_every": ({"type": int}, "validate every N iterations (0: never)"),
    "val_episodes": ({"type": int}, "episodes per validation"),
    "max_train_seconds": ({"type": float}, "time budget: stop training (checkpointed) after this many seconds; 0: none"),
    "threads": ({"type": int}, "CPU threads (0: $OMP_NUM_THREADS if set, else one per core); recorded with every cost figure"),
    "precision": ({"choices": list(PRECISIONS)}, "bf16: bfloat16 autocast of convolutions and matrix products, float32 "
                                                 "weights and updates (see fastadapt.precision)"),
    "compile": ({"action": argparse.BooleanOptionalAction}, "torch.compile the learner's networks (first use compiles: "
                                                            "minutes on a CPU)"),
    "cuda_graphs": ({"action": argparse.BooleanOptionalAction}, "on a GPU, record the training step once as a CUDA "
                                                                "graph and replay it, where the method offers one "
                                                                "(protonet; maml, fomaml, anil, metasgd with vmap "
                                                                "batching; one process)"),
    "memory_format": ({"choices": list(MEMORY_FORMATS)}, "layout of Conv-4: auto is channels_last on a GPU and "
                                                         "for protonet (fused blocks, exact in either layout), else "
                                                         "nchw on the CPU, where channels-last is faster but its "
                                                         "BatchNorm gradients are about 1e-2 off (relative)"),
    "eval_ways": ({"type": int}, "ways of the final test evaluation"),
    "eval_shots": ({"type": int}, "shots of the final test evaluation"),
    "eval_queries": ({"type": int}, "queries per class of the final test evaluation"),
    "eval_episodes": ({"type": int}, "episodes of the final test evaluation"),
}


def _add_method_parser(methods: Any, name: str) -> None:
    """``fastadapt train NAME``: the core options and this method's own, with its real defaults."""
    cls = METHODS.get(name)
    doc = (cls.__doc__ or "").strip()
    first = " ".join(doc.split("\n\n")[0].split())
    summary = first.split(": ")[0].rstrip(".")  # "Name (Authors, venue year)"
    base = resolve(name, {}, {})
    by_dataset = {}
    for ds in DATASETS.names():
        if ds != base["dataset"]:
            try:
                by_dataset[ds] = resolve(name, {}, {"dataset": ds})
            except FastAdaptError:
                continue
    m = methods.add_parser(name, help=summary, description=doc.replace("%", "%%"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--config", help="YAML preset (see configs/); flags override it")
    core = m.add_argument_group("run options")
    for key, (kwargs, text) in CORE_HELP.items():
        text = text.format(datasets=", ".join(DATASETS.names()))
        # The dataset's own default differs "by dataset" trivially: show the method's only.
        shown = f"(default {base['dataset']})" if key == "dataset" else _defaults_text(key, base, by_dataset)
        core.add_argument(_flag(key), dest=key, default=None, help=f"{text} {shown}", **kwargs)
        if key == "dataset":
            core.add_argument("--task", dest="dataset", help="alias of --dataset (e.g. --task sinusoid)")
    core.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                      help="download missing datasets (default yes)")
    core.add_argument("--out", help="run directory (default runs/METHOD-DATASET-WAYSwSHOTSs-seedSEED)")
    core.add_argument("--no-progress", action="store_true", help="hide progress (bars, or periodic lines in logs)")
    own = [k for k in cls.options if k not in DEFAULTS]
    if own:
        g = m.add_argument_group(f"{name} options")
        for key in own:
            text = getattr(cls, "option_help", {}).get(key, "")
            _add_option(g, key, cls.options[key], f"{text} {_defaults_text(key, base, by_dataset)}".strip())
    m.set_defaults(handler=cmd_train)


def _add_option(group: Any, key: str, default: Any, default_text: str) -> None:
    if isinstance(default, bool):
        group.add_argument(_flag(key), dest=key, action=argparse.BooleanOptionalAction, default=None,
                           help=default_text)
    else:
        group.add_argument(_flag(key), dest=key, type=type(default) if default is not None else str, default=None,
                           help=default_text)


def add_train_parsers(sub: Any) -> None:
    """Register ``train``, ``eval`` and ``list`` on the main parser's sub-parsers."""
    t = sub.add_parser("train", help="meta-train a method, then evaluate it on the test split",
                       description="Meta-train METHOD on episodes of --dataset, checkpointing into --out "
                                   "(re-running the same command resumes an interrupted run), then evaluate "
                                   "on unseen test classes. 'fastadapt train METHOD --help' lists the options "
                                   "of METHOD with its defaults.")
    methods = t.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in METHODS.names():
        _add_method_parser(methods, name)

    e = sub.add_parser("eval", help="evaluate a trained run on unseen classes",
                       description="Adapt the learner of RUN_DIR to test episodes and print accuracy (or MSE) "
                                   "± 95% CI with the adaptation time, meta-training time and peak memory. "
                                   "Every option defaults to the run's own value (its config.yaml).")
    e.add_argument("run_dir")
    run_value = "(default: the run's value)"
    e.add_argument("--ways", type=int, help=f"classes per test episode {run_value}")
    e.add_argument("--shots", type=int, help=f"support examples per class {run_value}")
    e.add_argument("--queries", type=int, help=f"query examples per class {run_value}")
    e.add_argument("--episodes", type=int, help=f"test episodes {run_value}")
    e.add_argument("--seed", type=int, default=0, help="seed of the evaluation episodes (default 0)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="(default test)")
    e.add_argument("--data-dir", help="where the dataset is now, if it moved (default: the run's)")
    e.add_argument("--device", help="cpu or cuda (default: the run's)")
    e.add_argument("--threads", type=int, help="CPU threads (default 0: $OMP_NUM_THREADS if set, else one per core)")
    e.add_argument("--json", help="also write the results to this JSON file")
    e.add_argument("--grid", help="image functions: write the reconstruction grid of the first 8 test images here "
                                  "(default RUN_DIR/reconstructions-SPLIT.png)")
    e.add_argument("--no-progress", action="store_true")
    g = e.add_argument_group("method options (each method reads its own)")
    for key, default in method_options().items():
        if key not in DEFAULTS:
            _add_option(g, key, default, run_value)
    e.set_defaults(handler=cmd_eval)

    ls = sub.add_parser("list", help="list the registered methods, datasets, backbones, learned optimizers and optimizees")
    ls.set_defaults(handler=cmd_list)


def _method_flags(args: argparse.Namespace, keys: Any) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys if k not in DEFAULTS and getattr(args, k, None) is not None}


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def _eval_source(data_cfg: dict[str, Any], split: str, ev: dict[str, Any]) -> Any:
    """The task source of the final evaluation; a size error names the --eval-* flag to change."""
    try:
        return build_task_source(data_cfg, split, ev["ways"], ev["shots"], ev["queries"])
    except ConfigError as exc:
        raise ConfigError(re.sub(r"--(ways|shots|queries)\b", r"--eval-\1", str(exc))) from None


def _setting(c: dict[str, Any], regression: bool, source: Any = None) -> str:
    if getattr(source, "kind", None) == IMAGE_FUNCTION:
        return source.describe()
    if regression:
        return f"{c['shots']}-shot regression, {c['queries']} query points"
    return f"{c['ways']}-way {c['shots']}-shot, {c['queries']} queries per class"


def cmd_train(args: argparse.Namespace) -> int:
    preset = load_yaml(args.config) if args.config else {}
    cls = METHODS.get(args.method)
    flags: dict[str, Any] = {k: getattr(args, k) for k in TRAIN_KEYS}
    flags.update(_method_flags(args, cls.options))
    ev = {k: getattr(args, f"eval_{k}") for k in EVAL_KEYS}
    flags["eval"] = {k: v for k, v in ev.items() if v is not None} or None
    cfg = resolve(args.method, preset, flags)
    _check_device(cfg["device"])
    # Under torchrun: join the other processes (they share each meta-batch; rank 0 writes and reports).
    joined = join_from_env(cfg["device"])
    try:
        return _train(args, cls, cfg, processes())
    finally:
        if joined:
            leave()


def _resume_state(run_dir: Path) -> tuple[bool, dict[str, Any] | None]:
    """Whether ``run_dir`` holds a run to resume, and its saved configuration: a run being resumed
    must have a readable one to compare with (a clear error if not)."""
    resuming = (run_dir / CHECKPOINT).is_file() or previous_checkpoint(run_dir / CHECKPOINT).is_file()
    return resuming, read_run_config(run_dir) if resuming else None


def _train(args: argparse.Namespace, cls: Any, cfg: dict[str, Any], procs: Processes) -> int:
    progress = not args.no_progress
    run_dir = Path(args.out) if args.out else default_run_dir(cfg)
    resuming, saved = procs.from_main(lambda: _resume_state(run_dir))  # only rank 0 sees the run directory
    if saved is not None:
        adopt_run_decisions(saved, cfg)
    settings = TrainSettings(**{k: cfg[k] for k in ("steps", "meta_batch", "lr", "lr_decay_every", "lr_decay",
                                                     "weight_decay", "seed", "device", "checkpoint_every",
                                                     "log_every", "val_every", "val_episodes",
                                                     "max_train_seconds", "precision", "cuda_graphs")},
                             progress=progress)
    settings.cuda_graphs = settings.cuda_graphs and not cfg["compile"]  # compiled graphs are left to torch.compile
    settings.check()
    check_shareable(cfg["meta_batch"], procs.world)
    if cfg.get("pretrain_batch"):  # ncm, qiao: batches of images are shared too
        check_shareable(cfg["pretrain_batch"], procs.world, "images")

    # Everything is checked before anything is written: a refused command leaves no trace.
    data_cfg = {**cfg, "progress": progress and procs.main}
    torch.manual_seed(cfg["seed"])
    with procs.local_main_first():  # a download happens once per machine
        source = build_task_source(data_cfg, "train", cfg["ways"], cfg["shots"], cfg["queries"])
        ev = cfg["eval"]
        test_source = _eval_source(data_cfg, "test", ev)
        val_source = _eval_source(data_cfg, "val", ev) if cfg["val_every"] else None
    learner = cls.from_config(cfg, source.in_shape)
    cfg["memory_format"] = apply_memory_format(learner, cfg["memory_format"], cfg["device"])
    cfg.update(learner.decide_run_options(cfg["device"]))
    if cfg["compile"]:
        learner.compile_networks()  # refused (ConfigError) where the method needs a double backward
    if saved is not None:
        check_same_run(saved, cfg, run_dir)
    cfg["processes"] = procs.world  # may change when the run is resumed
    if procs.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", save_yaml(cfg))
    else:
        settings.progress = False
        try:
            meta_train(learner, source, settings, run_dir, val_source)
        except RunInterrupted:
            return 130  # rank 0 says where the run was saved
        return 0  # rank 0 evaluates and writes the results

    regression = getattr(source, "kind", "classification") == "regression"
    images = getattr(source, "kind", None) == IMAGE_FUNCTION
    extra = [f"batching {cfg['batching']}"] if "batching" in cfg else []
    extra += (["bf16 autocast"] if cfg["precision"] == "bf16" else []) + (["compiled"] if cfg["compile"] else [])
    if graphs_usable(learner, torch.device(cfg["device"]), procs.world, settings.cuda_graphs):
        extra.append("CUDA-graph steps")
    if "pretrain_batch" in cfg:  # ncm, qiao: a classifier of the training classes comes first
        pre = min(cfg.get("pretrain_steps", cfg["steps"]), cfg["steps"])
        extra.append(f"{'every iteration pre-trains' if pre == cfg['steps'] else f'iterations 1-{pre} pre-train'} a "
                     f"classifier of {cfg.get('base_classes')} classes on batches of {cfg['pretrain_batch']} images")
    print(f"{'resuming' if resuming else 'training'} {cfg['method']} on {cfg['dataset']} "
          f"({_setting(cfg, regression, source)}, {cfg['steps']} iterations, meta-batch {cfg['meta_batch']}, "
          f"{', '.join(extra + [procs.describe(torch.get_num_threads())])}) -> {run_dir}", flush=True)
    unseen = "held-out images" if images else f"episodes of unseen {'tasks' if regression else 'classes'}"
    print(f"then testing on {ev['episodes']} {unseen}: {_setting(ev, regression, test_source)}", flush=True)
    result = meta_train(learner, source, settings, run_dir, val_source)
    print(f"meta-training: {result.step} iterations, {result.train_seconds:.1f} s in all "
          f"({result.episodes_per_s:.1f} episodes/s in this invocation), peak memory {result.peak_mem_mb:.0f} MB",
          flush=True)
    res = evaluate(learner, test_source, ev["episodes"], seed=0, device=cfg["device"], progress=progress,
                   precision=cfg["precision"],
                   desc="test")
    res.update(ways=ev["ways"], shots=ev["shots"], queries=ev["queries"], split="test", step=result.step,
               meta_train_seconds=result.train_seconds, train_episodes_per_s=result.episodes_per_s,
               train_peak_mem_mb=result.peak_mem_mb, processes=procs.world, **cost_context())
    _image_setting(res, test_source, cfg)
    atomic_write_text(run_dir / "results.json", json.dumps(res, indent=2) + "\n")
    plot_learning_curve(run_dir / METRICS, run_dir / CURVE)  # again, now with the test result
    print(f"test {_setting(ev, regression, test_source)}: {format_result(res)}")
    grid = _reconstruction_grid(learner, test_source, run_dir / "reconstructions-test.png", cfg, seed=0) if images else None
    print(f"outputs: {run_dir}/ (config.yaml, checkpoint.pt, metrics.jsonl, learning_curve.png, results.json"
          f"{', ' + grid.name if grid else ''})")
    return 0


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    return saved if isinstance(saved, dict) else None


def _is_tta_run(run_dir: Path, cfg: dict[str, Any] | None) -> bool:
    return bool(cfg and "arch" in cfg and "method" not in cfg) or (run_dir / "model.pt").is_file()


def _image_setting(res: dict[str, Any], source: Any, cfg: dict[str, Any]) -> None:
    """Image functions have no ways, shots or queries: record the image size and observed fraction."""
    if getattr(source, "kind", None) != IMAGE_FUNCTION:
        return
    for key in ("ways", "shots", "queries"):
        res.pop(key, None)
    res.update(image_size=source.in_shape[-1], support_fraction=source.support_fraction)


def _reconstruction_grid(learner: Any, source: Any, path: Path, cfg: dict[str, Any], seed: int) -> Path:
    """Ground truth | observed pixels | reconstruction of the first 8 images an evaluation draws."""
    from ..engine.reconstruct import reconstruct, save_grid

    out = reconstruct(learner, source, count=8, seed=seed, device=cfg["device"])
    columns = {"ground truth": out["ground truth"], "observed": out["observed"], cfg["method"]: out["reconstruction"]}
    if source.support_fraction == 1:
        del columns["observed"]  # every pixel observed: the same as the ground truth
    return save_grid(columns, path, title=f"{cfg['method']} · {cfg['dataset']}")


def cmd_eval(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if _is_tta_run(run_dir, _saved_config(run_dir)):
        raise ConfigError(f"{run_dir} holds a test-time adaptation source model; evaluate it with "
                          f"'fastadapt tta eval {run_dir} --method tent' (or source, bn, ttt, ttt-online)")
    if args.device:
        _check_device(args.device)
    progress = not args.no_progress
    run = open_run(run_dir, args.device, {**_method_flags(args, method_options()), "data_dir": args.data_dir},
                   progress=progress)
    cfg, learner = run.config, run.learner
    ev = dict(cfg["eval"])
    for k in EVAL_KEYS:
        if getattr(args, k) is not None:
            ev[k] = getattr(args, k)
    validate({"eval": ev})
    source = build_task_source({**cfg, "progress": progress}, args.split, ev["ways"], ev["shots"], ev["queries"])
    res = evaluate(learner, source, ev["episodes"], seed=args.seed, device=cfg["device"], progress=progress,
                   precision=cfg["precision"],
                   desc=args.split)
    res.update(ways=ev["ways"], shots=ev["shots"], queries=ev["queries"], split=args.split, seed=args.seed,
               method=cfg["method"], dataset=cfg["dataset"], step=run.step, meta_train_seconds=run.train_seconds,
               **cost_context())
    _image_setting(res, source, cfg)
    regression = getattr(source, "kind", "classification") == "regression"
    print(f"{args.split} {_setting(ev, regression, source)}: {format_result(res)}")
    print(f"meta-training time: {res['meta_train_seconds']:.1f} s ({res['step']} iterations)")
    if getattr(source, "kind", None) == IMAGE_FUNCTION:
        sparse = "" if source.support_fraction == 1 else f"-support{source.support_fraction:g}"
        grid = Path(args.grid) if args.grid else run_dir / f"reconstructions-{args.split}{sparse}.png"
        res["grid"] = str(_reconstruction_grid(learner, source, grid, cfg, seed=args.seed))
        shown = " | ".join(["ground truth", *(["observed"] if sparse else []), cfg["method"]])
        print(f"reconstructions ({shown}): {res['grid']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for title, reg in (("methods", METHODS), ("datasets", DATASETS), ("backbones", BACKBONES),
                       ("learned optimizers (fastadapt lopt)", LEARNED_RULES), ("optimizees", OPTIMIZEES)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0
