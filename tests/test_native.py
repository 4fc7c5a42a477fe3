"""The native CPU kernels of Conv-4's fused block against PyTorch's layers, and their fallback."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from fastadapt.methods import MAML
from fastadapt.models import fused, native
from fastadapt.tasks import Episode

needs_kernels = pytest.mark.skipif(native.compiler() is None, reason="no C compiler to build the native kernels")


@pytest.fixture
def rebuilt():
    """Load the kernels afresh after the test (it may change how they are found)."""
    yield
    native.reset()


@contextlib.contextmanager
def _kernels(enabled):
    """The native kernels turned on or off inside the block, and back on after it."""
    native.ENABLED = enabled
    try:
        yield
    finally:
        native.ENABLED = True


def _block(z, gamma, beta, grad_out):
    """The fused block and its gradients, and which implementation ran."""
    z, gamma, beta = (t.clone().requires_grad_() for t in (z, gamma, beta))
    out, mean, var = fused.affine_relu_pool(z, gamma, beta, 1e-5)
    out.backward(grad_out)
    kernels = getattr(out.grad_fn, "kernels", None)  # None: PyTorch's layers ran
    return (out.detach(), mean, var, z.grad, gamma.grad, beta.grad), getattr(kernels, "__name__", None)


def _reference(z, gamma, beta, grad_out):
    """PyTorch's three layers in float64."""
    z, gamma, beta = (t.double().requires_grad_() for t in (z, gamma, beta))
    out = F.max_pool2d(F.relu(F.batch_norm(z, None, None, gamma, beta, training=True, eps=1e-5)), 2)
    out.backward(grad_out.double())
    mean, var = z.detach().mean((0, 2, 3)), z.detach().var((0, 2, 3), unbiased=False)
    return out.detach(), mean, var, z.grad, gamma.grad, beta.grad


def _inputs(shape, seed=0, grid=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g) * 2
    if grid:  # values on a grid of halves: many exact ties inside windows (a flat image background)
        z = torch.round(z * 2) / 2
    gamma = torch.rand(shape[1], generator=g) * 2 - 0.6  # some channels negative
    beta = torch.randn(shape[1], generator=g)
    out_shape = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    return z, gamma, beta, torch.randn(out_shape, generator=g)


def test_native_kernels_build_where_there_is_a_compiler():
    if native.compiler() is None:
        pytest.skip("no C compiler")
    assert native.library() is not None  # a broken build must fail here, not fall back unnoticed


def _format(layout):
    return torch.channels_last if layout == "nhwc" else torch.contiguous_format


def _layout(t, layout):
    return t.contiguous(memory_format=_format(layout))


def _is_layout(t, layout):
    return t.is_contiguous(memory_format=_format(layout))


@needs_kernels
@pytest.mark.parametrize("shape", [(6, 5, 8, 8), (4, 6, 7, 9), (2, 3, 2, 3), (3, 4, 5, 2), (2, 4, 3, 7), (3, 1, 5, 5),
                                   (5, 64, 28, 28), (2, 3, 4, 1500)])
@pytest.mark.parametrize("grid", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_native_block_equals_the_three_layers_with_their_gradients(shape, grid, layout):
    z, gamma, beta, grad_out = _inputs(shape, grid=grid)
    z = _layout(z, layout)
    assert native.layout(z) == layout or shape[1] == 1  # one channel: both layouts; float32 takes NCHW's kernels
    got, ran = _block(z, gamma, beta, grad_out)
    assert ran == "_NativeKernels"
    names = ("out", "mean", "var", "grad_z", "grad_gamma", "grad_beta")
    for name, a, b in zip(names, got, _reference(z, gamma, beta, grad_out)):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        scale = float(b.abs().max()) + 1e-3
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5 * scale, msg=name)
    for name, a in (("out", got[0]), ("grad_z", got[3])):  # in the input's layout
        assert _is_layout(a, layout), name


@needs_kernels
@pytest.mark.parametrize("shape", [(6, 5, 8, 8), (3, 7, 9, 11), (2, 3, 2, 3), (3, 1, 5, 5), (2, 4, 3, 1500),
                                   (5, 64, 28, 28)])
def test_bfloat16_block_is_the_float32_block_rounded(shape):
    # bfloat16 values are float32 values: read as such, the bfloat16 kernels must do exactly the
    # float32 arithmetic, rounding only what they write in bfloat16 (the output, the input's
    # gradient); statistics and parameter gradients stay float32 and equal.
    z, gamma, beta, grad_out = _inputs(shape, grid=False)
    z, grad_out = _layout(z, "nhwc").bfloat16(), _layout(grad_out, "nhwc").bfloat16()
    half, ran = _block(z, gamma, beta, grad_out)
    assert ran == "_NativeKernels" and native.layout(z) == "nhwc"
    full, _ = _block(z.float(), gamma, beta, grad_out.float())
    names = ("out", "mean", "var", "grad_z", "grad_gamma", "grad_beta")
    # (one channel: float32 runs NCHW's kernels, which sum in another order; the check below stays)
    for name, a, b in zip(names, half, full) if shape[1] > 1 else ():
        if name in ("out", "grad_z"):
            assert a.dtype == torch.bfloat16 and _is_layout(a, "nhwc"), name
            b = b.bfloat16()
        assert torch.equal(a, b), name
    # and both are the three layers within bfloat16's rounding of what they write
    for name, a, b in zip(names, half, _reference(z.float(), gamma, beta, grad_out.float())):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=8e-3 * (float(b.abs().max()) + 1e-3), msg=name)


@needs_kernels
def test_bfloat16_keeps_nan_and_infinity_as_the_float32_block_rounded():
    # (rounding to nearest even is checked above: 5x64x28x28 holds hundreds of exact ties)
    z, gamma, beta, grad_out = _inputs((3, 4, 6, 6), grid=False)
    z = _layout(z, "nhwc").bfloat16()
    z[0, 1, 2, 3] = float("nan")
    z[1, 2, 0, 0] = float("inf")
    grad_out = _layout(grad_out, "nhwc").bfloat16()
    half, _ = _block(z, gamma, beta, grad_out)
    full, _ = _block(z.float(), gamma, beta, grad_out.float())
    for a, b in zip(half, full):
        b = b.to(a.dtype)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()], b[~b.isnan()])
    assert half[0][:, 1].isnan().all() and half[1][1].isnan()  # the NaN's channel, as the layers


@needs_kernels
@pytest.mark.parametrize("case", ["outlier first", "large plane"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_statistics_stay_exact_for_large_planes_and_outliers(case, layout):
    if case == "outlier first":  # the first value of each channel far from its mean
        z, gamma, beta, grad_out = _inputs((4, 3, 84, 84), grid=False)
        z[0, :, 0, 0] = 60.0
    else:  # one plane of a million values
        z, gamma, beta, grad_out = _inputs((1, 2, 1024, 1024), grid=False)
        z += 3.0
    got, ran = _block(_layout(z, layout), gamma, beta, grad_out)
    assert ran == "_NativeKernels"
    for name, a, b in zip(("out", "mean", "var", "grad_z", "grad_gamma", "grad_beta"), got,
                          _reference(z, gamma, beta, grad_out)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5 * (float(b.abs().max()) + 1e-3), msg=name)


@pytest.mark.parametrize("enabled", [True, False])
def test_a_zero_weight_sends_its_gradient_to_the_first_element_as_max_pool2d(enabled):
    # With gamma = 0 every element of a window ties after the affine map; the weight's gradient
    # depends on which one max_pool2d picks (the first), not on which is largest.
    z, gamma, beta, grad_out = _inputs((3, 4, 6, 6), grid=False)
    gamma[[0, 2]] = 0.0
    beta[[0, 2]] = 1.0
    with _kernels(enabled):
        got, ran = _block(z, gamma, beta, grad_out)
    assert ran is None
    for a, b in zip(got, _reference(z, gamma, beta, grad_out)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5 * (float(b.abs().max()) + 1e-3))


@needs_kernels
def test_weights_of_the_wrong_size_are_refused():
    z, gamma, beta, _ = _inputs((2, 8, 4, 4))
    with pytest.raises(ValueError, match="one weight and one bias per channel"):
        native.forward(z, gamma[:1], beta, 1e-5)


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_native_and_pytorch_operations_agree_in_float32(layout):
    z, gamma, beta, grad_out = _inputs((8, 16, 14, 14), grid=False)
    z = _layout(z, layout)
    ours, ran = _block(z, gamma, beta, grad_out)
    with _kernels(False):
        theirs, ran_off = _block(z, gamma, beta, grad_out)
    assert (ran, ran_off) == ("_NativeKernels", "_TorchKernels")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_a_nan_propagates_as_through_the_layers(layout):
    z, gamma, beta, grad_out = _inputs((3, 4, 6, 6))
    z[1, 2, 3, 3] = float("nan")
    (out, mean, *_), _ = _block(_layout(z, layout), gamma, beta, grad_out)
    ref = _reference(z, gamma, beta, grad_out)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[:, 2]).all()
    assert torch.isnan(mean[2]) and not torch.isnan(mean[[0, 1, 3]]).any()


@needs_kernels
def test_other_dtypes_and_layouts_use_the_pytorch_operations():
    z, gamma, beta, grad_out = _inputs((2, 3, 4, 4))
    assert _block(z.double(), gamma.double(), beta.double(), grad_out.double())[1] == "_TorchKernels"
    cl = z.contiguous(memory_format=torch.channels_last)
    assert native.layout(z) == "nchw" and native.layout(cl) == "nhwc" and native.layout(cl.bfloat16()) == "nhwc"
    for other in (z.bfloat16(), z.double(), cl.half(), cl[..., ::2], z[0]):  # bfloat16 NCHW: its convolutions are slow
        assert native.layout(other) is None and not native.usable(other)
    bn, relu, pool = torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.MaxPool2d(2)
    with fused.fused_blocks():
        assert fused.can_fuse(cl.bfloat16(), bn, relu, pool) and not fused.can_fuse(z.bfloat16(), bn, relu, pool)
        with _kernels(False):  # bfloat16 without the native kernels: PyTorch's layers, not bfloat16 PyTorch operations
            assert not fused.can_fuse(cl.bfloat16(), bn, relu, pool) and fused.can_fuse(cl, bn, relu, pool)


def test_turned_off_by_the_environment(monkeypatch, rebuilt):
    monkeypatch.setenv(native.ENV, "0")
    native.reset()
    assert native.library() is None and not native.usable(torch.zeros(1, 1, 2, 2))
    z, gamma, beta, grad_out = _inputs((2, 3, 4, 4))
    assert _block(z, gamma, beta, grad_out)[1] == "_TorchKernels"


def test_without_a_compiler_it_warns_once_and_falls_back(monkeypatch, tmp_path, rebuilt):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))
    native.reset()
    with pytest.warns(native.NativeBuildWarning, match="not available"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # said once
    z, gamma, beta, grad_out = _inputs((2, 3, 4, 4))
    got, ran = _block(z, gamma, beta, grad_out)
    assert ran == "_TorchKernels"
    torch.testing.assert_close(got[0].double(), _reference(z, gamma, beta, grad_out)[0], rtol=0, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("batching", ["loop", "grouped"])
def test_maml_meta_gradient_with_the_native_block_matches_the_pytorch_operations(batching, monkeypatch):
    calls = []
    forward = native.forward
    monkeypatch.setattr(native, "forward", lambda *a: calls.append(a[0].shape) or forward(*a))
    torch.manual_seed(0)
    learner = MAML.from_config({"ways": 3, "inner_steps": 1, "inner_lr": 0.3, "batching": batching}, (1, 16, 16))
    g = torch.Generator().manual_seed(0)
    batch = Episode(torch.rand(4, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(4, 1),
                    torch.rand(4, 9, 1, 16, 16, generator=g), torch.arange(3).repeat_interleave(3).repeat(4, 1))
    grads = []
    for enabled in (True, False):
        with _kernels(enabled):
            learner._backward(batch, batching, 0)
        grads.append(torch.cat([p.grad.flatten() for p in learner.model.parameters()]))
    assert len(calls) == 4 * (4 if batching == "loop" else 1)  # Conv-4's blocks in the query passes
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-5


@needs_kernels
def test_protonet_under_bf16_autocast_runs_every_block_natively_in_channels_last(monkeypatch):
    # Under autocast the convolutions return bfloat16: in channels-last each block then runs in
    # the native kernels (reading and writing bfloat16), and the episode's gradient is the one of
    # PyTorch's bfloat16 layers up to bfloat16 rounding.
    from fastadapt.methods import ProtoNet
    from fastadapt.models.conv4 import use_memory_format

    calls = []
    forward = native.forward
    monkeypatch.setattr(native, "forward", lambda *a: calls.append((a[0].dtype, native.layout(a[0]))) or forward(*a))
    torch.manual_seed(0)
    learner = ProtoNet.from_config({"ways": 5}, (1, 28, 28))
    use_memory_format(learner, "channels_last")
    g = torch.Generator().manual_seed(0)
    batch = Episode(torch.rand(1, 10, 1, 28, 28, generator=g), torch.arange(5).repeat(2)[None],
                    torch.rand(1, 15, 1, 28, 28, generator=g), torch.arange(5).repeat(3)[None])
    grads = {}
    for name, enabled, dtype in (("native", True, torch.bfloat16), ("layers", False, torch.bfloat16),
                                 ("fp32", True, None)):
        with _kernels(enabled):
            learner.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                loss, _ = learner.meta_loss(batch)
            loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in learner.parameters()])
    assert calls == [(torch.bfloat16, "nhwc")] * 4 + [(torch.float32, "nhwc")] * 4
    rel = {k: float((grads[k] - grads["fp32"]).norm() / grads["fp32"].norm()) for k in ("native", "layers")}
    # (both about 0.2 here: bfloat16 products on random images; tests/test_precision.py's bound is 0.3)
    assert 0 < rel["native"] < 0.3 and rel["native"] < 1.25 * rel["layers"], rel
    assert float((grads["native"] - grads["layers"]).norm() / grads["layers"].norm()) < 0.3


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_results_do_not_depend_on_the_default_dtype_or_on_timing(layout):
    z, gamma, beta, grad_out = _inputs((6, 8, 10, 10), grid=False)
    z = _layout(z, layout)
    first, ran = _block(z, gamma, beta, grad_out)
    assert ran == "_NativeKernels"
    for _ in range(3):  # per-thread partial sums are added in a fixed order
        again, _ = _block(z, gamma, beta, grad_out)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the kernels' buffers are float32 whatever the default
    try:
        got, _ = _block(z, gamma, beta, grad_out)
    finally:
        torch.set_default_dtype(default)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, first))


@needs_kernels
@pytest.mark.parametrize("hook", ["to channels-last", "to NCHW", "to bfloat16"])
def test_saved_tensors_handed_back_in_another_layout_or_dtype(hook):
    # Memory-saving hooks may store activations differently; the backward kernels take what comes.
    z, gamma, beta, grad_out = _inputs((4, 6, 7, 8), grid=False)
    if hook == "to NCHW":
        z = _layout(z, "nhwc")

    def pack(t):
        if t.dim() != 4:
            return t
        if hook == "to bfloat16":
            return t.bfloat16() if t.dtype == torch.float32 else t
        return t.contiguous(memory_format=torch.channels_last if hook == "to channels-last" else torch.contiguous_format)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got, ran = _block(z, gamma, beta, grad_out)
    assert ran == "_NativeKernels" and got[3].dtype == torch.float32
    tol = 2e-2 if hook == "to bfloat16" else 2e-5  # (bfloat16 keeps 8 bits of the saved values)
    for name, a, b in zip(("out", "mean", "var", "grad_z", "grad_gamma", "grad_beta"), got,
                          _reference(z, gamma, beta, grad_out)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol * (float(b.abs().max()) + 1e-3), msg=name)


@needs_kernels
def test_a_tensor_the_kernels_do_not_take_is_refused():
    z, gamma, beta, _ = _inputs((2, 3, 4, 4))
    with pytest.raises(ValueError, match="float32 NCHW or float32/bfloat16 channels-last"):
        native.forward(z.bfloat16(), gamma, beta, 1e-5)


@needs_kernels
def test_running_statistics_through_the_channels_last_kernels_are_batchnorm2d_ones():
    z, gamma, beta, _ = _inputs((8, 4, 6, 6), grid=False)
    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.copy_(gamma)
        ref.bias.copy_(beta)
    ours = copy.deepcopy(ref)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        x = _layout(z, "nhwc").to(dtype)
        for _ in range(3):
            expected = F.max_pool2d(F.relu(ref(x.float())), 2)
            with fused.fused_blocks():
                assert fused.can_fuse(x, ours, torch.nn.ReLU(), torch.nn.MaxPool2d(2))
                got = fused.bn_relu_pool(x, ours)
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
        # the statistics of the bfloat16 values themselves, in float32
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-6)


@needs_kernels
def test_a_zero_weight_in_bfloat16_runs_the_layers_with_float32_statistics():
    z, gamma, beta, grad_out = _inputs((3, 4, 6, 6), grid=False)
    gamma[1] = 0.0
    z = _layout(z, "nhwc").bfloat16()
    (out, mean, var, *grads), ran = _block(z, gamma, beta, _layout(grad_out, "nhwc").bfloat16())
    assert ran is None and out.dtype == torch.bfloat16 and mean.dtype == var.dtype == torch.float32
    ref = _reference(z.float(), gamma, beta, grad_out.bfloat16().float())
    for a, b in zip((out, mean, var, *grads), ref):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-2 * (float(b.abs().max()) + 1e-3))


@needs_kernels
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 1, 4), (2, 3, 4, 1)])
def test_sizes_without_a_window_are_refused_by_the_kernels(shape):
    # (can_fuse leaves these to PyTorch's layers, which say what is wrong)
    z = torch.zeros(shape)
    for t in (z, z.contiguous(memory_format=torch.channels_last)):
        with pytest.raises(ValueError, match="a batch and 2x2 windows"):
            native.forward(t, torch.ones(3), torch.zeros(3), 1e-5)
