"""Run configurations: defaults, YAML presets and flag overrides, resolved into one dict.

Only the CLI reads configuration files; the library below it takes plain values. The order of
precedence is: built-in defaults < the method's own defaults < the dataset's defaults <
``--config FILE`` < command-line flags. The resolved configuration is saved as
``config.yaml`` in the run directory, and ``fastadapt eval`` rebuilds the learner from it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .registry import METHODS

DEFAULTS: dict[str, Any] = {
    "method": None,
    "dataset": "builtin",
    "data_dir": None,
    "download": True,
    "image_size": None,  # the dataset's own default (28 for glyphs and Omniglot, 84 for image folders)
    "train_split": "train",
    "ways": 10,
    "shots": 5,
    "queries": 5,
    "steps": 500,
    "meta_batch": 1,
    "lr": 1e-3,
    "lr_decay_every": 2000,
    "lr_decay": 0.5,
    "weight_decay": 0.0,
    "seed": 0,
    "device": "cpu",
    "checkpoint_every": 200,
    "log_every": 10,
    "val_every": 0,
    "val_episodes": 200,
    "max_train_seconds": 0.0,
    "eval": {"ways": 5, "shots": 1, "queries": 15, "episodes": 1000},
}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The quick default run: about a minute and a half on two CPU cores.
    "builtin": {"image_size": 28, "eval": {"episodes": 500}},
    "omniglot": {"image_size": 28},
    "imagefolder": {"image_size": 84},
    # Finn et al. (2017): K = 5 support points; scored on 100 points per curve over 600 tasks.
    "sinusoid": {"ways": 1, "shots": 5, "queries": 10,
                 "eval": {"ways": 1, "shots": 5, "queries": 100, "episodes": 600}},
}

# Keys that may differ when a run is resumed or evaluated: they do not change what is learned.
RESUMABLE = {"steps", "max_train_seconds", "device", "checkpoint_every", "log_every", "eval", "val_every", "val_episodes",
             "data_dir", "download", "progress"}


def method_options() -> dict[str, Any]:
    """Every registered method's options (name -> default), for the CLI's flags."""
    merged: dict[str, Any] = {}
    for name in METHODS.names():
        for key, value in METHODS.get(name).options.items():
            merged.setdefault(key, value)
    return merged


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    known = set(DEFAULTS) | set(method_options())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys {unknown}; known keys: {', '.join(sorted(known))}")
    if "eval" in data:
        if not isinstance(data["eval"], dict) or set(data["eval"]) - set(DEFAULTS["eval"]):
            raise ConfigError(f"config file {path}: 'eval' must map some of {sorted(DEFAULTS['eval'])} to values")
    return data


def resolve(method: str, preset: dict[str, Any] | None, flags: dict[str, Any]) -> dict[str, Any]:
    """Merge defaults, the method's and dataset's defaults, a preset and flags (None = unset)."""
    cls = METHODS.get(method)
    if preset and preset.get("method") not in (None, method):
        raise ConfigError(f"the config file is for method '{preset['method']}', not '{method}'; "
                          f"run: fastadapt train {preset['method']} --config ...")
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(cls.options))
    preset = copy.deepcopy(preset or {})
    flags = {k: v for k, v in flags.items() if v is not None}
    dataset = flags.get("dataset") or preset.get("dataset") or cfg["dataset"]
    for layer in (copy.deepcopy(DATASET_DEFAULTS.get(dataset, {})), preset, flags):
        for key, value in layer.items():
            if key == "eval":
                cfg["eval"].update(value)
            else:
                cfg[key] = value
    cfg["method"] = method
    if cfg.get("data_dir") is not None:
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser())
    return cfg


def default_run_dir(cfg: dict[str, Any]) -> Path:
    """``runs/<method>-<dataset>-<ways>w<shots>s-seed<seed>``: the same command, the same folder,
    so re-running an interrupted command resumes it."""
    return Path("runs") / f"{cfg['method']}-{cfg['dataset']}-{cfg['ways']}w{cfg['shots']}s-seed{cfg['seed']}"


def check_same_run(saved: dict[str, Any], cfg: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a run directory with a configuration that changes what is learned."""
    diffs = [k for k in sorted(set(saved) | set(cfg)) if k not in RESUMABLE and saved.get(k) != cfg.get(k)]
    if diffs:
        k = diffs[0]
        raise ConfigError(
            f"{run_dir} holds a run with {k}={saved.get(k)!r}, not {cfg.get(k)!r}; resume it with the same "
            "options or choose another --out"
        )


def save_yaml(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
