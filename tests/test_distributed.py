"""Meta-training shared by several processes (torch.distributed, gloo on the CPU) reaches the
weights of one process, and a killed distributed run resumes, with the same or another number of
processes, where an uninterrupted run would be."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastadapt.cli import main
from fastadapt.engine.trainer import CHECKPOINT, METRICS
from fastadapt.errors import ConfigError
from fastadapt.io import load_checkpoint
from fastadapt.tasks.episode import Episode, LabelledBatch, shard

dist = pytest.importorskip("torch.distributed")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

SRC = Path(__file__).resolve().parents[1] / "src"
COMMON = ["--dataset", "builtin", "--ways", "3", "--shots", "1", "--queries", "2", "--eval-ways", "3",
          "--eval-episodes", "2", "--log-every", "1", "--no-progress", "--threads", "1"]
# MAML and Reptile on an MLP: a convolution's bias before BatchNorm has a gradient that is zero
# but for rounding, which Adam (outer, and Reptile's inner optimiser) scales up to a full step, so
# its value would depend on the order of float additions in any two runs that add differently.
# A meta-batch of 3 on 2 processes: shares of 1 and 2 tasks, weighted accordingly.
RUNS = {
    "protonet": ["--meta-batch", "2", "--steps", "3", "--val-every", "2", "--val-episodes", "2"],
    "maml": ["--meta-batch", "3", "--steps", "3", "--backbone", "mlp", "--image-size", "16", "--inner-steps", "1"],
    "reptile": ["--meta-batch", "3", "--steps", "3", "--backbone", "mlp", "--image-size", "16", "--inner-steps", "2"],
}


def argv(method, out, *extra):
    return ["train", method, *COMMON, *RUNS[method], "--out", str(out), *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run):
    return load_checkpoint(Path(run) / CHECKPOINT)["model"]


def assert_close_weights(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=atol), (k, (a[k] - b[k]).abs().max())


def test_shard_cuts_a_batch_into_contiguous_parts_in_order():
    batch = Episode(torch.arange(5)[:, None, None].float(), torch.zeros(5, 1, dtype=torch.long),
                    torch.zeros(5, 1, 1), torch.zeros(5, 1, dtype=torch.long))
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [(size, total) for _, size, total in parts] == [(2, 5), (3, 5)]
    assert torch.equal(torch.cat([p.support_x for p, _, _ in parts]), batch.support_x)
    images = LabelledBatch(torch.zeros(4, 1), torch.arange(4))
    assert shard(images, 1, 2)[0].y.tolist() == [2, 3]
    with pytest.raises(ConfigError, match="--meta-batch"):
        shard(batch, 0, 6)


def _worker(rank, world, port, jobs, env):
    """One of ``world`` processes: join the group as torchrun would, run every command in it."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from fastadapt.cli import main as cli

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for args, code in jobs:
            assert cli(args) == code, args
    finally:
        dist.destroy_process_group()


def spawn(jobs, world=2):
    import torch.multiprocessing as mp

    env = {"PYTHONPATH": str(SRC), **{k: os.environ[k] for k in ("FASTADAPT_CACHE",) if k in os.environ}}
    mp.spawn(_worker, args=(world, free_port(), jobs, env), nprocs=world, join=True)


def test_two_processes_reach_the_weights_of_one(tmp_path, capfd):
    jobs = [(argv(m, tmp_path / f"{m}-2"), 0) for m in RUNS]
    # Each process needs a task: a meta-batch of 1 cannot be shared, a clear error on every rank.
    jobs.append((argv("protonet", tmp_path / "refused", "--meta-batch", "1"), 2))
    # An error while the first process reads the data: the others still get there, and stop too.
    jobs.append((argv("protonet", tmp_path / "too-many-shots", "--shots", "900"), 2))
    spawn(jobs)
    out = capfd.readouterr()  # the processes' output
    assert "2 processes × 1 thread" in out.out
    assert "error: a batch of 1 tasks cannot be shared by 2 processes" in out.err
    assert "error (rank 1): a batch of 1 tasks" in out.err
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    assert "error (rank 1): --shots 900" in out.err
    for method in RUNS:
        assert main(argv(method, tmp_path / f"{method}-1")) == 0
        one, two = tmp_path / f"{method}-1", tmp_path / f"{method}-2"
        # ProtoNet: the parameters and the BatchNorm running statistics (combined exactly).
        assert_close_weights(weights(one), weights(two))
        rows1, rows2 = ((r / METRICS).read_text().splitlines() for r in (one, two))
        assert len(rows1) == len(rows2) == 3  # rank 0 alone writes the log
        for a, b in zip(rows1, rows2):  # logged metrics are over the whole meta-batch
            a, b = json.loads(a), json.loads(b)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a.keys() == b.keys()
        results = json.loads((two / "results.json").read_text())
        assert results["processes"] == 2 and results["step"] == 3
        assert "processes: 2" in (two / "config.yaml").read_text()


def torchrun(args, world=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "fastadapt", *args]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after(proc, metrics, step, timeout=120):
    """SIGTERM to torchrun (as a scheduler or Ctrl-C would) once ``step`` iterations are logged."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    return proc.communicate(timeout=timeout)[0]


STEPS = 30


def _killed_run(tmp_path):
    run = tmp_path / "killed"
    args = argv("protonet", run, "--steps", str(STEPS), "--checkpoint-every", "1000")
    output = kill_after(torchrun(args), run / METRICS, 2)
    saved = load_checkpoint(run / CHECKPOINT)
    assert "the run is saved at iteration" in output, output[-2000:]
    assert saved["step"] < STEPS, "the run ended before it could be stopped"
    assert saved["processes"] == 2
    return run, args


def test_killed_distributed_run_resumes_in_one_process(tmp_path):
    run, args = _killed_run(tmp_path)
    # Every process stopped at the same iteration; rank 0 saved it; one process takes over.
    assert main(args) == 0
    assert main(argv("protonet", tmp_path / "straight", "--steps", str(STEPS), "--checkpoint-every", "1000")) == 0
    assert_close_weights(weights(tmp_path / "straight"), weights(run))
    assert [json.loads(line)["step"] for line in (run / METRICS).read_text().splitlines()] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_killed_distributed_run_resumes_with_two_processes(tmp_path):
    run, args = _killed_run(tmp_path)
    proc = torchrun(args)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-2000:]
    assert "resuming protonet" in output
    assert main(argv("protonet", tmp_path / "straight", "--steps", str(STEPS), "--checkpoint-every", "1000")) == 0
    assert_close_weights(weights(tmp_path / "straight"), weights(run))
