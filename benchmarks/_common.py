"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# The load average when the benchmark started (this module is imported at its start).
_START_LOAD = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_cli(argv: list[str]) -> None:
    """Run one ``fastadapt`` command in this process; exit with its message if it fails."""
    from fastadapt.cli import main as cli

    code = cli(argv)
    if code != 0:
        sys.exit(f"fastadapt {' '.join(argv)} failed with exit code {code}")


def task_data_config(data_dir: str | Path) -> dict[str, Any]:
    """The dataset part of a run configuration: Omniglot from ``data_dir`` when it is there (no
    download), else the built-in glyphs."""
    if Path(data_dir, "images_background").is_dir():
        return {"dataset": "omniglot", "data_dir": str(data_dir), "download": False, "progress": False}
    return {"dataset": "builtin"}


def matmul_ceiling(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 5) -> float:
    """This process's matrix-multiply speed in GFLOP/s (median of ``reps`` ``n x n`` products): the
    practical ceiling a convolutional network's step is compared with."""
    import statistics
    import time

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


@contextlib.contextmanager
def conv4_layers_free() -> Iterator[None]:
    """Within this block every Conv-4 runs only its convolutions: each block's BatchNorm, ReLU and
    max-pooling are replaced by a strided view (every second pixel), the cheapest operation with
    the pooled output's shape. The arithmetic is wrong on purpose: a step timed this way keeps
    everything else as it is (convolutions, head, loss, inner update, autograd), so its time is
    a measured lower bound for any implementation of those three layers, fused or not. Both
    forms are replaced: ``forward`` and ``grouped_forward`` (MAML's ``--batching grouped``)."""
    from fastadapt.models import grouped
    from fastadapt.models.conv4 import Conv4

    def pool_free(x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-2] // 2 * 2 : 2, : x.shape[-1] // 2 * 2 : 2]

    def convolutions_only(self: Conv4, x: torch.Tensor) -> torch.Tensor:
        for block in self.encoder:
            x = pool_free(block[0](x))
        return x.flatten(1)

    def grouped_convolutions_only(self: Conv4, params: dict, x: torch.Tensor) -> torch.Tensor:
        tasks, z = x.shape[0], grouped.to_channels(x)
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        for i, block in enumerate(self.encoder):
            own = grouped.sub_params(grouped.sub_params(params, f"encoder.{i}"), "0")
            z = pool_free(grouped.conv2d(block[0], own, z, tasks))
        return grouped.from_channels(z, tasks)

    saved = Conv4.forward, Conv4.grouped_forward
    Conv4.forward, Conv4.grouped_forward = convolutions_only, grouped_convolutions_only
    try:
        yield
    finally:
        Conv4.forward, Conv4.grouped_forward = saved


def rss_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def save_figure(fig: Any, name: str) -> Path:
    """Save a matplotlib figure as ``benchmarks/results/<name>.png``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def require_clean_tree() -> None:
    """Warn when the working tree has uncommitted changes: figures must be tied to a commit."""
    if commit().endswith("+dirty"):
        print("warning: the working tree has uncommitted changes; commit first so that the figures are tied to "
              "a commit (the JSON records the commit as '+dirty')", file=sys.stderr, flush=True)


def commit() -> str:
    """``HEAD`` (``+dirty`` with uncommitted changes), or ``$FASTADAPT_COMMIT`` where it is set: a copy
    of the tree on another machine, whose git metadata may be older than the files."""
    if os.environ.get("FASTADAPT_COMMIT"):
        return os.environ["FASTADAPT_COMMIT"]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        # Results written by earlier benchmarks do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[1]).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# The commit the benchmark started from (the code that produced its figures), taken at import.
_START_COMMIT = commit()


def save(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the command, machine, commit and date."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["load_avg_at_start"] = _START_LOAD
    info["load_avg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _START_COMMIT,
        "machine": info,
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {path}")
    return path
