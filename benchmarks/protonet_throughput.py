"""ProtoNet training throughput on the CPU: fastadapt side by side with a plain PyTorch loop.

Both train the same Conv-4 Prototypical Network (same initial weights, same math) on 60-way
5-shot 5-query episodes. The plain loop is written the way reference code usually is: NCHW
tensors, support and query concatenated into one forward pass, distances by broadcasting
``(x[:, None] - p[None]) ** 2``, and it is handed pre-sampled episodes (it does no sampling work).
fastadapt's path is the real one: sampling from the uint8 pool, ``ProtoNet.train_step`` (Conv-4's
fused BatchNorm/ReLU/max-pool blocks), in four settings: channels-last and NCHW
(``--memory-format``), each with the blocks in their native kernels (``fastadapt.models.native``;
channels-last with them is the CPU default for ProtoNet) and in PyTorch operations
(``fastadapt.models.native.ENABLED = False``, what runs where no C compiler builds the kernels).
Steps alternate between the five so that machine noise hits all alike; medians are reported.

Run twice, in child processes, under glibc's default allocator and with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised to 4 GiB (peers compared under the
same setting each time):

    python benchmarks/protonet_throughput.py [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import task_data_config
from fastadapt.data import build_task_source
from fastadapt.measure.stats import median
from fastadapt.methods.protonet import ProtoNet
from fastadapt.models import Conv4, native
from fastadapt.models.conv4 import apply_memory_format, use_memory_format

WAYS, SHOTS, QUERIES = 60, 5, 5
TUNED = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def plain_conv4() -> nn.Sequential:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 64), block(64, 64), block(64, 64), block(64, 64), nn.Flatten())


def plain_loss(model: nn.Module, xs: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    n, k, q = WAYS, SHOTS, QUERIES
    z = model(torch.cat([xs, xq], 0))
    proto = z[: n * k].view(n, k, -1).mean(1)
    zq = z[n * k:]
    dists = (zq[:, None, :] - proto[None, :, :]).pow(2).sum(2)
    target = torch.arange(n).repeat_interleave(q)
    return F.cross_entropy(-dists, target)


def child(args: argparse.Namespace) -> dict:
    cfg = task_data_config(args.data_dir)
    source = build_task_source(cfg, "train", WAYS, SHOTS, QUERIES)
    torch.manual_seed(0)
    ours = ProtoNet(Conv4())
    plain = plain_conv4()
    plain.load_state_dict({k.replace("encoder.", ""): v for k, v in ours.backbone.state_dict().items()})
    default = apply_memory_format(ours, "auto", "cpu")  # what `fastadapt train protonet` decides here
    learners = {}
    for name, layout in (("channels_last", "channels_last"), ("channels_last_torch_ops", "channels_last"),
                         ("nchw", "nchw"), ("nchw_torch_ops", "nchw")):
        learners[name] = copy.deepcopy(ours)
        use_memory_format(learners[name], layout)
    opts = {k: torch.optim.Adam(m.parameters(), 1e-3) for k, m in learners.items()}
    opt_plain = torch.optim.Adam(plain.parameters(), 1e-3)

    # Same math: identical weights give the same loss on the same episode.
    gen = torch.Generator().manual_seed(1)
    ep = source.sample(gen)
    with torch.no_grad():
        l_ours = float(ours.meta_loss(source.sample_batch(torch.Generator().manual_seed(1), 1))[0])
        l_plain = float(plain_loss(plain, ep.support_x, ep.query_x))
    pre = [source.sample(gen) for _ in range(8)]

    times = {k: [] for k in (*learners, "plain")}
    for step in range(args.steps + 2):
        for name, learner in learners.items():
            native.ENABLED = not name.endswith("_torch_ops")
            try:
                t = time.perf_counter()
                learner.train_step(source.sample_batch(gen, 1), opts[name])
                took = time.perf_counter() - t
            finally:
                native.ENABLED = True
            if step >= 2:  # warm-up
                times[name].append(took)
        e = pre[step % len(pre)]
        t = time.perf_counter()
        opt_plain.zero_grad()
        plain_loss(plain, e.support_x, e.query_x).backward()
        opt_plain.step()
        if step >= 2:
            times["plain"].append(time.perf_counter() - t)
    res = {"loss_fastadapt": l_ours, "loss_plain": l_plain, "dataset": cfg["dataset"], "default_layout": default,
           "native_kernels": native.library() is not None, "threads": torch.get_num_threads(),
           "ms_per_episode_plain": 1e3 * median(times["plain"])}
    for name in learners:
        res[f"ms_per_episode_fastadapt_{name}"] = 1e3 * median(times[name])
        res[f"speedup_{name}"] = median(times["plain"]) / median(times[name])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data-dir", default="../shared/data/omniglot")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    from _common import save

    out = {}
    for name, extra in (("glibc_default", {}), ("malloc_thresholds_4GiB", TUNED)):
        env = {k: v for k, v in os.environ.items() if k not in TUNED}
        env.update(extra)
        res = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps),
                              "--data-dir", args.data_dir], env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
        r = out[name]
        print(f"{name}: plain {r['ms_per_episode_plain']:.0f} ms/episode; fastadapt "
              + ", ".join(f"{k.replace('_', ' ')} {r[f'ms_per_episode_fastadapt_{k}']:.0f} ({r[f'speedup_{k}']:.2f}x)"
                          for k in ("channels_last", "channels_last_torch_ops", "nchw", "nchw_torch_ops"))
              + f"; default layout {r['default_layout']} (native kernels: {r['native_kernels']}); losses "
              f"{r['loss_fastadapt']:.4f} vs {r['loss_plain']:.4f}")
    save("protonet_throughput", {"episode": f"{WAYS}-way {SHOTS}-shot {QUERIES}-query", "steps": args.steps,
                                 "statistic": "median seconds per training episode, alternating steps",
                                 "results": out})


if __name__ == "__main__":
    main()
