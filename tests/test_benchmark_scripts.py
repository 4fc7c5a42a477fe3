"""Benchmark scripts that must keep running where no GPU is: their --quick settings on the CPU."""

import importlib
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    common = importlib.import_module("_common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_gpu_time_to_accuracy_runs_quick_on_the_cpu(monkeypatch, tmp_path):
    script = _load("gpu_time_to_accuracy", monkeypatch, tmp_path)
    out = script.main(["--quick", "--device", "cpu", "--name", "ttq"])
    saved = json.loads((tmp_path / "ttq.json").read_text())
    assert set(saved["methods"]) == {"protonet", "maml"}
    for method, r in out["methods"].items():
        assert r["curve"], method  # accuracy against training time was recorded
        times = [c["train_seconds"] for c in r["curve"]]
        assert times == sorted(times)
        assert 0 <= r["final"]["accuracy"] <= 100
    assert saved["methods"]["maml"]["setting"]["batching"] == "loop"  # the CPU rule for convnets
