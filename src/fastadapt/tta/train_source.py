"""Training of the source model that test-time adaptation starts from.

Supervised CIFAR-10 training with the standard augmentation (4-pixel zero-padded random crop,
horizontal flip), SGD with momentum and weight decay and a cosine learning-rate schedule. With a
rotation head the loss is the joint objective of Sun et al. (ICML 2020): cross-entropy of the
classes plus cross-entropy of the rotation of a randomly rotated copy of each training image,
through the shared trunk. As in their training loop (``main.py``), the clean batch and the rotated
batch go through the network in two separate forward passes, so each is normalised with its own
BatchNorm statistics (and the running statistics take one update from each). Checkpoints are written atomically after every epoch and a run resumes
exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io import atomic_write_text, load_checkpoint, save_checkpoint
from ..progress import progress_bar
from ..errors import ConfigError, NonFiniteLossError
from ..models.resnet_cifar import ResNetCifar, build_resnet_cifar
from .augment import random_crop_flip, random_rotation_labels, rotate_batch, to_float

MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"
LOG_FILE = "metrics.jsonl"

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
)


def _check_config(cfg: dict[str, Any]) -> None:
    if cfg["dataset"] != "cifar10":
        raise ConfigError(f"tta source training supports --dataset cifar10 only, got '{cfg['dataset']}'")
    for key in ("epochs", "batch_size", "width"):
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
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on uint8 ``images``."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_float(images[i : i + batch_size].to(device))
        correct += int((model(x).argmax(1) == labels[i : i + batch_size].to(device)).sum())
    model.train(was)
    return 100.0 * correct / len(images)


def train_source(
    cfg: dict[str, Any],
    out: str | Path,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) a source model into run folder ``out``; returns the final summary."""
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
    total = steps_per_epoch * int(cfg["epochs"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    start_epoch, elapsed = 0, 0.0
    ckpt_path = out / MODEL_FILE
    if ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state.get("config", {}).get("arch") != cfg["arch"] or state.get("config", {}).get("rotation_head") != cfg["rotation_head"]:
            raise ConfigError(f"{out} holds a different run; choose another --out folder")
        model.load_state_dict(state["model"])
        if state["epoch"] < int(cfg["epochs"]):
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
        start_epoch, elapsed = int(state["epoch"]), float(state.get("train_seconds", 0.0))
    atomic_write_text(out / CONFIG_FILE, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    rot = bool(cfg["rotation_head"])
    for epoch in range(start_epoch, int(cfg["epochs"])):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen)
        sums = {"loss": 0.0, "acc": 0.0, "rot_loss": 0.0}
        bar = progress_bar(range(steps_per_epoch), enabled=progress, desc=f"epoch {epoch + 1}/{cfg['epochs']}")
        for step in bar:
            idx = perm[step * bs : (step + 1) * bs]
            x = random_crop_flip(to_float(train_images[idx]), gen).to(device)
            y = train_labels[idx].to(device)
            if rot:
                r = random_rotation_labels(len(idx), gen, device)
                logits, rot_logits = model.forward_both(x, rotate_batch(x, r))
                cls_loss = F.cross_entropy(logits, y)
                rot_loss = F.cross_entropy(rot_logits, r)
                loss = cls_loss + rot_loss
                sums["rot_loss"] += rot_loss.item()
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss became {float(loss)} at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums["loss"] += loss.item()
            sums["acc"] += float((logits.argmax(1) == y).float().mean())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.3f}")
        elapsed += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "lr": sched.get_last_lr()[0], "train_seconds": round(elapsed, 1)}
        record.update({k: v / steps_per_epoch for k, v in sums.items() if rot or k != "rot_loss"})
        record["acc"] *= 100.0
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "generator": gen.get_state(), "epoch": epoch + 1, "config": cfg, "train_seconds": elapsed},
                        ckpt_path)
        with open(out / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(json.dumps(record))  # one line per epoch, also when the bars are off
    summary: dict[str, Any] = {"epochs": int(cfg["epochs"]), "train_seconds": round(elapsed, 1)}
    if test_images is not None:
        summary["clean_test_error"] = 100.0 - accuracy(model, test_images, test_labels, device=device)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def load_source_model(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[ResNetCifar, dict[str, Any]]:
    """The trained model of a ``train-source`` run folder (eval mode) and its config."""
    state = load_checkpoint(Path(run_dir) / MODEL_FILE, map_location=device)
    cfg = {**DEFAULTS, **state["config"]}
    model = model_from_config(cfg).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), cfg
