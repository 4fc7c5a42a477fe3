"""Run configurations: defaults, YAML presets and flag overrides, resolved into one dict.

Only the CLI reads configuration files; the library below it takes plain values. The order of
precedence is: built-in defaults < the method's own defaults < the dataset's defaults < the
method's defaults for that task family (``task_defaults``: e.g. MAML's inner rate on sinusoids) <
``--config FILE`` < command-line flags. Every value is checked (type and range) by
:func:`validate` before anything is written. The resolved configuration is saved as
``config.yaml`` in the run directory, and ``fastadapt eval`` rebuilds the learner from it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .precision import MEMORY_FORMATS, PRECISIONS
from .registry import DATASETS, METHODS

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
    "lr_decay_every": 0,  # a constant rate unless the method declares a schedule (ProtoNet does)
    "lr_decay": 0.5,
    "weight_decay": 0.0,
    "seed": 0,
    "device": "cpu",
    "checkpoint_every": 200,
    "log_every": 10,
    "val_every": 0,
    "val_episodes": 200,
    "max_train_seconds": 0.0,
    "threads": 0,  # 0: one per core
    "precision": "fp32",
    "compile": False,
    "memory_format": "auto",
    "cuda_graphs": True,
    "eval": {"ways": 5, "shots": 1, "queries": 15, "episodes": 1000},
}

DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # The quick default run: about a minute and a half on two CPU cores.
    "builtin": {"image_size": 28, "eval": {"episodes": 500}},
    "omniglot": {"image_size": 28},
    "imagefolder": {"image_size": 84},
    # Finn et al. (2017): K = 10 support points while training (their released command); scored
    # on 100 points per curve over 600 tasks.
    "sinusoid": {"ways": 1, "shots": 10, "queries": 10,
                 "eval": {"ways": 1, "shots": 10, "queries": 100, "episodes": 600}},
    # Images as functions (trans-inr, learned-init, random-init): a task is one image; ways, shots
    # and queries do not apply (--support-fraction sets the observed pixels).
    "builtin-images": {"image_size": 28, "eval": {"episodes": 200}},
    "omniglot-images": {"image_size": 28, "eval": {"episodes": 500}},
    "mnist-images": {"image_size": 28, "eval": {"episodes": 500}},
    "cifar10-images": {"image_size": 32, "eval": {"episodes": 500}},
    "imagefolder-images": {"image_size": 32, "eval": {"episodes": 500}},
}

# Keys that may differ when a run is resumed or evaluated: they do not change what is learned.
RESUMABLE = {"steps", "max_train_seconds", "device", "checkpoint_every", "log_every", "eval", "val_every", "val_episodes",
             "data_dir", "download", "progress", "threads", "precision", "compile", "processes",
             "cuda_graphs"}

# What a run records about how it ran, not an option: a preset may hold it (a run's config.yaml
# reused as --config) and it is ignored there.
RECORDED = {"processes"}

# Options decided when a run starts (see MetaLearner.decide_run_options): while a flag keeps the
# "decide for me" value, a resumed run takes the saved decision.
UNDECIDED = {"batching": "auto", "anneal_steps": 0, "memory_format": "auto"}
# What a run saved before an option existed did: Conv-4 was channels-last everywhere.
LEGACY = {"memory_format": "channels_last"}


def method_options() -> dict[str, Any]:
    """Every registered method's options (name -> default), for the CLI's flags."""
    merged: dict[str, Any] = {}
    for name in METHODS.names():
        for key, value in METHODS.get(name).options.items():
            merged.setdefault(key, value)
    return merged


# --------------------------------------------------------------------------------------------
# Types and ranges of every option. ``kind`` is int, float, bool or str; ``low`` an inclusive
# lower bound (``low_open``: exclusive); ``none`` whether null/None is allowed; ``choices``.

def _spec(kind: str, low: float | None = None, low_open: bool = False, high: float | None = None,
          none: bool = False, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"kind": kind, "low": low, "low_open": low_open, "high": high, "none": none, "choices": choices}


SPECS: dict[str, dict[str, Any]] = {
    "method": _spec("str", none=True),
    "dataset": _spec("str"),
    "data_dir": _spec("str", none=True),
    "download": _spec("bool"),
    "image_size": _spec("int", low=4, none=True),
    "train_split": _spec("str", choices=("train", "trainval")),
    "ways": _spec("int", low=1),
    "shots": _spec("int", low=1),
    "queries": _spec("int", low=1),
    "steps": _spec("int", low=1),
    "meta_batch": _spec("int", low=1),
    "lr": _spec("float", low=0, low_open=True),
    "lr_decay_every": _spec("int", low=0),
    "lr_decay": _spec("float", low=0, low_open=True, high=1),
    "weight_decay": _spec("float", low=0),
    "seed": _spec("int", low=0),
    "device": _spec("str"),
    "checkpoint_every": _spec("int", low=0),
    "log_every": _spec("int", low=1),
    "val_every": _spec("int", low=0),
    "val_episodes": _spec("int", low=1),
    "max_train_seconds": _spec("float", low=0),
    "threads": _spec("int", low=0),
    "precision": _spec("str", choices=PRECISIONS),
    "compile": _spec("bool"),
    "cuda_graphs": _spec("bool"),
    "memory_format": _spec("str", choices=MEMORY_FORMATS),
    "eval.ways": _spec("int", low=1),
    "eval.shots": _spec("int", low=1),
    "eval.queries": _spec("int", low=1),
    "eval.episodes": _spec("int", low=1),
    # method options
    "backbone": _spec("str"),
    "distance": _spec("str", choices=("euclidean", "cosine")),
    "inner_steps": _spec("int", low=1),
    "inner_lr": _spec("float", low=0, low_open=True),
    "first_order": _spec("bool"),
    "grad_checkpoint": _spec("bool"),
    "batching": _spec("str", choices=("auto", "loop", "vmap", "grouped")),  # grouped: MAML and kin
    "inner_optim": _spec("str", choices=("sgd", "adam")),
    "outer_lr": _spec("float", low=0, low_open=True),
    "anneal": _spec("bool"),
    "anneal_steps": _spec("int", low=0),
    "lam": _spec("float", low=0, low_open=True),
    "cg_steps": _spec("int", low=1),
    # classifier pre-training (ncm, qiao) and parameter prediction (qiao)
    "pretrain_batch": _spec("int", low=1),
    "scale": _spec("float", low=0, low_open=True),
    "learn_scale": _spec("bool"),
    "base_classes": _spec("int", low=2),
    "pretrain_steps": _spec("int", low=0),
    "mix_prob": _spec("float", low=0, high=1),
    "predictor": _spec("str", choices=("mlp", "linear")),
    "predictor_lr": _spec("float", low=0, low_open=True),
    "finetune_extractor": _spec("bool"),
    "joint": _spec("bool"),
    # implicit neural representations (trans-inr, learned-init, random-init)
    "support_fraction": _spec("float", low=0, low_open=True, high=1),
    "inr_depth": _spec("int", low=1),
    "inr_width": _spec("int", low=1),
    "pe_dim": _spec("int", low=2),
    "pe_sigma": _spec("float", low=1),
    "out_bias": _spec("float"),
    "patch_size": _spec("int", low=1),
    "trans_dim": _spec("int", low=1),
    "trans_depth": _spec("int", low=1),
    "heads": _spec("int", low=1),
    "head_dim": _spec("int", low=1),
    "ff_dim": _spec("int", low=1),
    "n_groups": _spec("int", low=1),
    "tto_steps": _spec("int", low=0),
    "tto_lr": _spec("float", low=0, low_open=True),
}


def _spec_of(key: str, default: Any) -> dict[str, Any] | None:
    if key in SPECS:
        return SPECS[key]
    for typ, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if isinstance(default, typ):
            return _spec(kind)
    return None


def _describe(spec: dict[str, Any]) -> str:
    if spec["choices"]:
        return "one of " + ", ".join(spec["choices"])
    kind = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a name"}[spec["kind"]]
    low, high = spec["low"], spec["high"]
    if low is not None and high is not None:
        kind += f" in {'(' if spec['low_open'] else '['}{low:g}, {high:g}]"
    elif low is not None:
        kind += f" {'>' if spec['low_open'] else '>='} {low:g}"
    return kind


def check_value(key: str, value: Any, spec: dict[str, Any]) -> Any:
    """``value`` converted to the option's type, or a ConfigError naming the flag to change.

    Numbers written as text (PyYAML 1.1 reads ``1e-3`` as a string) are accepted as numbers;
    a whole-number option refuses ``2.5`` and ``true``; NaN and infinity are refused."""
    flag = "--" + key.replace("eval.", "eval_").replace("_", "-")
    bad = ConfigError(f"{flag} must be {_describe(spec)}, got {value!r}"
                      + (f" (config key '{key}')" if "." in key or "_" in key else ""))
    if value is None:
        if spec["none"]:
            return None
        raise bad
    kind = spec["kind"]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise bad
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad
        if spec["choices"] and value not in spec["choices"]:
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise bad from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad
    if kind == "int":
        if float(value) != int(value):
            raise bad
        value = int(value)
    else:
        value = float(value)
    low, high = spec["low"], spec["high"]
    if low is not None and (value < low or (spec["low_open"] and value == low)):
        raise bad
    if high is not None and value > high:
        raise bad
    return value


def validate(cfg: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check and convert every value of ``cfg`` in place (see :func:`check_value`); returns it."""
    defaults = defaults or {}
    for key in list(cfg):
        if key == "eval":
            if not isinstance(cfg["eval"], dict):
                raise ConfigError("'eval' must map some of ways, shots, queries, episodes to values")
            for k in list(cfg["eval"]):
                cfg["eval"][k] = check_value(f"eval.{k}", cfg["eval"][k], SPECS[f"eval.{k}"])
            continue
        spec = _spec_of(key, defaults.get(key))
        if spec is not None:
            cfg[key] = check_value(key, cfg[key], spec)
    return cfg


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
    for key in RECORDED:
        data.pop(key, None)
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
    cfg = method_defaults(method)
    preset = copy.deepcopy(preset or {})
    flags = {k: v for k, v in flags.items() if v is not None}
    dataset = flags.get("dataset") or preset.get("dataset") or cfg["dataset"]
    if not isinstance(dataset, str) or dataset not in DATASETS:
        DATASETS.get(str(dataset))  # the unknown-name error, with the known names
    kind = getattr(DATASETS.get(dataset), "kind", "classification")
    for layer in (copy.deepcopy(DATASET_DEFAULTS.get(dataset, {})), copy.deepcopy(cls.task_defaults.get(kind, {})),
                  preset, flags):
        for key, value in layer.items():
            if key == "eval":
                cfg["eval"].update(value)
            else:
                cfg[key] = value
    cfg["method"] = method
    validate(cfg, method_defaults(method))
    if cfg.get("data_dir") is not None:
        cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser())
    return cfg


def method_defaults(method: str) -> dict[str, Any]:
    """Built-in defaults with the method's own options on top (before dataset and task family)."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(copy.deepcopy(METHODS.get(method).options))
    return cfg


def adopt_run_decisions(saved: dict[str, Any], cfg: dict[str, Any]) -> None:
    """For a resumed run: options still at their "decide for me" value take the saved decision."""
    for key, value in LEGACY.items():
        saved.setdefault(key, value)
    for key, undecided in UNDECIDED.items():
        if cfg.get(key) == undecided and saved.get(key) not in (None, undecided):
            cfg[key] = saved[key]


def default_run_dir(cfg: dict[str, Any]) -> Path:
    """``runs/<method>-<dataset>-<ways>w<shots>s-seed<seed>``: the same command, the same folder,
    so re-running an interrupted command resumes it. Image functions (one image per task) have no
    ways or shots: ``runs/<method>-<dataset>-<size>px-seed<seed>``."""
    if getattr(DATASETS.get(cfg["dataset"]), "kind", None) == "image_function":
        return Path("runs") / f"{cfg['method']}-{cfg['dataset']}-{cfg.get('image_size')}px-seed{cfg['seed']}"
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
