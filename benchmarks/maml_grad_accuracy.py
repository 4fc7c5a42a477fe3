"""How exact are the float32 MAML meta-gradients through BatchNorm, per implementation?

Second-order MAML (5-way 1-shot, 5 queries per class, 1 inner step of 0.4, Conv-4 with
batch-statistics BatchNorm) on a meta-batch of random images. The reference is the plain per-task
``torch.autograd.grad`` loop of ``maml_speed.py`` in float64. Reported: the relative error
``|g - g_ref| / |g_ref|`` of the whole gradient vector for the plain loop in float32 and for
fastadapt's loop, grouped and vmap paths in float32 and float64. (fastadapt's loop and grouped
paths call the fused batch-norm kernel, like the plain loop; under vmap it uses plain tensor ops,
which vmap batches exactly.)

    python benchmarks/maml_grad_accuracy.py --tasks 8
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from maml_speed import plain_maml_grads


def main() -> None:
    from _common import save
    from fastadapt.methods import MAML
    from fastadapt.tasks import Episode

    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    t = args.tasks
    g = torch.Generator().manual_seed(0)
    b32 = Episode(torch.rand(t, 5, 1, 28, 28, generator=g), torch.arange(5).repeat(t, 1),
                  torch.rand(t, 25, 1, 28, 28, generator=g), torch.arange(5).repeat_interleave(5).repeat(t, 1))
    b64 = Episode(b32.support_x.double(), b32.support_y, b32.query_x.double(), b32.query_y)
    learner = MAML.from_config({"ways": 5, "inner_steps": 1, "inner_lr": 0.4}, (1, 28, 28))
    learner64 = copy.deepcopy(learner).double()

    def ours(lrn, b, mode):
        lrn._backward(b, mode, 0)
        return [p.grad.detach().clone().double() for p in lrn.model.parameters()]

    def plain(b, dtype):
        # NCHW tensors, whatever layout fastadapt's Conv-4 runs in (``.contiguous()`` would keep a
        # channels-last first-convolution weight, one input channel, in that layout).
        params = [p.detach().clone(memory_format=torch.contiguous_format).to(dtype).requires_grad_()
                  for p in learner.model.parameters()]
        return [x.double() for x in plain_maml_grads(params, b, 0.4, 1)]

    def rel(a, ref):
        num = sum(float(((x - y) ** 2).sum()) for x, y in zip(a, ref)) ** 0.5
        return num / sum(float((y ** 2).sum()) for y in ref) ** 0.5

    ref = plain(b64, torch.float64)
    errors = {
        "plain float32": rel(plain(b32, torch.float32), ref),
        "fastadapt loop float32": rel(ours(learner, b32, "loop"), ref),
        "fastadapt grouped float32": rel(ours(learner, b32, "grouped"), ref),
        "fastadapt vmap float32": rel(ours(learner, b32, "vmap"), ref),
        "fastadapt loop float64": rel(ours(learner64, b64, "loop"), ref),
        "fastadapt grouped float64": rel(ours(learner64, b64, "grouped"), ref),
        "fastadapt vmap float64": rel(ours(learner64, b64, "vmap"), ref),
    }
    for k, v in errors.items():
        print(f"{k:26s} relative error {v:.2e}")
    save("maml_grad_accuracy", {"budget": "one meta-batch", "setup": {"tasks": t, "ways": 5, "shots": 1,
                                                                        "queries_per_class": 5, "inner_lr": 0.4},
                                "reference_grad_norm": sum(float((y ** 2).sum()) for y in ref) ** 0.5,
                                "relative_error_vs_float64_plain": errors})


if __name__ == "__main__":
    main()
