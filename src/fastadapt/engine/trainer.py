"""The meta-training loop: progress, checkpoints, exact resume, logs and a learning curve.

A run directory holds ``checkpoint.pt`` (written atomically every ``checkpoint_every``
meta-iterations, on Ctrl-C / SIGTERM and at the end), ``metrics.jsonl`` (one line per
``log_every`` iterations) and ``learning_curve.png``. The checkpoint carries everything the next
iteration depends on (weights, optimiser and schedule state, the episode generator and the
global RNG), so a resumed run continues the same episode stream and reaches the same weights as
an uninterrupted one.

Started by ``torchrun`` (a ``torch.distributed`` process group exists), the processes share each
meta-batch (see :mod:`.distributed`): only rank 0 reads and writes the run directory and shows
progress, and the checkpoint is the same whatever the number of processes, so a run resumes
with the same or another number of them.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, NonFiniteLossError
from ..io import atomic_write_text, load_checkpoint_with_fallback, previous_checkpoint, read_metrics, save_checkpoint
from ..methods.base import MetaLearner
from ..precision import autocast, check_precision
from ..progress import progress_bar
from ..tasks.sampler import on_device
from .distributed import SharedMetaBatch, processes
from .evaluate import evaluate
from .graphs import GraphedStep
from .graphs import usable as graphs_usable
from ..measure.memory import PeakMemory

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVE = "learning_curve.png"


@dataclass
class TrainSettings:
    """How long and how to meta-train (everything but the method and the data)."""

    steps: int
    meta_batch: int = 1
    lr: float = 1e-3
    lr_decay_every: int = 0  # 0: constant learning rate
    lr_decay: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 500
    log_every: int = 10
    val_every: int = 0  # 0: no validation during training
    val_episodes: int = 200
    max_train_seconds: float = 0.0  # 0: no time budget; else stop (and checkpoint) once training took this long
    precision: str = "fp32"  # "bf16": autocast matrix products and convolutions (see fastadapt.precision)
    progress: bool = True
    cuda_graphs: bool = True  # on a GPU, replay the step as a CUDA graph where the learner offers one

    def check(self) -> None:
        for name in ("steps", "meta_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for name in ("lr_decay_every", "checkpoint_every", "val_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        if self.max_train_seconds < 0:
            raise ConfigError(f"--max-train-seconds must be 0 (no limit) or more, got {self.max_train_seconds}")
        check_precision(self.precision)
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")


@dataclass
class TrainResult:
    step: int
    train_seconds: float
    episodes_per_s: float
    peak_mem_mb: float
    peak_mem_kind: str
    last_metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message says where the run was saved."""


def _interrupted_message(saved_step: int | None, out: Path | None) -> str:
    if out is None:
        return "interrupted (no run directory: nothing was saved)"
    if saved_step is None:
        return "interrupted before the first checkpoint: nothing was saved; run the same command to start over"
    return (f"interrupted: the run is saved at iteration {saved_step} in {out}; "
            "run the same command again to resume from there")


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global RNG state a training step can draw from: the CPU generator and, on a CUDA
    device, the generator of every GPU (dropout, randomised kernels)."""
    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


class _DivergenceWatch:
    """Warns once, while training runs, when the logged loss has grown far above its early level
    (a rate too large for the task: the run may still be finite but is going nowhere)."""

    def __init__(self, factor: float = 10.0) -> None:
        self.factor = factor
        self.reference: float | None = None
        self.warned = False

    def check(self, step: int, loss: float | None) -> str | None:
        if loss is None or self.warned:
            return None
        if self.reference is None:
            self.reference = max(abs(loss), 1e-8)
            return None
        if loss > self.factor * self.reference:
            self.warned = True
            return (f"warning: the training loss grew from {self.reference:.4g} to {loss:.4g} by iteration {step}; "
                    "the run looks divergent: lower --lr or the inner learning rate (--inner-lr)")
        return None


class _StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request honoured between iterations, so a
    checkpoint is never taken in the middle of an optimiser step. A second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _make_optimizer(learner: MetaLearner, s: TrainSettings) -> tuple[torch.optim.Optimizer, Any]:
    groups = learner.parameter_groups() or [{"params": [p for p in learner.parameters() if p.requires_grad]}]
    # On a GPU the fused kernel updates every tensor in a couple of launches (the host, not the
    # GPU, limits small networks' steps); elsewhere PyTorch's default implementation.
    fused = torch.device(s.device).type == "cuda"
    opt = torch.optim.Adam(groups, lr=s.lr, weight_decay=s.weight_decay, fused=fused or None)
    if s.lr_decay_every > 0:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_decay_every, gamma=s.lr_decay)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _train_accuracy(row: dict[str, Any]) -> float | None:
    if "accuracy" in row:
        return row["accuracy"]
    return 100.0 * row["acc"] if "acc" in row else None  # rows of runs logged before accuracy was in percent


def _setting(ways: Any, shots: Any, regression: bool) -> str:
    return f"{shots}-shot" if regression else f"{ways}-way {shots}-shot"


def learning_curve_figure(run_dir: str | Path, keys: tuple[str, ...] | None = None,
                          xlabel: str = "meta-iteration") -> Any:
    """The learning curve of the run in ``run_dir`` as a matplotlib figure (``None`` before any log).

    Training loss and accuracy (percent) or MSE against meta-iterations, validation accuracy when
    logged; titled "method · dataset · setting" from ``config.yaml``, with the final test result of
    ``results.json`` (when it belongs to the last logged iteration) as a dashed horizontal line.
    ``keys`` picks the logged quantities to draw, one panel each (``acc`` stands for the accuracy);
    ``xlabel`` names the ``step`` axis.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_accuracy" in r or "val_mse" in r or "val_psnr" in r]
    regression = any("mse" in r or "val_mse" in r for r in rows)
    image_function = any("psnr" in r for r in rows)  # image functions: PSNR (dB) is the score
    score = "psnr" if image_function else "mse" if regression else "accuracy"
    cfg = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
    results = _read_json(run_dir / "results.json")
    if results.get("step") not in (None, rows[-1].get("step")) or score not in results:
        results = {}  # from an earlier, shorter run of the same folder

    def values(key: str) -> list[Any]:
        return [_train_accuracy(r) if key == "accuracy" else r.get(key) for r in train]

    wanted = [score if k == "acc" else k for k in (keys or ("loss", score))]
    keys = [k for k in wanted if train and any(v is not None for v in values(k))]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(5 * max(1, len(keys)), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.plot([r["step"] for r in train], values(key), lw=1, label=f"train {key}")
        if key == score and val:
            ax.plot([r["step"] for r in val], [r.get(f"val_{score}") for r in val], "o-", label=f"val {key}")
        if key == score and results:
            setting = _setting(results.get("ways"), results.get("shots"), regression)
            if image_function:
                label = f"test: psnr {results['psnr']:.2f} ± {results['ci95']:.2f} dB"
            elif regression:
                label = f"test {setting}: mse {results['mse']:.4g} ± {results['ci95']:.2g}"
            else:
                label = f"test {setting}: {results['accuracy']:.1f} ± {results['ci95']:.1f} %"
            ax.axhline(results[score], color="C3", ls="--", lw=1, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel({"accuracy": "accuracy (%)", "psnr": "psnr (dB)"}.get(key, key))
        ax.grid(alpha=0.3)
        ax.legend()
    if cfg.get("method") and image_function:
        fig.suptitle(f"{cfg['method']} · {cfg.get('dataset')} · {cfg.get('image_size')} px")
    elif cfg.get("method"):
        fig.suptitle(f"{cfg['method']} · {cfg.get('dataset')} · "
                     f"{_setting(cfg.get('ways'), cfg.get('shots'), regression)}")
    fig.tight_layout()
    return fig


def plot_learning_curve(metrics_path: Path, out_path: Path, keys: tuple[str, ...] | None = None,
                        xlabel: str = "meta-iteration") -> None:
    """Save :func:`learning_curve_figure` of the run folder holding ``metrics_path`` to ``out_path``."""
    fig = learning_curve_figure(Path(metrics_path).parent, keys, xlabel)
    if fig is None:
        return
    import matplotlib.pyplot as plt

    tmp = out_path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_path)


def _resume_checkpoint(out: Path | None) -> dict[str, Any] | None:
    """The checkpoint of the run in ``out`` (``None`` for a new run), falling back to the
    previous one if the newest cannot be read; log lines written after it are dropped."""
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    if not ((out / CHECKPOINT).is_file() or previous_checkpoint(out / CHECKPOINT).is_file()):
        return None
    fell_back: list[str] = []
    ck = load_checkpoint_with_fallback(out / CHECKPOINT, map_location="cpu", warn=fell_back.append)
    if fell_back:
        print(fell_back[0], file=sys.stderr, flush=True)
        # Keep the unreadable file for inspection, out of the way of the next save.
        if (out / CHECKPOINT).is_file():
            (out / CHECKPOINT).replace(out / (CHECKPOINT + ".unreadable"))
    # Drop log lines written after the checkpoint by the interrupted run.
    rows = read_metrics(out / METRICS, upto=int(ck["step"]))
    atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    return ck


def meta_train(
    learner: MetaLearner,
    source: Any,
    settings: TrainSettings,
    out_dir: str | Path | None = None,
    val_source: Any = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Meta-train ``learner`` on episodes from ``source`` for ``settings.steps`` iterations.

    With ``out_dir`` the run is checkpointed there and resumed from its checkpoint if one
    exists. Raises :class:`NonFiniteLossError` on a NaN/inf loss (the last checkpoint stays as
    it was) and ``KeyboardInterrupt`` after saving a checkpoint when stopped by Ctrl-C/SIGTERM.
    """
    s = settings
    s.check()
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    learner.to(device)
    # On a GPU the pool of images is kept there when it fits: the host draws indices only.
    source, val_source = on_device(source, device), on_device(val_source, device)
    procs = processes()
    optimizer, scheduler = _make_optimizer(learner, s)
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    step, train_seconds = 0, 0.0
    saved_step: int | None = None
    # Only rank 0 touches the run directory; the others get what it read.
    out = Path(out_dir) if out_dir is not None and procs.main else None
    ck = procs.from_main(lambda: _resume_checkpoint(out))
    if ck is not None:
        learner.load_state_dict(ck["model"])
        learner.load_run_state(ck.get("run_state", {}))
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        set_rng_state(ck, device)
        step, train_seconds = int(ck["step"]), float(ck["train_seconds"])
        saved_step = step
    procs.broadcast_module(learner)  # the same weights everywhere, whatever each process built
    shared = SharedMetaBatch(learner, procs)
    resumed_from = step
    graphed = (GraphedStep(learner, optimizer, lambda: autocast(device, s.precision, cache=False))
               if graphs_usable(learner, device, procs.world, s.cuda_graphs) else None)

    def checkpoint() -> None:
        nonlocal saved_step
        if out is None or saved_step == step:  # nothing changed since the last save
            return
        save_checkpoint(
            {
                "step": step,
                "model": learner.state_dict(),
                "run_state": learner.run_state(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": gen.get_state(),
                **rng_state(device),
                "train_seconds": train_seconds,
                "processes": procs.world,
            },
            out / CHECKPOINT,
            keep_previous=True,
        )
        saved_step = step

    log_file = open(out / METRICS, "a") if out is not None else None
    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    learner.train()
    bar = progress_bar(total=s.steps, initial=step, enabled=s.progress and procs.main,
                       desc=f"meta-train {learner.name}")
    seg_start, seg_steps = time.perf_counter(), 0
    watch = _DivergenceWatch()
    try:
        with _StopRequest() as stop, PeakMemory(device) as pm, shared.attached():
            while step < s.steps and not (s.max_train_seconds and train_seconds >= s.max_train_seconds):
                t0 = time.perf_counter()
                batch = shared.begin_step(learner.draw_batch(source, gen, s.meta_batch, step + 1))
                batch = batch.to(device, non_blocking=True)
                try:
                    if graphed is not None:
                        metrics = graphed(batch, step + 1)
                    else:
                        with autocast(device, s.precision):
                            metrics = learner.train_step(batch, optimizer, step + 1)
                except NonFiniteLossError as exc:
                    raise NonFiniteLossError(f"{exc} (run directory: {out})" if out else str(exc)) from None
                scheduler.step()
                if device.type == "cuda" and ((step + 1) % s.log_every == 0 or step + 1 == s.steps):
                    # Logged times count finished GPU work. Between logs the host draws the next
                    # batch while the GPU finishes this step: a step's loss check waits for its own
                    # forward pass, so the host is never more than one step ahead.
                    torch.cuda.synchronize(device)
                # Several processes: whole-batch metrics, a stop anywhere stops all, rank 0's clock.
                metrics, train_seconds = shared.end_step(
                    metrics, stop.requested, train_seconds + time.perf_counter() - t0)
                step += 1
                seg_steps += 1
                window.append(metrics)
                bar.update(1)
                out_of_time = bool(s.max_train_seconds) and train_seconds >= s.max_train_seconds
                if step % s.log_every == 0 or step == s.steps or out_of_time:
                    last = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    row: dict[str, Any] = {"step": step, **last, "lr": optimizer.param_groups[0]["lr"],
                                           "train_seconds": round(train_seconds, 3)}
                    if procs.main and s.val_every and val_source is not None and (
                            step % s.val_every == 0 or step == s.steps or out_of_time):
                        res = evaluate(learner, val_source, s.val_episodes, seed=s.seed + 1, device=device,
                                       progress=False, precision=s.precision)
                        learner.train()
                        key = next(k for k in ("accuracy", "psnr", "mse") if k in res)
                        row[f"val_{key}"] = res[key]
                    window = []
                    warning = watch.check(step, last.get("loss"))
                    if warning and procs.main:
                        tqdm.write(warning, file=sys.stderr)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()})
                    if log_file is not None:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                    if on_log is not None:
                        on_log(row)
                if s.checkpoint_every and step % s.checkpoint_every == 0:
                    checkpoint()
                if shared.stop(stop.requested):
                    checkpoint()
                    raise KeyboardInterrupt
            checkpoint()
    except KeyboardInterrupt:
        raise RunInterrupted(_interrupted_message(saved_step, out)) from None
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if out is not None:
            plot_learning_curve(out / METRICS, out / CURVE)
    seg_time = max(time.perf_counter() - seg_start, 1e-9)
    return TrainResult(
        step=step,
        train_seconds=train_seconds,
        episodes_per_s=seg_steps * s.meta_batch / seg_time,
        peak_mem_mb=pm.peak_mb,
        peak_mem_kind=pm.kind,
        last_metrics=last,
        resumed_from=resumed_from,
    )
