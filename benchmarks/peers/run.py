"""fastadapt side by side with the libraries users would pick instead: learn2learn, higher, easyfsl.

Run inside the environment that ``setup_env.sh`` builds (it prints the exact command):

    bash benchmarks/peers/setup_env.sh
    ~/.cache/fastadapt/peers-venv/bin/python benchmarks/peers/run.py --reps 5
    ~/.cache/fastadapt/peers-venv/bin/python benchmarks/peers/run.py --quick   # a short check

In one process, on the same data (the Omniglot training split when ``--data-dir`` holds it, else
fastadapt's built-in glyphs), the same Conv-4 and the same initial weights copied into each
implementation, with the implementations taking turns so that machine noise hits all alike:

1. MAML 5-way 1-shot, 15 queries per class, meta-batch 32, one inner SGD step of 0.4, second and
   first order. fastadapt (``MAML``/``FOMAML``, tasks as a loop and under ``vmap``), higher
   (``innerloop_ctx``), learn2learn (``algorithms.MAML``: ``clone``/``adapt``) and the plain
   per-task ``torch.autograd.grad`` loop of ``maml_speed.py``. Seconds per meta-step (meta-gradient
   and an Adam step), and the difference of each meta-gradient to fastadapt's (loop) on the same
   batch from the same weights in float32, and on its first ``--check-tasks`` tasks in float64
   (where rounding no longer hides a difference in the math), with each float32 gradient's error
   against the float64 one there.
2. ProtoNet 60-way 5-shot 5-query episodes (as ``protonet_throughput.py``): fastadapt's ``ProtoNet``
   (in its CPU default layout, channels-last with fused Conv-4 blocks),
   easyfsl's ``PrototypicalNetworks`` and learn2learn's ``nn.PrototypicalClassifier`` on the same
   backbone; seconds per training step (forward, backward, Adam step) on the same pre-drawn
   episodes, and the loss of each on the first episode.
3. Task sampling, episodes per second from the same class pool: fastadapt's ``EpisodeSampler``,
   learn2learn's ``TaskDataset`` (``NWays``, ``KShots``, ``LoadData``, ``RemapLabels`` over a
   ``MetaDataset``, split with ``partition_task``), easyfsl's ``TaskSampler`` in a ``DataLoader``.

Peak memory of each implementation comes from a child process of its own (same environment, same
data, same imports): the peak resident size over its first ``--memory-steps`` steps, and what that
adds to the resident size before them. In one shared process the allocator keeps the pages of
whichever implementation ran first, which would hide the others' peaks.

Writes ``benchmarks/results/peers.json`` (``--out`` to change the name) and prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# This checkout's fastadapt and benchmark helpers, whatever the venv's editable install points to.
sys.path[:0] = [str(REPO / "src"), str(REPO / "benchmarks"), str(HERE)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import peer_imports  # noqa: E402
from _common import rss_mb, save, task_data_config  # noqa: E402
from maml_speed import plain_maml_grads  # noqa: E402

from fastadapt.data import build_task_source  # noqa: E402
from fastadapt.measure.memory import PeakMemory  # noqa: E402
from fastadapt.measure.stats import median  # noqa: E402
from fastadapt.methods import FOMAML, MAML, ProtoNet  # noqa: E402
from fastadapt.models import Conv4  # noqa: E402
from fastadapt.models.conv4 import apply_memory_format  # noqa: E402
from fastadapt.tasks import Episode, EpisodeSampler  # noqa: E402

INNER_LR, META_LR = 0.4, 1e-3
MAML_SHAPE = (5, 1, 15)  # ways, shots, queries per class
PROTO_SHAPE = (60, 5, 5)
SAMPLING_SHAPES = ((5, 1, 15), (60, 5, 5))
ORDERS = {"second_order": False, "first_order": True}

Step = Callable[[], Any]


# ------------------------------------------------------------------------------- the same model
def peer_conv4(ways: int | None, track_running_stats: bool = True) -> nn.Sequential:
    """Conv-4 (and a linear head when ``ways``) as the peers' examples build it: plain ``nn``
    layers, NCHW. Its parameters come in the order of fastadapt's ``Conv4`` (+ head)."""
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o, track_running_stats=track_running_stats),
                             nn.ReLU(), nn.MaxPool2d(2))

    layers: list[nn.Module] = [block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten()]
    if ways:
        layers.append(nn.Linear(64, ways))
    return nn.Sequential(*layers)


def copy_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Copy ``src``'s parameters into ``dst`` by position (the two list them in the same order)."""
    a, b = list(src.parameters()), list(dst.parameters())
    if [p.shape for p in a] != [p.shape for p in b]:
        raise RuntimeError("the peer model does not have fastadapt's parameter shapes")
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    return dst


# ------------------------------------------------------------------------------- 1. MAML
def maml_implementations(base: MAML, batch: Episode, first_order: bool, higher, l2l) -> dict[str, tuple[Step, Step]]:
    """name -> (meta-gradient only, full meta-step with Adam), each implementation on its own copy
    of ``base``'s weights. The meta-gradient function returns the gradients in fastadapt's order."""
    n = batch.num_tasks
    impls: dict[str, tuple[Step, Step]] = {}

    def with_adam(params: list[torch.Tensor], grad: Step) -> tuple[Step, Step]:
        opt = torch.optim.Adam(params, META_LR)
        return grad, lambda: (grad(), opt.step())

    for mode in ("loop", "vmap"):
        learner = (FOMAML if first_order else MAML)(copy.deepcopy(base.model), inner_steps=1, inner_lr=INNER_LR,
                                                    first_order=first_order, batching=mode)

        def ours(learner=learner, mode=mode):
            learner._backward(batch, mode, 0)
            return [p.grad for p in learner.model.parameters()]

        impls[f"fastadapt ({mode})"] = with_adam(list(learner.parameters()), ours)

    # higher: the pattern of its MAML example, backward per task inside the context.
    h_model = copy_weights(base.model, peer_conv4(5, track_running_stats=False).to(batch.support_x.dtype))
    h_inner = torch.optim.SGD(h_model.parameters(), lr=INNER_LR)

    def run_higher():
        h_model.zero_grad(set_to_none=True)
        for i in range(n):
            with higher.innerloop_ctx(h_model, h_inner, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fmodel, diffopt):
                diffopt.step(F.cross_entropy(fmodel(batch.support_x[i]), batch.support_y[i]))
                loss = F.cross_entropy(fmodel(batch.query_x[i]), batch.query_y[i]) / n
                if first_order:  # the fast weights are detached: their gradient is the FOMAML one
                    grads = torch.autograd.grad(loss, list(fmodel.parameters()))
                    for p, g in zip(h_model.parameters(), grads):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    loss.backward()
        return [p.grad for p in h_model.parameters()]

    impls["higher"] = with_adam(list(h_model.parameters()), run_higher)

    # learn2learn: clone, adapt, evaluate, as in its MAML examples.
    l_model = copy_weights(base.model, peer_conv4(5, track_running_stats=False).to(batch.support_x.dtype))
    l_maml = l2l.MAML(l_model, lr=INNER_LR, first_order=first_order)

    def run_l2l():
        l_maml.zero_grad(set_to_none=True)
        for i in range(n):
            learner = l_maml.clone()
            learner.adapt(F.cross_entropy(learner(batch.support_x[i]), batch.support_y[i]))
            (F.cross_entropy(learner(batch.query_x[i]), batch.query_y[i]) / n).backward()
        return [p.grad for p in l_model.parameters()]

    impls["learn2learn"] = with_adam(list(l_maml.parameters()), run_l2l)

    # The plain loop of maml_speed.py: all tasks' graphs, one backward. Weights in NCHW layout,
    # like the other peers' (cloned explicitly: ``.contiguous()`` would keep a channels-last first
    # convolution, whose single input channel makes it count as both).
    plain = [p.detach().clone(memory_format=torch.contiguous_format).requires_grad_() for p in base.model.parameters()]

    def run_plain():
        for p in plain:
            p.grad = None
        return plain_maml_grads(plain, batch, INNER_LR, 1, first_order=first_order)

    impls["plain PyTorch"] = with_adam(plain, run_plain)
    return impls


def grad_difference(grads: list[torch.Tensor], ref: list[torch.Tensor], skip: set[int]) -> dict[str, float]:
    """``|g - g_ref| / |g_ref|`` of the whole gradient vector, and the largest such ratio over the
    parameter tensors other than those in ``skip``."""
    num = [float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(grads, ref)]
    den = [float((b.double() ** 2).sum()) for b in ref]
    return {"whole": (sum(num) / sum(den)) ** 0.5,
            "max_tensor": max((num[i] / den[i]) ** 0.5 for i in range(len(ref)) if i not in skip)}


def biases_before_batchnorm(model: nn.Module) -> set[int]:
    """Positions (in ``model.parameters()``) of the convolution biases of Conv-4: BatchNorm removes
    them, so their exact gradient is zero and a computed one is rounding noise (no relative error)."""
    names = [n for n, _ in model.named_parameters()]
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    return {i for i, n in enumerate(names) if n.endswith(".bias") and n[: -len(".bias")] in convs}


def check_maml_grads(base: MAML, batch: Episode, first_order: bool, check_tasks: int, higher, l2l) -> dict:
    """Each implementation's meta-gradient from ``base``'s weights compared with fastadapt's (loop):
    on the whole ``batch`` in float32, and on its first ``check_tasks`` tasks in float64 (float64
    convolutions are slow on the CPU), where each float32 gradient's error against fastadapt's
    float64 one is measured too (as good as exact: the float64 gradients agree to ~1e-14)."""
    sub = Episode(batch.support_x[:check_tasks], batch.support_y[:check_tasks], batch.query_x[:check_tasks],
                  batch.query_y[:check_tasks])
    sub64 = Episode(sub.support_x.double(), sub.support_y, sub.query_x.double(), sub.query_y)
    skip = biases_before_batchnorm(base.model)
    grads = {}
    for tag, b, dtype in (("float32", batch, torch.float32), ("float32_subset", sub, torch.float32),
                          ("float64_subset", sub64, torch.float64)):
        impls = maml_implementations(copy.deepcopy(base).to(dtype), b, first_order, higher, l2l)
        grads[tag] = {k: [g.detach().clone() for g in grad()] for k, (grad, _) in impls.items()}
    ref = {tag: g["fastadapt (loop)"] for tag, g in grads.items()}
    out: dict[str, dict[str, float]] = {}
    for k in grads["float32"]:
        d32 = grad_difference(grads["float32"][k], ref["float32"], skip)
        d64 = grad_difference(grads["float64_subset"][k], ref["float64_subset"], skip)
        err = grad_difference(grads["float32_subset"][k], ref["float64_subset"], skip)
        out[k] = {"float32_whole": d32["whole"], "float32_max_tensor": d32["max_tensor"],
                  "float64_whole": d64["whole"], "float64_max_tensor": d64["max_tensor"],
                  "float32_error_vs_float64_whole": err["whole"]}
    out["fastadapt (loop)"]["grad_norm"] = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref["float32"])))
    return out


# ------------------------------------------------------------------------------- 2. ProtoNet
def protonet_implementations(episodes: list[Episode], easy, l2l) -> tuple[dict[str, Step], dict[str, float]]:
    """name -> one training step (on the next pre-drawn episode), and each implementation's loss
    on ``episodes[0]`` from the shared initial weights."""
    torch.manual_seed(0)
    ours = ProtoNet(Conv4())
    apply_memory_format(ours, "auto", "cpu")  # ProtoNet's CPU default (fused blocks; see decide_memory_format)
    efs = easy.PrototypicalNetworks(copy_weights(ours.backbone, peer_conv4(None)))
    l_backbone = copy_weights(ours.backbone, peer_conv4(None))
    batches = [Episode.stack([e]) for e in episodes]
    state = {"ours": 0, "easyfsl": 0, "l2l": 0}

    def next_episode(key: str) -> int:
        i = state[key]
        state[key] = (i + 1) % len(episodes)
        return i

    def easyfsl_loss(e: Episode) -> torch.Tensor:
        efs.process_support_set(e.support_x, e.support_y)
        return F.cross_entropy(efs(e.query_x), e.query_y)

    def l2l_loss(e: Episode) -> torch.Tensor:
        z = l_backbone(torch.cat([e.support_x, e.query_x]))
        ns = len(e.support_y)
        clf = l2l.PrototypicalClassifier(support=z[:ns], labels=e.support_y)
        return F.cross_entropy(clf(z[ns:]), e.query_y)

    def same_as_easyfsl(e: Episode) -> torch.Tensor:
        """easyfsl's formula on fastadapt's backbone: support and query in separate forward
        passes, Euclidean (not squared) distances."""
        zs, zq = ours.backbone(e.support_x), ours.backbone(e.query_x)
        protos = torch.stack([zs[e.support_y == c].mean(0) for c in range(int(e.support_y.max()) + 1)])
        return F.cross_entropy(-torch.cdist(zq, protos), e.query_y)

    with torch.no_grad():  # before any step: the same weights everywhere
        losses = {"fastadapt": float(ours.meta_loss(batches[0])[0]), "easyfsl": float(easyfsl_loss(episodes[0])),
                  "learn2learn": float(l2l_loss(episodes[0])),
                  "fastadapt backbone, easyfsl formula": float(same_as_easyfsl(episodes[0]))}

    opts = {k: torch.optim.Adam(m.parameters(), META_LR) for k, m in (("ours", ours), ("easyfsl", efs),
                                                                       ("l2l", l_backbone))}

    def step(key: str, loss_fn: Callable[[Episode], torch.Tensor]) -> Step:
        def run():
            opts[key].zero_grad(set_to_none=True)
            loss_fn(episodes[next_episode(key)]).backward()
            opts[key].step()
        return run

    impls = {"fastadapt": lambda: ours.train_step(batches[next_episode("ours")], opts["ours"]),
             "easyfsl": step("easyfsl", easyfsl_loss), "learn2learn": step("l2l", l2l_loss)}
    return impls, losses


# ------------------------------------------------------------------------------- 3. sampling
class PoolImages(torch.utils.data.Dataset):
    """The images of a fastadapt ``ClassPool`` one by one, as ``float32`` in [0, 1] with their class:
    the map-style dataset both peers sample from."""

    def __init__(self, pool) -> None:
        self.images = pool.images
        self.labels = torch.repeat_interleave(torch.arange(pool.num_classes), pool.counts).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255.0), self.labels[i]

    def get_labels(self) -> list[int]:  # easyfsl's FewShotDataset interface
        return self.labels


def sampler_implementations(pool, ways: int, shots: int, queries: int, easy, l2l) -> dict[str, Step]:
    """name -> draw one episode as support/query images and labels."""
    ours = EpisodeSampler(pool, ways, shots, queries)
    gen = torch.Generator().manual_seed(0)
    dataset = PoolImages(pool)
    offsets, counts = pool.offsets.tolist(), pool.counts.tolist()
    meta = l2l.MetaDataset(dataset, labels_to_indices={c: list(range(o, o + n))
                                                       for c, (o, n) in enumerate(zip(offsets, counts))})
    t = l2l.transforms
    taskset = l2l.TaskDataset(meta, [t.NWays(meta, ways), t.KShots(meta, shots + queries), t.LoadData(meta),
                                     t.RemapLabels(meta)], num_tasks=-1)

    class EasyPoolImages(PoolImages, easy.FewShotDataset):
        pass

    easy_dataset = EasyPoolImages(pool)
    sampler = easy.make_task_sampler(easy_dataset, n_way=ways, n_shot=shots, n_query=queries, n_tasks=10**9)
    loader = torch.utils.data.DataLoader(easy_dataset, batch_sampler=sampler, collate_fn=sampler.episodic_collate_fn)
    easy_iter = iter(loader)
    return {"fastadapt": lambda: ours.sample(gen),
            "learn2learn": lambda: l2l.partition_task(*taskset.sample(), shots=shots),
            "easyfsl": lambda: next(easy_iter)}


# ------------------------------------------------------------------------------- timing
def take_turns(impls: dict[str, Step], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call, the implementations in turn (after ``warmup`` untimed rounds)."""
    times: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(warmup + reps):
        for k, f in impls.items():
            t0 = time.perf_counter()
            f()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def rate(draw: Step, seconds: float) -> float:
    """Episodes per second over at least ``seconds`` (and at least 3 episodes)."""
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        draw()
        n += 1
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------- set-up
def load_pool(data_dir: str):
    cfg = task_data_config(data_dir)
    source = build_task_source(cfg, "train", *MAML_SHAPE)
    return source.pool, cfg["dataset"]


def maml_batch(pool, meta_batch: int) -> Episode:
    return EpisodeSampler(pool, *MAML_SHAPE).sample_batch(torch.Generator().manual_seed(0), meta_batch)


def maml_base() -> MAML:
    torch.manual_seed(0)
    return MAML.from_config({"ways": MAML_SHAPE[0], "inner_steps": 1, "inner_lr": INNER_LR}, (1, 28, 28))


def proto_episodes(pool, count: int) -> list[Episode]:
    src = EpisodeSampler(pool, *PROTO_SHAPE)
    gen = torch.Generator().manual_seed(1)
    return [src.sample(gen) for _ in range(count)]


def peers() -> dict[str, Any]:
    return {"higher": peer_imports.higher(), "learn2learn": peer_imports.learn2learn(),
            "easyfsl": peer_imports.easyfsl()}


def memory_child(args: argparse.Namespace) -> dict:
    """Peak memory of one implementation (``--memory-of PART/NAME``), in this fresh process."""
    part, name = args.memory_of.split("/", 1)
    pool, _ = load_pool(args.data_dir)
    p = peers()
    if part in ORDERS:
        impls = maml_implementations(maml_base(), maml_batch(pool, args.meta_batch), ORDERS[part],
                                     p["higher"], p["learn2learn"])
        step = impls[name][1]
    else:
        step = protonet_implementations(proto_episodes(pool, 4), p["easyfsl"], p["learn2learn"])[0][name]
    before = rss_mb("VmRSS")
    with PeakMemory("cpu") as pm:
        for _ in range(args.memory_steps):
            step()
    return {"peak_rss_mb": pm.peak_mb, "added_mb": pm.peak_mb - before, "measure": pm.kind,
            "steps": args.memory_steps}


def measure_memory(args: argparse.Namespace, part: str, name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-of", f"{part}/{name}",
           "--data-dir", args.data_dir, "--meta-batch", str(args.meta_batch), "--threads", str(args.threads),
           "--memory-steps", str(args.memory_steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- tables
def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or x != x else (f"{x:.{digits}e}" if abs(x) < 1e-2 and x != 0 else f"{x:.{digits}f}")


def timing_cells(name: str, row: dict, base: float) -> str:
    """The first cells of a table row: name, seconds, ratio to fastadapt, peak memory."""
    mem = row.get("memory", {})
    m = f"{mem['peak_rss_mb']:.0f} (+{mem['added_mb']:.0f})" if "peak_rss_mb" in mem else "n/a"
    return f"| {name} | {row['seconds']:.3f} | {row['seconds'] / base:.2f}x | {m} |"


def tables(result: dict) -> str:
    lines = []
    load = result.get("load_avg_at_start")
    for part, title in (("second_order", "MAML second order"), ("first_order", "MAML first order")):
        rows = result["maml"].get(part)
        if not rows:
            continue
        s = result["setup"]["maml"]
        lines += [f"\n{title}, {s['ways']}-way {s['shots']}-shot {s['queries']} queries, meta-batch {s['meta_batch']} "
                  f"(load average at start {load}):\n",
                  "| implementation | s / meta-step | time vs fastadapt (loop) | peak RSS MB (+added) | grad diff to "
                  "fastadapt, float32: whole (max tensor) | same, float64 | float32 grad error vs float64 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        base = rows["fastadapt (loop)"]["seconds"]
        for k, r in rows.items():
            g = r["grad_diff"]
            lines.append(timing_cells(k, r, base) + f" {fmt(g['float32_whole'])} ({fmt(g['float32_max_tensor'])}) | "
                         f"{fmt(g['float64_whole'])} ({fmt(g['float64_max_tensor'])}) | "
                         f"{fmt(g['float32_error_vs_float64_whole'])} |")
    pr = result.get("protonet")
    if pr:
        s = result["setup"]["protonet"]
        lines += [f"\nProtoNet training step, {s['ways']}-way {s['shots']}-shot {s['queries']}-query:\n",
                  "| implementation | s / step | time vs fastadapt | peak RSS MB (+added) | loss on episode 0 |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        base = pr["fastadapt"]["seconds"]
        for k, r in pr.items():
            lines.append(timing_cells(k, r, base) + f" {r['loss']:.5f} |")
    sp = result.get("sampling")
    if sp:
        names = list(next(iter(sp.values())))
        lines += ["\nTask sampling, episodes per second (same pool):\n",
                  "| episode | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        for shape, r in sp.items():
            lines.append(f"| {shape} | " + " | ".join(f"{r[k]:,.0f}" for k in names) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5, help="timed MAML meta-steps per implementation (medians)")
    ap.add_argument("--proto-reps", type=int, default=None, help="timed ProtoNet steps (default 4 x --reps)")
    ap.add_argument("--sampling-seconds", type=float, default=2.0, help="seconds per sampling measurement")
    ap.add_argument("--meta-batch", type=int, default=32)
    ap.add_argument("--check-tasks", type=int, default=4, help="tasks of the float64 gradient check")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="maml,protonet,sampling")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    ap.add_argument("--out", default="peers", help="name of the result file in benchmarks/results")
    ap.add_argument("--quick", action="store_true",
                    help="a short check: meta-batch 4, 1 rep, 0.2 s per sampling measurement, no result file")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.meta_batch, args.check_tasks, args.sampling_seconds = 1, 4, 2, 0.2
    if args.memory_of:
        print(json.dumps(memory_child(args)))
        return
    parts = args.parts.split(",")
    proto_reps = args.proto_reps or 4 * args.reps
    p = peers()
    pool, dataset = load_pool(args.data_dir)
    print(f"data: {dataset} train split, {pool.num_classes} classes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; higher {p['higher'].version}, learn2learn {p['learn2learn'].version} "
          f"(compiled data modules: {p['learn2learn'].compiled}), easyfsl {p['easyfsl'].version}", flush=True)
    result: dict[str, Any] = {
        "setup": {
            "dataset": dataset, "split": "train", "threads": torch.get_num_threads(), "reps": args.reps,
            "statistic": "median seconds per step; implementations take turns after one untimed round",
            "maml": dict(zip(("ways", "shots", "queries"), MAML_SHAPE), meta_batch=args.meta_batch, inner_steps=1,
                         inner_lr=INNER_LR, meta_optimizer=f"Adam {META_LR}", backbone="conv4 28x28 + linear head",
                         batchnorm="batch statistics (fastadapt BatchStatNorm; peers BatchNorm2d without running "
                                   "statistics, as learn2learn's Omniglot CNN)",
                         grad_check="|g - g_fastadapt(loop)| / |g_fastadapt(loop)| from the same weights, whole "
                                    "gradient vector and largest over parameter tensors (conv biases excluded: "
                                    "BatchNorm removes them, their exact gradient is 0): float32 on the timed batch, "
                                    f"float64 on its first {args.check_tasks} tasks; float32_error_vs_float64: "
                                    "float32 gradient against fastadapt's float64 one on those tasks"),
            "protonet": dict(zip(("ways", "shots", "queries"), PROTO_SHAPE), reps=proto_reps, optimizer=f"Adam {META_LR}",
                             episodes="8 pre-drawn episodes in turn (sampling not timed)"),
            "sampling": {"seconds_per_measurement": args.sampling_seconds, "measurements": args.reps},
            "memory": "peak resident set size (VmHWM) in a child process per implementation over its first "
                      f"{args.memory_steps} steps; added: minus the resident size before them",
        },
        "versions": {"torch": torch.__version__, "higher": p["higher"].version,
                     "learn2learn": p["learn2learn"].version, "easyfsl": p["easyfsl"].version},
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "maml": {},
    }

    if "maml" in parts:
        batch = maml_batch(pool, args.meta_batch)
        base = maml_base()
        for part, first_order in ORDERS.items():
            t0 = time.perf_counter()
            grads = check_maml_grads(base, batch, first_order, args.check_tasks, p["higher"], p["learn2learn"])
            print(f"{part}: gradients compared ({time.perf_counter() - t0:.0f} s)", flush=True)
            impls = maml_implementations(base, batch, first_order, p["higher"], p["learn2learn"])
            times = take_turns({k: v[1] for k, v in impls.items()}, args.reps)
            rows = {}
            for k in impls:
                rows[k] = {"seconds": median(times[k]), "all_seconds": times[k], "grad_diff": grads[k]}
                if not args.no_memory:
                    rows[k]["memory"] = measure_memory(args, part, k)
                print(f"{part} {k}: {rows[k]['seconds']:.3f} s/meta-step, grad diff {grads[k]}, "
                      f"memory {rows[k].get('memory')}", flush=True)
            result["maml"][part] = rows

    if "protonet" in parts:
        impls, losses = protonet_implementations(proto_episodes(pool, 8), p["easyfsl"], p["learn2learn"])
        times = take_turns(impls, proto_reps, warmup=2)
        rows = {}
        for k in impls:
            rows[k] = {"seconds": median(times[k]), "all_seconds": times[k], "loss": losses[k]}
            if not args.no_memory:
                rows[k]["memory"] = measure_memory(args, "protonet", k)
            print(f"protonet {k}: {rows[k]['seconds']:.3f} s/step, loss {losses[k]:.5f}, memory {rows[k].get('memory')}",
                  flush=True)
        result["protonet"] = rows
        result["protonet_loss_check"] = {
            "fastadapt backbone, easyfsl formula": losses["fastadapt backbone, easyfsl formula"],
            "note": "easyfsl embeds support and query in separate forward passes (BatchNorm statistics of each set) "
                    "and uses Euclidean distances, not squared ones; the same formula on fastadapt's backbone "
                    "gives easyfsl's loss"}

    if "sampling" in parts:
        result["sampling"] = {}
        for ways, shots, queries in SAMPLING_SHAPES:
            draws = sampler_implementations(pool, ways, shots, queries, p["easyfsl"], p["learn2learn"])
            rates: dict[str, list[float]] = {k: [] for k in draws}
            for k, f in draws.items():  # warm-up
                rate(f, 0.05)
            for _ in range(args.reps):
                for k, f in draws.items():
                    rates[k].append(rate(f, args.sampling_seconds))
            key = f"{ways}w{shots}s{queries}q"
            result["sampling"][key] = {k: median(v) for k, v in rates.items()}
            result["sampling"][key + "_all"] = rates
            print(f"sampling {key}: " + ", ".join(f"{k} {median(v):,.0f}/s" for k, v in rates.items()),
                  flush=True)

    summary = {**result, "sampling": {k: v for k, v in result.get("sampling", {}).items() if not k.endswith("_all")}}
    table = tables(summary)
    result["markdown"] = table
    print(table)
    if args.quick:
        print("(--quick: no result file written)")
    else:
        save(args.out, result)


if __name__ == "__main__":
    main()
