"""--memory-format: NCHW on the CPU (exact BatchNorm) unless the learner trains through fused blocks
(ProtoNet), channels-last on request and on GPUs."""

import pytest
import torch
import torch.nn.functional as F
import yaml

import fastadapt
from fastadapt.cli import main
from fastadapt.config import resolve
from fastadapt.data import build_task_source
from fastadapt.errors import ConfigError
from fastadapt.models.conv4 import Conv4, use_memory_format
from fastadapt.models.fused import fused_blocks
from fastadapt.precision import decide_memory_format
from fastadapt.registry import METHODS

FAST = ["--ways", "3", "--shots", "1", "--queries", "2", "--eval-ways", "3", "--eval-episodes", "2",
        "--log-every", "1", "--no-progress"]


def _is_channels_last(learner):
    """Per convolution with several input channels (for one, both layouts are the same strides)."""
    convs = [m.weight for m in learner.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]
    return [w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs]


def test_auto_is_nchw_on_the_cpu_and_channels_last_on_a_gpu():
    assert decide_memory_format("auto", "cpu") == "nchw"
    assert decide_memory_format("auto", "cuda") == "channels_last"
    # A learner that trains only through the fused blocks is exact in channels-last (ProtoNet).
    assert decide_memory_format("auto", "cpu", fused_training=True) == "channels_last"
    assert decide_memory_format("auto", "cuda", fused_training=True) == "channels_last"
    assert METHODS.get("protonet").fused_training and not METHODS.get("maml").fused_training
    assert decide_memory_format("channels_last", "cpu") == "channels_last"
    with pytest.raises(ConfigError, match="--memory-format must be one of"):
        decide_memory_format("nhwc", "cpu")


@pytest.mark.parametrize("layout,fuse", [("nchw", False), ("nchw", True), ("channels_last", True)])
def test_the_cpu_defaults_give_the_float64_gradient_within_float32_rounding(layout, fuse):
    # The reason for the CPU defaults: NCHW (unfused layers, MAML's inner loop) and ProtoNet's
    # training step (fused blocks, in either layout: native kernels, or PyTorch operations without them)
    # give float32 meta-gradients exact to about 1e-4, against 1e-2 for PyTorch's channels-last
    # BatchNorm.
    cfg = resolve("protonet", {}, {"dataset": "builtin"})
    source = build_task_source(cfg, "train", 10, 5, 5)
    torch.manual_seed(0)
    learner = METHODS.get("protonet").from_config(cfg, source.in_shape)
    use_memory_format(learner, layout)
    b = source.sample_batch(torch.Generator().manual_seed(0), 1)

    def grad(model, dtype, fuse):
        with fused_blocks(fuse):
            logits = model.logits(b.support_x[0].to(dtype), b.support_y[0], b.query_x[0].to(dtype))
        loss = F.cross_entropy(logits, b.query_y[0])
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]).double()

    import copy

    exact = copy.deepcopy(learner).double()
    use_memory_format(exact, "nchw")
    exact = grad(exact, torch.float64, False)
    assert float((grad(learner, torch.float32, fuse) - exact).norm() / exact.norm()) < 1e-3


def test_use_memory_format_keeps_the_weights_and_the_output():
    torch.manual_seed(0)
    net = Conv4().eval()  # running statistics stay as they are
    x = torch.rand(6, 1, 28, 28)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = net(x)
    use_memory_format(net, "channels_last")
    assert all(_is_channels_last(net))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    torch.testing.assert_close(net(x), out, rtol=1e-4, atol=1e-4)
    use_memory_format(net, "nchw")
    assert not any(_is_channels_last(net))


def test_train_records_the_decided_layout_and_resume_keeps_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "protonet", *FAST, "--steps", "2", "--out", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["memory_format"] == "channels_last"
    bf16 = tmp_path / "bf16"
    assert main(["train", "protonet", *FAST, "--steps", "1", "--precision", "bf16", "--out", str(bf16)]) == 0
    assert yaml.safe_load((bf16 / "config.yaml").read_text())["memory_format"] == "channels_last"
    nchw = tmp_path / "nchw"
    assert main(["train", "maml", *FAST, "--steps", "1", "--meta-batch", "2", "--out", str(nchw)]) == 0
    assert yaml.safe_load((nchw / "config.yaml").read_text())["memory_format"] == "nchw"
    cl = tmp_path / "cl"
    assert main(["train", "protonet", *FAST, "--steps", "2", "--memory-format", "channels_last", "--out", str(cl)]) == 0
    assert yaml.safe_load((cl / "config.yaml").read_text())["memory_format"] == "channels_last"
    learner, _ = fastadapt.load_run(cl)
    assert all(_is_channels_last(learner))  # evaluated in the layout it trained in
    # Extending the run keeps its layout; asking for another is refused (it rounds differently).
    assert main(["train", "protonet", *FAST, "--steps", "3", "--out", str(cl)]) == 0
    assert yaml.safe_load((cl / "config.yaml").read_text())["memory_format"] == "channels_last"
    assert main(["train", "protonet", *FAST, "--steps", "4", "--memory-format", "nchw", "--out", str(cl)]) != 0
    assert "memory_format" in capsys.readouterr().err
    # A run that trained in NCHW (an explicit choice, or auto before ProtoNet's became channels-last)
    # goes on in NCHW under the default auto.
    old = tmp_path / "old-nchw"
    assert main(["train", "protonet", *FAST, "--steps", "2", "--memory-format", "nchw", "--out", str(old)]) == 0
    assert main(["train", "protonet", *FAST, "--steps", "3", "--out", str(old)]) == 0
    assert yaml.safe_load((old / "config.yaml").read_text())["memory_format"] == "nchw"


def test_a_run_saved_before_the_option_resumes_channels_last(tmp_path, capsys):
    run = tmp_path / "old"
    assert main(["train", "protonet", *FAST, "--steps", "2", "--memory-format", "channels_last", "--out", str(run)]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["memory_format"]  # as such a run wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    learner, _ = fastadapt.load_run(run)
    assert all(_is_channels_last(learner))
    assert main(["train", "protonet", *FAST, "--steps", "3", "--out", str(run)]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["memory_format"] == "channels_last"
