"""Training of the source model that test-time adaptation starts from.

Supervised CIFAR-10 training with the standard augmentation (4-pixel zero-padded random crop,
horizontal flip), SGD with momentum and weight decay and a cosine learning-rate schedule. With a
rotation head the loss is the joint objective of Sun et al. (ICML 2020): cross-entropy of the
classes plus cross-entropy of the rotation of a randomly rotated copy of each training image,
through the shared trunk. As in their training loop (``main.py``), the clean batch and the rotated
batch go through the network in two separate forward passes, so each is normalised with its own
BatchNorm statistics (and the running statistics take one update from each).

A run folder holds what ``fastadapt train`` writes: ``config.yaml`` (the resolved options),
``checkpoint.pt`` (written atomically after every epoch and when :func:`train_source` is asked to
stop), ``metrics.jsonl`` (loss, accuracy as a fraction, rotation loss, learning rate and time every
``log_every`` iterations and at the end of every epoch); the ``fastadapt tta train-source`` command
adds ``learning_curve.png`` and ``results.json``. A run resumes exactly where its checkpoint
stopped, also in the middle of an epoch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import atomic_write_text, load_checkpoint, read_metrics, save_checkpoint
from ..progress import progress_bar
from ..errors import ConfigError, NonFiniteLossError
from ..models.resnet_cifar import ResNetCifar, build_resnet_cifar
from .augment import random_crop_flip, random_rotation_labels, rotate_batch, to_float

CHECKPOINT = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
LOG_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
RESULTS_FILE = "results.json"
# Files of run folders written before the layout of ``fastadapt train`` was adopted.
OLD_CHECKPOINT, OLD_CONFIG, OLD_RESULTS = "model.pt", "config.json", "summary.json"
# Options that may change when a run is resumed: they do not change what is learned.
RESUMABLE = ("epochs", "data_dir", "log_every")

DEFAULTS: dict[str, Any] = dict(
    dataset="cifar10",
    arch="resnet8",
    width=1,
    norm="bn",
    rotation_head=False,
    epochs=10,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    seed=0,
    train_subset=0,
    log_every=50,
)


def _check_config(cfg: dict[str, Any]) -> None:
    if cfg["dataset"] != "cifar10":
        raise ConfigError(f"tta source training supports --dataset cifar10 only, got '{cfg['dataset']}'")
    for key in ("epochs", "batch_size", "width", "log_every"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, got {cfg[key]}")
    if float(cfg["lr"]) <= 0:
        raise ConfigError(f"--lr must be positive, got {cfg['lr']}")
    if int(cfg["train_subset"]) < 0:
        raise ConfigError(f"--train-subset must be 0 (all) or positive, got {cfg['train_subset']}")


def model_from_config(cfg: dict[str, Any]) -> ResNetCifar:
    return build_resnet_cifar(
        cfg["arch"], width=int(cfg["width"]), norm=cfg["norm"], rotation_head=bool(cfg["rotation_head"])
    )


@torch.no_grad()
def correct_per_image(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Whether ``model`` in eval mode classifies each of the uint8 ``images`` right (bool, CPU)."""
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size].to(device))
        out.append((model(x).argmax(1) == labels[i : i + batch_size].to(device)).cpu())
    model.train(was)
    return torch.cat(out)


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on uint8 ``images``."""
    return 100.0 * float(correct_per_image(model, images, labels, batch_size, device).float().mean())


def saved_progress(out: str | Path) -> dict[str, int] | None:
    """Where the checkpoint of run folder ``out`` stands (``epoch`` completed epochs, ``step`` in
    the current epoch, ``iteration`` in all, ``steps_per_epoch``), or ``None`` if none is saved."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    return {k: int(state[k]) for k in ("epoch", "step", "iteration", "steps_per_epoch", "epochs")}


def train_source(
    cfg: dict[str, Any],
    out: str | Path,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Train (or resume) a source model into run folder ``out``; returns the final summary.

    ``stop`` is asked after every iteration; when it returns true the run is checkpointed where it
    is and ``KeyboardInterrupt`` is raised (:func:`saved_progress` says where it stopped).
    """
    cfg = {**DEFAULTS, **cfg}
    _check_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    torch.manual_seed(int(cfg["seed"]))
    model = model_from_config(cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]),
                          weight_decay=float(cfg["weight_decay"]), nesterov=True)
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    if int(cfg["train_subset"]):
        keep = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(12345))[: int(cfg["train_subset"])]
        train_images, train_labels = train_images[keep], train_labels[keep]
    n = len(train_labels)
    bs = int(cfg["batch_size"])
    steps_per_epoch = n // bs
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch-size {bs} is larger than the {n} training images")
    epochs = int(cfg["epochs"])
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    log_every = int(cfg["log_every"])
    rot = bool(cfg["rotation_head"])
    keys = ("loss", "acc", "rot_loss") if rot else ("loss", "acc")
    start_epoch, start_step, elapsed = 0, 0, 0.0
    perm = None
    window = dict.fromkeys(keys, 0.0) | {"n": 0}
    epoch_sums = dict.fromkeys(keys, 0.0) | {"n": 0}
    ckpt_path = out / CHECKPOINT
    if not ckpt_path.is_file() and (out / OLD_CHECKPOINT).is_file():
        raise ConfigError(f"{out} holds a run of an earlier version ({OLD_CHECKPOINT}); choose another --out folder")
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        saved = state.get("config", {})
        diffs = [k for k in sorted(set(saved) | set(cfg)) if k not in RESUMABLE and saved.get(k) != cfg.get(k)]
        if diffs:
            k = diffs[0]
            raise ConfigError(f"{out} holds a run with {k}={saved.get(k)!r}, not {cfg.get(k)!r}; resume it with "
                              "the same options or choose another --out folder")
        model.load_state_dict(state["model"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        elapsed = float(state.get("train_seconds", 0.0))
        if start_epoch < epochs:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            if start_step:
                perm, window, epoch_sums = state["perm"], state["window"], state["epoch_sums"]
        atomic_write_text(out / LOG_FILE, "".join(json.dumps(r) + "\n" for r in read_metrics(out / LOG_FILE, int(state["iteration"]))))
    atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(cfg, sort_keys=False))

    def checkpoint(epoch: int, step: int) -> None:
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "generator": gen.get_state(), "epoch": epoch, "step": step,
                         "iteration": epoch * steps_per_epoch + step, "steps_per_epoch": steps_per_epoch,
                         "epochs": epochs, "perm": perm if step else None, "window": window,
                         "epoch_sums": epoch_sums, "config": cfg, "train_seconds": elapsed}, ckpt_path)

    def averages(sums: dict[str, float]) -> dict[str, float]:
        return {k: sums[k] / max(sums["n"], 1) for k in keys}

    with open(out / LOG_FILE, "a") as log:
        for epoch in range(start_epoch, epochs):
            model.train()
            if not start_step:
                perm = torch.randperm(n, generator=gen)
            bar = progress_bar(range(start_step, steps_per_epoch), enabled=progress, desc=f"epoch {epoch + 1}/{epochs}",
                               total=steps_per_epoch, initial=start_step)
            for step in bar:
                t0 = time.perf_counter()
                idx = perm[step * bs : (step + 1) * bs]
                x = random_crop_flip(to_float(train_images[idx]), gen).to(device)
                y = train_labels[idx].to(device)
                if rot:
                    r = random_rotation_labels(len(idx), gen, device)
                    logits, rot_logits = model.forward_both(x, rotate_batch(x, r))
                    rot_loss = F.cross_entropy(rot_logits, r)
                    loss = F.cross_entropy(logits, y) + rot_loss
                else:
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"loss became {float(loss)} at epoch {epoch + 1}, iteration {step + 1}; "
                                             f"lower --lr (the last checkpoint in {out} is kept)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed += time.perf_counter() - t0
                values = {"loss": loss.item(), "acc": float((logits.argmax(1) == y).float().mean())}
                if rot:
                    values["rot_loss"] = rot_loss.item()
                for sums in (window, epoch_sums):
                    for k, v in values.items():
                        sums[k] += v
                    sums["n"] += 1
                done = step + 1
                iteration = epoch * steps_per_epoch + done
                if done % log_every == 0 or done == steps_per_epoch:
                    row = {"step": iteration, "epoch": epoch + 1, **averages(window),
                           "lr": sched.get_last_lr()[0], "train_seconds": round(elapsed, 3)}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    window = dict.fromkeys(keys, 0.0) | {"n": 0}
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                if done < steps_per_epoch and stop is not None and stop():
                    checkpoint(epoch, done)
                    raise KeyboardInterrupt
            start_step = 0
            record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, **averages(epoch_sums),
                      "lr": sched.get_last_lr()[0], "train_seconds": round(elapsed, 1)}
            epoch_sums = dict.fromkeys(keys, 0.0) | {"n": 0}
            checkpoint(epoch + 1, 0)
            tqdm.write(json.dumps(record))  # one line per epoch, also when the bars are off
            if epoch + 1 < epochs and stop is not None and stop():
                raise KeyboardInterrupt
    summary: dict[str, Any] = {"epochs": epochs, "iterations": total, "train_seconds": round(elapsed, 1),
                               "train_images_per_s": round(total * bs / elapsed, 1) if elapsed else None}
    if test_images is not None:
        correct = correct_per_image(model, test_images, test_labels, device=device)
        err = 100.0 * (1.0 - correct.float())
        summary["clean_test_error"] = float(err.mean())
        summary["clean_test_ci95"] = 1.96 * float(err.std()) / math.sqrt(len(err)) if len(err) > 1 else 0.0
        summary["test_images"] = len(err)
    return summary


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The resolved config and the results (``{}`` if not written yet) of a train-source run folder."""
    run = Path(run_dir)
    if (run / CONFIG_FILE).is_file():
        cfg = yaml.safe_load((run / CONFIG_FILE).read_text()) or {}
    elif (run / OLD_CONFIG).is_file():
        cfg = json.loads((run / OLD_CONFIG).read_text())
    else:
        raise ConfigError(f"{run} is not a train-source run folder (no {CONFIG_FILE}); pass the --out of "
                          "'fastadapt tta train-source'")
    for name in (RESULTS_FILE, OLD_RESULTS):
        if (run / name).is_file():
            return {**DEFAULTS, **cfg}, json.loads((run / name).read_text())
    return {**DEFAULTS, **cfg}, {}


def load_source_model(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[ResNetCifar, dict[str, Any]]:
    """The trained model of a ``train-source`` run folder (eval mode) and its config."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file() and (Path(run_dir) / OLD_CHECKPOINT).is_file():
        path = Path(run_dir) / OLD_CHECKPOINT  # a run folder of an earlier version
    state = load_checkpoint(path, map_location=device)
    cfg = {**DEFAULTS, **state["config"]}
    model = model_from_config(cfg).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg
