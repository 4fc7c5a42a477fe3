"""Benchmark scripts that must keep running where no GPU is: their --quick settings on the CPU."""

import importlib
import importlib.util
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


def test_every_fastadapt_name_a_benchmark_imports_exists():
    # Scripts that run elsewhere (the peers' environment, a GPU machine) are not run here, so a
    # moved module would only show there; every `from fastadapt... import ...` must resolve.
    import ast

    def spec(name):
        try:
            return importlib.util.find_spec(name)
        except ModuleNotFoundError:  # a parent package is missing
            return None

    missing = []
    for path in sorted(BENCHMARKS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastadapt"):
                module = importlib.import_module(node.module) if spec(node.module) else None
                for alias in node.names:
                    if module is None or not (hasattr(module, alias.name) or spec(f"{node.module}.{alias.name}")):
                        missing.append(f"{path.relative_to(BENCHMARKS)}: from {node.module} import {alias.name}")
    assert not missing, missing
