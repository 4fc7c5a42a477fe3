"""Native CPU kernels for Conv-4's fused BatchNorm -> ReLU -> max-pool block, built on first use.

:mod:`fastadapt.models.fused` computes the block from PyTorch operations: each one reads and writes
the full-resolution activations again, and on a CPU that memory traffic, not arithmetic, is what
the block costs. ``_native/bn_relu_pool.c`` does the same arithmetic in two passes over the
activations forward and one backward, for float32 NCHW tensors and for float32 or bfloat16
channels-last ones (bfloat16 read and written as such, computed in float32: the block of bf16
autocast, whose convolutions return bfloat16). It has no dependency beyond a C compiler: on first use it is
compiled with the system's compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; OpenMP where the
compiler has it) into ``<cache>/native/`` (see :func:`fastadapt.io.cache_dir`), keyed by
the source, the compiler and the processor (it is built for the processor it runs on), and loaded
with :mod:`ctypes`; later processes load the built library.

Without a compiler, or when building fails, a warning says so once and the block runs on PyTorch
operations, with the same results up to float rounding (``tests/test_native.py`` checks both against
PyTorch's layers in float64). ``FASTADAPT_NATIVE=0`` turns the native kernels off; so does
setting :data:`ENABLED` to False (to compare the two, as ``benchmarks/maml_speed.py`` does).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..io import cache_dir

#: Set to False to run the fused block on PyTorch operations even where the native kernels load.
ENABLED = True

SOURCE = Path(__file__).resolve().parent / "_native" / "bn_relu_pool.c"
ENV = "FASTADAPT_NATIVE"
# Tried in order: the fastest build first, then ones that more compilers accept (no OpenMP: the
# kernels then run on one thread). Not OpenMP on macOS, where a second OpenMP runtime beside
# PyTorch's aborts the process.
FLAG_SETS = tuple(flags for flags in (
    ["-O3", "-march=native", "-mprefer-vector-width=256", "-fopenmp"],  # x86: 256-bit vectors were fastest
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
) if not (sys.platform == "darwin" and "-fopenmp" in flags))
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


class NativeBuildWarning(UserWarning):
    """The native kernels could not be built or loaded; PyTorch operations are used instead."""


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when turned off or not buildable."""
    global _library, _tried
    if os.environ.get(ENV, "1") == "0":
        return None
    if _tried:
        return _library
    failure = None
    with _lock:
        if _tried:
            return _library
        try:
            _library = _load()
        except Exception as e:  # noqa: BLE001 -- any failure means: use PyTorch operations
            _library, failure = None, e
        _tried = True
    if failure is not None:  # said once; even a warning turned into an error leaves the fallback in place
        warnings.warn(f"fastadapt: the native CPU kernels are not available ({failure}); Conv-4's fused "
                      "blocks run on PyTorch operations instead (same results, slower)",
                      NativeBuildWarning, stacklevel=3)
    return _library


def reset() -> None:
    """Forget the loaded library, so the next :func:`library` call builds or loads it again."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False


def compiler() -> str | None:
    """The C compiler used: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` found."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"]) or os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _processor() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags (Linux), else the
    platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.platform() + platform.processor()


def _load() -> ctypes.CDLL:
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC)")
    source = SOURCE.read_bytes()
    folder = cache_dir() / "native"  # the user's own folder: nothing loaded from a shared one
    folder.mkdir(parents=True, exist_ok=True)
    machine = (_processor() + platform.machine()).encode()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), machine])).hexdigest()[:20]
        target = folder / f"bn_relu_pool-{key}.so"
        for attempt in range(2):  # a library that no longer loads is built again, once
            if not target.exists():
                error = _build(cc, flags, target)
                if error:
                    errors.append(f"{' '.join(flags)}: {error}")
                    break
            try:
                return _declare(ctypes.CDLL(str(target)))
            except OSError as e:
                if attempt:
                    errors.append(f"{' '.join(flags)}: {e}")
                target.unlink(missing_ok=True)
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: " + "; ".join(errors)[-600:])


def _build(cc: str, flags: list[str], target: Path) -> str | None:
    """Compile into a temporary file beside ``target`` and rename it (atomic: processes building
    at once each finish with a complete library). Returns the error, or None."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout or "").strip().splitlines()
            return " / ".join(message[:2]) if message else f"exit code {proc.returncode}"
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.bnrp_forward.restype = ctypes.c_int
    lib.bnrp_forward.argtypes = [p, p, p, ctypes.c_float, i64, i64, i64, i64, p, p, p, p, p, p, ctypes.c_int]
    lib.bnrp_backward.restype = ctypes.c_int
    lib.bnrp_backward.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, p, p, p, ctypes.c_int]
    lib.bnrp_forward_nhwc.restype = ctypes.c_int
    lib.bnrp_forward_nhwc.argtypes = [p, ctypes.c_int, p, p, ctypes.c_float, i64, i64, i64, i64, p, p, p, p, p, p,
                                      ctypes.c_int]
    lib.bnrp_backward_nhwc.restype = ctypes.c_int
    lib.bnrp_backward_nhwc.argtypes = [p, p, p, ctypes.c_int, p, p, p, p, p, i64, i64, i64, i64, p, p, p,
                                       ctypes.c_int]
    return lib


def layout(z: Tensor) -> str | None:
    """Which kernels take ``z`` (a 4-d CPU tensor): ``"nchw"`` for a float32 NCHW-contiguous one,
    ``"nhwc"`` for a float32 or bfloat16 channels-last one, else None."""
    if z.device.type != "cpu" or z.dim() != 4:
        return None
    if z.dtype == torch.float32 and z.is_contiguous():
        return "nchw"
    if z.dtype in (torch.float32, torch.bfloat16) and z.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def usable(z: Tensor) -> bool:
    """Whether the native block runs on ``z`` (the caller has checked :func:`fused.can_fuse`): a
    tensor that :func:`layout` places, with the kernels enabled and loaded."""
    return ENABLED and layout(z) is not None and library() is not None


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _empty(shape: tuple[int, ...], dtype: torch.dtype, fmt: torch.memory_format = torch.contiguous_format) -> Tensor:
    # dtype and device spelled out: the process's defaults (torch.set_default_dtype/_device) may differ
    return torch.empty(shape, dtype=dtype, device="cpu", memory_format=fmt)


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:  # turned off (FASTADAPT_NATIVE=0) between a forward pass and its backward
        raise RuntimeError("fastadapt's native kernels were turned off while a fused block still needs them")
    return lib


def _check(code: int) -> None:
    if code != 0:
        raise MemoryError("fastadapt's native fused block could not allocate its scratch memory")


def forward(z: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, ...]:
    """``out, pooled, idx, mean, var, invstd`` of the fused block on ``z`` (see the C source), in
    ``z``'s layout: ``out`` in ``z``'s dtype, ``pooled`` (each window's chosen value minus the
    mean) and the statistics in float32, ``idx`` the chosen position (0-3, row-major)."""
    n, c, h, w = z.shape
    if gamma.numel() != c or beta.numel() != c:
        raise ValueError(f"the fused block needs one weight and one bias per channel ({c}), got "
                         f"{gamma.numel()} and {beta.numel()}")
    kind = layout(z)
    if n < 1 or h < 2 or w < 2:
        raise ValueError(f"the native fused block needs a batch and 2x2 windows, got a tensor of shape {tuple(z.shape)}")
    if kind is None:
        raise ValueError(f"the native fused block takes float32 NCHW or float32/bfloat16 channels-last CPU "
                         f"tensors, got {z.dtype} of strides {z.stride()} on {z.device}")
    gamma = gamma.detach().float().contiguous()
    beta = beta.detach().float().contiguous()
    fmt = torch.channels_last if kind == "nhwc" else torch.contiguous_format
    out = _empty((n, c, h // 2, w // 2), z.dtype, fmt)
    pooled = _empty(out.shape, torch.float32, fmt)
    idx = _empty(out.shape, torch.uint8, fmt)
    mean, var, invstd = (_empty((c,), torch.float32) for _ in range(3))
    lib = _loaded()
    if kind == "nhwc":
        code = lib.bnrp_forward_nhwc(_ptr(z), int(z.dtype == torch.bfloat16), _ptr(gamma), _ptr(beta), eps, n, c,
                                     h, w, _ptr(out), _ptr(pooled), _ptr(idx), _ptr(mean), _ptr(var), _ptr(invstd),
                                     _threads())
    else:
        code = lib.bnrp_forward(_ptr(z), _ptr(gamma), _ptr(beta), eps, n, c, h, w, _ptr(out), _ptr(pooled),
                                _ptr(idx), _ptr(mean), _ptr(var), _ptr(invstd), _threads())
    _check(code)
    return out, pooled, idx, mean, var, invstd


def backward(grad_out: Tensor, z: Tensor, out: Tensor, pooled: Tensor, idx: Tensor, mean: Tensor,
             invstd: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``z`` (in its dtype and layout), ``gamma`` and ``beta`` (float32) given the
    output's gradient ``grad_out``."""
    n, c, h, w = z.shape
    # A hook on saved tensors may hand them back in another layout or dtype: all are brought to
    # what one kernel takes (z's dtype where that is bfloat16, else float32).
    dtype = z.dtype if z.dtype == torch.bfloat16 else torch.float32
    nhwc = dtype == torch.bfloat16 or not z.is_contiguous()  # as layout() decides for float32
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    grad_out, z, out = (t.detach().to(dtype).contiguous(memory_format=fmt) for t in (grad_out, z, out))
    pooled = pooled.detach().float().contiguous(memory_format=fmt)
    idx = idx.detach().to(torch.uint8).contiguous(memory_format=fmt)
    mean, invstd, gamma = (t.detach().float().contiguous() for t in (mean, invstd, gamma))
    grad_z = _empty(z.shape, dtype, fmt)
    grad_gamma, grad_beta = _empty((c,), torch.float32), _empty((c,), torch.float32)
    lib = _loaded()
    if nhwc:
        code = lib.bnrp_backward_nhwc(_ptr(grad_out), _ptr(z), _ptr(out), int(z.dtype == torch.bfloat16),
                                      _ptr(pooled), _ptr(idx), _ptr(mean), _ptr(invstd), _ptr(gamma), n, c, h, w,
                                      _ptr(grad_z), _ptr(grad_gamma), _ptr(grad_beta), _threads())
    else:
        code = lib.bnrp_backward(_ptr(grad_out), _ptr(z), _ptr(out), _ptr(pooled), _ptr(idx), _ptr(mean),
                                 _ptr(invstd), _ptr(gamma), n, c, h, w, _ptr(grad_z), _ptr(grad_gamma),
                                 _ptr(grad_beta), _threads())
    _check(code)
    return grad_z, grad_gamma, grad_beta
