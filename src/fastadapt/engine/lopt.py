"""Meta-training runs of learned optimizers, and their evaluation against tuned baselines.

:func:`meta_train_lopt` meta-trains a rule (:mod:`fastadapt.optim`) on problems of an optimizee
family: each *trajectory* is a fresh problem trained for ``horizon`` steps, cut into truncations
of ``unroll`` steps, the rule updated by Adam after every truncation. The run folder holds
``config.yaml``, ``checkpoint.pt`` (written atomically at trajectory boundaries, with the previous
one kept; the same command resumes exactly), ``metrics.jsonl``, ``learning_curve.png`` and
``lopt.pt``: the rule to use, the one with the lowest validation loss when validation is on (as in
the authors' code), else the last.

:func:`evaluate_optimizers` trains unseen problems with the learned rule (through the
``torch.optim`` API, untuned) and with SGD, SGD with momentum, RMSprop and Adam, each with its
learning rate tuned on a grid on separate problems of the same family, and reports loss curves over
seeds, final losses, steps to a target loss and wall time per step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, DataError
from ..io import (atomic_write_text, load_checkpoint_with_fallback, previous_checkpoint, read_metrics,
                  save_checkpoint)
from ..measure.stats import median
from ..measure.threads import cost_context
from ..optim.base import LearnedRule, build_rule, load_rule, rule_blob, save_rule
from ..optim.base import rule_path as resolved_rule_path
from ..optim.learned import LearnedOptimizer
from ..optim.unroll import META_GRADIENTS, Trajectory, unroll
from ..progress import progress_bar
from ..registry import LEARNED_RULES, OPTIMIZEES
from ..tasks.optimizee import Problem, make_problem
from .runs import read_run_config
from .trainer import _StopRequest, RunInterrupted

CHECKPOINT, METRICS, CURVE, RULE_FILE = "checkpoint.pt", "metrics.jsonl", "learning_curve.png", "lopt.pt"
#: Settings that define a run: a resumed run must agree on them.
RUN_KEYS = ("optimizer", "optimizee", "horizon", "unroll", "lr", "second_order", "seed", "rule_options",
            "meta_gradient", "meta_options", "val_every", "val_problems")
VAL_SEED = 10_000  # validation problems: their own seeds, never drawn in training
TUNE_SEED = 20_000  # baselines' learning rates are tuned on these problems
TEST_SEED = 30_000  # reported problems


@dataclass
class LoptSettings:
    optimizer: str = "lstm"
    optimizee: str = "quadratic"
    trajectories: int = 200
    horizon: int = 100
    unroll: int = 20
    lr: float = 1e-3
    second_order: bool = False
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    rule_options: dict[str, Any] = field(default_factory=dict)
    meta_gradient: str = "truncated"
    meta_options: dict[str, Any] = field(default_factory=dict)
    val_every: int = 25
    val_problems: int = 4
    checkpoint_every: int = 10
    max_train_seconds: float = 0.0
    progress: bool = True

    def check(self) -> None:
        LEARNED_RULES.get(self.optimizer)
        OPTIMIZEES.get(self.optimizee)
        if self.meta_gradient not in META_GRADIENTS:
            raise ConfigError(f"unknown --meta-gradient {self.meta_gradient!r}; known: {', '.join(META_GRADIENTS)}")
        for key in ("trajectories", "horizon", "unroll", "val_problems"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        if self.horizon % self.unroll:
            raise ConfigError(f"--horizon {self.horizon} must be a multiple of --unroll {self.unroll}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        for key in ("val_every", "checkpoint_every", "max_train_seconds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")

    def run_config(self) -> dict[str, Any]:
        cfg = asdict(self)
        cfg.pop("progress")
        return cfg


@dataclass
class LoptResult:
    trajectories: int
    train_seconds: float
    best_val_loss: float | None
    skipped_truncations: int


def _rule(s: LoptSettings) -> LearnedRule:
    torch.manual_seed(s.seed)
    try:
        return build_rule(s.optimizer, **s.rule_options).to(s.device)
    except TypeError as exc:
        raise ConfigError(f"--option does not fit the {s.optimizer} optimizer: {exc}") from None


def validation_loss(rule: LearnedRule, s: LoptSettings, problems: int | None = None) -> float:
    """Mean optimizee loss over the last 10 % of ``horizon`` steps on fixed held-out problems."""
    losses = []
    for i in range(problems or s.val_problems):
        g = torch.Generator().manual_seed(VAL_SEED + i)
        traj = Trajectory.start(rule, make_problem(s.optimizee, g, s.device, "test", s.data_dir))
        for _ in range(s.horizon // s.unroll):
            unroll(rule, traj, s.unroll, s.horizon, g, meta_grad=False)
        tail = traj.losses[-max(1, s.horizon // 10):]
        losses.append(sum(tail) / len(tail))
    return float(sum(losses) / len(losses))


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, upto: int) -> None:
    """Drop log lines past the checkpoint a run resumes from (they are recomputed)."""
    if path.is_file():
        rows = read_metrics(path, upto)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def meta_train_lopt(s: LoptSettings, run_dir: str | Path,
                    on_log: Callable[[dict[str, Any]], None] | None = None) -> LoptResult:
    """Meta-train ``s.optimizer`` on ``s.optimizee`` problems into ``run_dir`` (resumed if it holds
    a checkpoint; ``trajectories`` larger than the checkpoint's extends a finished run)."""
    s.check()
    run_dir = Path(run_dir)
    rule = _rule(s)
    meta_opt = torch.optim.Adam(rule.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    done, train_seconds, skipped = 0, 0.0, 0
    best: float | None = None
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.is_file() or previous_checkpoint(ckpt_path).is_file():
        ck = load_checkpoint_with_fallback(ckpt_path, s.device)
        rule.load_state_dict(ck["rule"]["state_dict"])
        meta_opt.load_state_dict(ck["meta_opt"])
        gen.set_state(ck["generator"])
        done, train_seconds, skipped, best = ck["trajectories"], ck["train_seconds"], ck["skipped"], ck["best_val"]
        _truncate_metrics(run_dir / METRICS, done)
    run_dir.mkdir(parents=True, exist_ok=True)
    estimator = META_GRADIENTS[s.meta_gradient]
    options = dict(s.meta_options)
    if s.meta_gradient == "truncated":
        options["second_order"] = s.second_order

    def checkpoint() -> None:
        save_checkpoint({"rule": rule_blob(rule), "meta_opt": meta_opt.state_dict(), "generator": gen.get_state(),
                         "trajectories": done, "train_seconds": train_seconds, "skipped": skipped,
                         "best_val": best, "settings": s.run_config()}, ckpt_path, keep_previous=True)

    meta = {"optimizee": s.optimizee, "horizon": s.horizon, "unroll": s.unroll, "seed": s.seed}
    if not (run_dir / RULE_FILE).is_file():
        save_rule(rule, run_dir / RULE_FILE, {**meta, "trajectories": done})
    start = time.perf_counter()
    bar = progress_bar(range(done, s.trajectories), enabled=s.progress, total=s.trajectories, initial=done,
                       desc=f"meta-training {s.optimizer} on {s.optimizee}", unit="traj")
    stopped = False
    with _StopRequest() as stop:
        for _ in bar:
            t0 = time.perf_counter()
            traj = Trajectory.start(rule, make_problem(s.optimizee, gen, s.device, "train", s.data_dir))
            meta_losses = []
            for _k in range(s.horizon // s.unroll):
                meta_opt.zero_grad(set_to_none=True)
                loss = estimator(rule, traj, s.unroll, s.horizon, gen, **options)
                if not math.isfinite(loss):  # a diverged optimizee: skip the update, drop the trajectory
                    skipped += 1
                    break
                meta_opt.step()
                meta_losses.append(loss)
            done += 1
            train_seconds += time.perf_counter() - t0
            row: dict[str, Any] = {"step": done, "loss": sum(meta_losses) / max(len(meta_losses), 1),
                                   "final_loss": traj.losses[-1], "seconds": round(train_seconds, 3)}
            if s.val_every and (done % s.val_every == 0 or done == s.trajectories):
                row["val_loss"] = validation_loss(rule, s)
                if best is None or row["val_loss"] < best:
                    best = row["val_loss"]
                    save_rule(rule, run_dir / RULE_FILE, {**meta, "trajectories": done, "val_loss": best})
            elif not s.val_every:
                save_rule(rule, run_dir / RULE_FILE, {**meta, "trajectories": done})
            _append_metrics(run_dir / METRICS, row)
            if on_log:
                on_log(row)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{row['loss']:.4g}", **({"val": f"{best:.4g}"} if best is not None else {}))
            budget_over = s.max_train_seconds and time.perf_counter() - start >= s.max_train_seconds
            if (s.checkpoint_every and done % s.checkpoint_every == 0) or stop.requested or budget_over:
                checkpoint()
            if stop.requested:
                stopped = True
                break
            if budget_over:
                break
    checkpoint()
    if stopped:
        raise RunInterrupted(f"interrupted: the run in {run_dir} is saved after trajectory {done} of "
                             f"{s.trajectories}; run the same command again to resume from there")
    return LoptResult(done, train_seconds, best, skipped)


# --- evaluation -------------------------------------------------------------------------------

BASELINES: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "momentum": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr, foreach=True),
}
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


def train_problem(problem: Problem, make_opt: Callable[[list[torch.Tensor]], torch.optim.Optimizer], steps: int,
                  generator: torch.Generator) -> dict[str, Any]:
    """Train ``problem`` for ``steps`` steps with a ``torch.optim`` optimizer: the loss at every step
    (before its update), wall time per whole step and per ``optimizer.step()``."""
    params = problem.fresh_params()
    opt = make_opt(list(params.values()))
    losses, step_times, opt_times = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(params, generator)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            losses.extend([math.inf] * (steps - len(losses)))
            break
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        opt_times.append(t2 - t1)
    return {"losses": losses, "step_ms": 1000 * median(step_times) if step_times else None,
            "opt_step_ms": 1000 * median(opt_times) if opt_times else None}


def _final(losses: list[float], tail: int) -> float:
    last = losses[-tail:]
    return sum(last) / len(last)


def _problem(name: str, seed: int, device: str, split: str, data_dir: str | None) -> tuple[Problem, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return make_problem(name, g, device, split, data_dir), g


def tune_learning_rate(name: str, optimizee: str, steps: int, seeds: int, device: str, data_dir: str | None,
                       grid: tuple[float, ...] = LR_GRID) -> tuple[float, dict[str, float]]:
    """The learning rate of baseline ``name`` with the lowest mean final loss (last 10 % of steps) on
    ``seeds`` tuning problems (training split, their own seeds); and the score of every rate."""
    tail = max(1, steps // 10)
    scores = {}
    for lr in grid:
        finals = []
        for i in range(seeds):
            problem, g = _problem(optimizee, TUNE_SEED + i, device, "train", data_dir)
            out = train_problem(problem, lambda p: BASELINES[name](p, lr), steps, g)
            finals.append(_final(out["losses"], tail))
        scores[f"{lr:g}"] = sum(finals) / len(finals) if all(map(math.isfinite, finals)) else math.inf
    best = min(scores, key=lambda k: scores[k])
    return float(best), scores


def _curve_stats(runs: list[list[float]]) -> dict[str, list[float]]:
    t = torch.tensor(runs, dtype=torch.float64)
    finite = torch.isfinite(t).all(0)
    mean = torch.where(finite, t.mean(0), torch.full_like(t[0], math.inf))
    std = torch.where(finite, t.std(0) if len(runs) > 1 else torch.zeros_like(t[0]), torch.zeros_like(t[0]))
    return {"mean": mean.tolist(), "std": std.tolist(), "min": t.min(0).values.tolist(), "max": t.max(0).values.tolist()}


def steps_to_target(curve: list[float], target: float, window: int = 5) -> int | None:
    """First step at which the moving mean (``window`` steps) of ``curve`` is at or below ``target``."""
    for i in range(window, len(curve) + 1):
        chunk = curve[i - window:i]
        if sum(chunk) / window <= target:
            return i
    return None


def evaluate_optimizers(rule_path: str | Path | None, optimizee: str, steps: int, seeds: int = 5,
                        baselines: tuple[str, ...] = tuple(BASELINES), tune_seeds: int = 2,
                        device: str = "cpu", data_dir: str | None = None, progress: bool = True,
                        learned_name: str = "learned") -> dict[str, Any]:
    """Loss curves of the learned rule (untuned, ``lr = 1``) and tuned baselines on ``seeds`` unseen
    problems of ``optimizee`` (test split; each optimizer sees the same initial parameters and the
    same minibatches), with final losses, steps to the tuned Adam's final loss, and cost per step."""
    if seeds < 1 or steps < 1:
        raise ConfigError("--seeds and --steps must be >= 1")
    for b in baselines:
        if b not in BASELINES:
            raise ConfigError(f"unknown baseline {b!r}; known: {', '.join(BASELINES)}")
    tail = max(1, steps // 10)
    optimizers: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {}
    tuning: dict[str, Any] = {}
    items = progress_bar(baselines, enabled=progress, total=len(baselines), desc="tuning baselines", unit="opt")
    for b in items:
        lr, scores = tune_learning_rate(b, optimizee, steps, tune_seeds, device, data_dir)
        tuning[b] = {"lr": lr, "scores": scores}
        optimizers[b] = (lambda name, rate: (lambda p: BASELINES[name](p, rate)))(b, lr)
    rule_meta: dict[str, Any] = {}
    if rule_path is not None:
        rule = load_rule(rule_path, device)
        rule_meta = {"path": resolved_rule_path(rule_path), "rule": rule.name, **rule.meta}
        optimizers = {learned_name: lambda p: LearnedOptimizer(p, rule), **optimizers}
    results: dict[str, Any] = {}
    for name, make in progress_bar(optimizers.items(), enabled=progress, total=len(optimizers),
                                   desc=f"evaluating on {optimizee}", unit="opt"):
        runs, step_ms, opt_ms = [], [], []
        for i in range(seeds):
            problem, g = _problem(optimizee, TEST_SEED + i, device, "test", data_dir)
            out = train_problem(problem, make, steps, g)
            runs.append(out["losses"])
            if out["step_ms"] is not None:
                step_ms.append(out["step_ms"])
                opt_ms.append(out["opt_step_ms"])
        finals = [_final(r, tail) for r in runs]
        finite = [f for f in finals if math.isfinite(f)]
        mean = sum(finals) / len(finals) if len(finite) == len(finals) else math.inf
        sd = (sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) ** 0.5 if len(finals) > 1 and finite == finals else 0.0
        results[name] = {"final_loss": mean, "final_loss_sd": sd, "finals": finals, "curve": _curve_stats(runs),
                         "step_ms": median(step_ms) if step_ms else None,
                         "opt_step_ms": median(opt_ms) if opt_ms else None,
                         **({"lr": tuning[name]["lr"]} if name in tuning else {"lr": 1.0, "tuned": False})}
    target_from = "adam" if "adam" in results else None
    target = results[target_from]["final_loss"] if target_from else None
    for r in results.values():
        r["steps_to_target"] = steps_to_target(r["curve"]["mean"], target) if target is not None else None
    return {"optimizee": optimizee, "steps": steps, "seeds": seeds, "tune_seeds": tune_seeds, "lr_grid": list(LR_GRID),
            "final_loss_over_last_steps": tail, "target": {"from": target_from, "loss": target},
            "learned": rule_meta, "tuning": tuning, "results": results, "cost_context": cost_context()}


def format_table(summary: dict[str, Any]) -> str:
    """A markdown table of an :func:`evaluate_optimizers` summary."""
    lines = [f"{summary['optimizee']}, {summary['steps']} steps, {summary['seeds']} seeds "
             f"(final loss: mean of the last {summary['final_loss_over_last_steps']} steps; target: tuned Adam's)",
             "", "| optimizer | lr | final loss | steps to target | ms / step | ms / optimizer step |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in summary["results"].items():
        lr = f"{r['lr']:g}" + ("" if r.get("tuned", True) else " (untuned)")
        stt = "-" if r["steps_to_target"] is None else str(r["steps_to_target"])
        ms = "-" if r["step_ms"] is None else f"{r['step_ms']:.2f}"
        oms = "-" if r["opt_step_ms"] is None else f"{r['opt_step_ms']:.3f}"
        lines.append(f"| {name} | {lr} | {r['final_loss']:.4g} ± {r['final_loss_sd']:.2g} | {stt} | {ms} | {oms} |")
    return "\n".join(lines)


def plot_curves(summary: dict[str, Any], path: str | Path) -> None:
    """Mean loss against steps per optimizer, with a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in summary["results"].items():
        c = r["curve"]
        x = list(range(len(c["mean"])))
        label = f"{name} (lr {r['lr']:g})" if r.get("tuned", True) else f"{name} (untuned)"
        line, = ax.plot(x, c["mean"], label=label, lw=2 if not r.get("tuned", True) else 1.2)
        ax.fill_between(x, c["min"], c["max"], color=line.get_color(), alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    ax.set_title(f"{summary['optimizee']}: mean of {summary['seeds']} unseen problems (band: min-max)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def read_lopt_config(run_dir: Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of a ``lopt train`` run folder (a clear error when it is unreadable), or
    ``None`` when there is none."""
    if not (run_dir / "config.yaml").is_file():
        return None
    return read_run_config(run_dir, required=("optimizer", "optimizee"))
