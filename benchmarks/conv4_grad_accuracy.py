"""float32 error of ProtoNet's meta-gradient on Conv-4 against float64: channels-last, NCHW, compiled.

Channels-last is the faster layout for Conv-4 on the CPU (oneDNN); NCHW is the CPU default
(``--memory-format auto``) for learners with unfused batch-statistics BatchNorm (MAML's inner loop)
because of what this measures: the relative L2 error of the float32
gradient of one 20-way 5-shot 5-query episode against the float64 gradient (NCHW), for the eager
channels-last model, the eager NCHW model, both with Conv-4's fused BatchNorm/ReLU/max-pool blocks
(``fastadapt.models.fused``, the path ProtoNet's training step takes) and the compiled
(``torch.compile``) channels-last model.

    python benchmarks/conv4_grad_accuracy.py [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_clean_tree, save  # noqa: E402

from fastadapt.config import resolve  # noqa: E402
from fastadapt.data import build_task_source  # noqa: E402
from fastadapt.models.conv4 import use_memory_format  # noqa: E402
from fastadapt.models.fused import fused_blocks  # noqa: E402
from fastadapt.registry import METHODS  # noqa: E402


def in_format(learner, memory_format):
    out = copy.deepcopy(learner)
    use_memory_format(out, memory_format)
    return out


def grad(learner, sx, sy, qx, qy, fuse=False) -> torch.Tensor:
    with fused_blocks(fuse):
        loss = F.cross_entropy(learner.logits(sx, sy, qx), qy)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(learner.parameters()))]).double()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    require_clean_tree()
    torch.set_num_threads(args.threads)
    cfg = resolve("protonet", {}, {"dataset": "builtin"})
    source = build_task_source(cfg, "train", 20, 5, 5)
    torch.manual_seed(0)
    learner = METHODS.get("protonet").from_config(cfg, source.in_shape)
    b = source.sample_batch(torch.Generator().manual_seed(0), 1)
    sx, sy, qx, qy = b.support_x[0], b.support_y[0], b.query_x[0], b.query_y[0]
    ref = grad(in_format(learner, "nchw").double(), sx.double(), sy, qx.double(), qy)
    errors = {}
    compiled = in_format(learner, "channels_last")
    compiled.compile_networks()
    for name, model, fuse in (("eager channels-last", in_format(learner, "channels_last"), False),
                              ("eager NCHW (the CPU default of unfused layers)", in_format(learner, "nchw"), False),
                              ("fused blocks, channels-last (ProtoNet training's CPU default)",
                               in_format(learner, "channels_last"), True),
                              ("fused blocks, NCHW", in_format(learner, "nchw"), True),
                              ("compiled channels-last", compiled, False)):
        errors[name] = float((grad(model, sx, sy, qx, qy, fuse) - ref).norm() / ref.norm())
        print(f"{name}: relative error {errors[name]:.2e}")
    save("conv4_grad_accuracy", {"setting": "ProtoNet, Conv-4, built-in glyphs, 20-way 5-shot 5-query, one episode",
                                 "threads": args.threads, "relative_error_vs_float64": errors})


if __name__ == "__main__":
    main()
