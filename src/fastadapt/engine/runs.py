"""Trained runs as Python objects: the learner of a run folder, ready to adapt and predict.

A run folder (``fastadapt train --out RUN_DIR``) holds ``config.yaml`` (the resolved
configuration) and ``checkpoint.pt`` (the weights, among other training state).
:func:`load_run` rebuilds the learner from the configuration, loads the weights and returns it in
eval mode, so a trained model is used from Python exactly as ``fastadapt eval`` uses it::

    learner, cfg = fastadapt.load_run("runs/maml-5w1s")
    adapted = learner.adapt(support_x, support_y)
    logits = learner.predict(adapted, query_x)

The dataset is not needed for the built-in glyphs and Omniglot (their input shape follows from the
configuration); other datasets are opened to read their input shape, with a clear error when the
data has moved (pass ``data_dir=``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data import build_task_source
from ..errors import ConfigError, DataError
from ..config import LEGACY, method_defaults, validate
from ..io import load_checkpoint_with_fallback, previous_checkpoint
from ..methods.base import MetaLearner
from ..models.conv4 import apply_memory_format
from ..registry import DATASETS, METHODS
from .trainer import CHECKPOINT

CONFIG = "config.yaml"
# Keys an override may set besides those of config.yaml and the method's options.
_EXTRA_KEYS = {"data_dir", "device", "progress"}


@dataclass
class Run:
    """A loaded run: the learner (eval mode, on ``config['device']``), its configuration and
    where training stopped (``step`` meta-iterations, ``train_seconds`` of training)."""

    learner: MetaLearner
    config: dict[str, Any]
    step: int
    train_seconds: float
    path: Path


def _one_line(text: object, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def read_run_config(run_dir: str | Path, required: tuple[str, ...] = ("method", "dataset")) -> dict[str, Any]:
    """The configuration saved in ``run_dir/config.yaml``; :class:`ConfigError` if ``run_dir``
    is not a run folder (``required``: the keys its configuration must name)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG}); pass the --out folder of a training run")
    try:
        cfg = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid YAML ({_one_line(exc, 150)}); restore it from the run's "
                          "training command") from exc
    if not isinstance(cfg, dict) or not all(cfg.get(k) for k in required):
        raise ConfigError(f"{path} does not hold a run configuration ({', '.join(required)}, ...); is {run_dir} "
                          "the --out folder of a training run?")
    return cfg


def input_shape(cfg: dict[str, Any], progress: bool = True) -> tuple[int, ...]:
    """The shape of one input of ``cfg``'s dataset, without loading the data when the dataset's
    builder declares it (``in_shape(cfg)``), else from its training split."""
    builder = DATASETS.get(cfg["dataset"])
    declared = getattr(builder, "in_shape", None)
    if declared is not None:
        return tuple(declared(cfg))
    try:
        source = build_task_source({**cfg, "progress": progress}, "train", cfg.get("ways", 5), cfg.get("shots", 1),
                                   cfg.get("queries", 1))
    except DataError as exc:
        raise DataError(f"the {cfg['dataset']} data of this run cannot be read ({_one_line(exc, 200)}); "
                        "pass its new folder as data_dir= (fastadapt eval --data-dir)") from exc
    return tuple(source.in_shape)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a device; use cpu or cuda") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"the run asks for device {str(device)!r} but no CUDA device is available; "
                          "load it with device='cpu' (fastadapt eval --device cpu)")
    return dev


def open_run(run_dir: str | Path, device: str | torch.device | None = None,
             overrides: dict[str, Any] | None = None, progress: bool = True) -> Run:
    """Load the run in ``run_dir`` (see :func:`load_run`); also returns its step and training time."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    cls = METHODS.get(cfg["method"])
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(cfg) - set(cls.options) - _EXTRA_KEYS)
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]!r} for a {cfg['method']} run; known: "
                          f"{', '.join(sorted(set(cfg) | set(cls.options) | _EXTRA_KEYS))}")
    cfg.update(overrides)
    if device is not None:
        cfg["device"] = str(device)
    validate(cfg, method_defaults(cfg["method"]))
    dev = _resolve_device(cfg.get("device") or "cpu")

    ck_path = run_dir / CHECKPOINT
    if not ck_path.is_file() and not previous_checkpoint(ck_path).is_file():
        raise DataError(f"{run_dir} has no {CHECKPOINT}: its training stopped before the first checkpoint; "
                        "run the training command again to train it")
    ck = load_checkpoint_with_fallback(ck_path)  # the previous checkpoint if the newest is unreadable
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict):
        raise DataError(f"{ck_path} holds no model weights; is it a fastadapt training checkpoint?")

    learner = cls.from_config(cfg, input_shape(cfg, progress))
    # The layout the run trained in (a run saved before the option existed: channels-last).
    apply_memory_format(learner, cfg.get("memory_format", LEGACY["memory_format"]), dev)
    try:
        learner.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise DataError(f"the weights in {ck_path} do not fit the model described by {run_dir / CONFIG} "
                        f"({_one_line(exc, 200)}); was either file replaced?") from exc
    learner.to(dev)
    learner.eval()
    return Run(learner, cfg, int(ck.get("step", 0)), float(ck.get("train_seconds", 0.0)), run_dir)


def load_run(run_dir: str | Path, device: str | torch.device | None = None,
             **overrides: Any) -> tuple[MetaLearner, dict[str, Any]]:
    """The trained learner of ``run_dir`` and its configuration.

    The learner is rebuilt from ``run_dir/config.yaml`` (by the method's ``from_config``, as
    ``fastadapt eval`` does), holds the weights of ``run_dir/checkpoint.pt``, is on ``device``
    (default: the run's own) and in eval mode; call ``learner.adapt(support_x, support_y)`` and
    ``learner.predict(adapted, x)``. The configuration is the dict of ``config.yaml`` with
    ``overrides`` applied, e.g. ``inner_steps=3`` (adapt with more steps, like ``fastadapt eval
    --inner-steps 3``) or ``data_dir=`` (the dataset moved).

    Raises :class:`ConfigError` when ``run_dir`` is not a run folder (or an option or device is
    wrong) and :class:`DataError` when its checkpoint is missing or damaged, or when the data
    needed to rebuild the model cannot be read.
    """
    run = open_run(run_dir, device, overrides, progress=False)
    return run.learner, run.config


__all__ = ["Run", "load_run", "open_run", "read_run_config", "input_shape"]
