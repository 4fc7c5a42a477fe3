"""CIFAR-10 loading (JPEG tar, official archive, download), the ResNets, and the tta CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastadapt.data import cifar10 as C10
from fastadapt.errors import ConfigError, DataError
from fastadapt.models.resnet_cifar import ResNetCifar, build_resnet_cifar
from fastadapt.cli import main as tta_main


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTADAPT_CACHE", str(tmp_path / "cache"))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_jpg_archive(folder: Path, split: str, per_class: int, seed: int = 0) -> dict:
    """A miniature ``cifar10-jpg-<split>.tar.gz``: flat-coloured images, colour encodes the index."""
    rng = np.random.default_rng(seed)
    colours = {}
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / f"cifar10-jpg-{split}.tar.gz", "w:gz") as tar:
        for ci in rng.permutation(10):  # archive order is not class order
            for k in range(per_class):
                col = rng.integers(20, 235, size=3)
                arr = np.broadcast_to(col.astype(np.uint8), (32, 32, 3)).copy()
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, "JPEG", quality=95)
                _add(tar, f"{split}/{C10.CLASSES[ci]}/{k:04d}.jpg", buf.getvalue())
                colours[(int(ci), k)] = col
    return colours


def test_jpg_archive_is_read_in_class_order_and_cached(tmp_path):
    colours = make_jpg_archive(tmp_path / "d", "test", 3)
    x, y = C10.load_cifar10("test", tmp_path / "d")
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == sum([[c] * 3 for c in range(10)], [])
    for i in range(30):
        ref = torch.tensor(colours[(int(y[i]), i % 3)], dtype=torch.float32)
        assert (x[i].float().mean(dim=(1, 2)) - ref).abs().max() < 4  # JPEG is lossy
    assert len(list((tmp_path / "cache" / "cifar10").glob("jpg-test-*.u8"))) == 1
    x2, y2 = C10.load_cifar10("test", tmp_path / "d")
    assert torch.equal(x, x2) and torch.equal(y, y2)


def _official_archive(folder: Path, payload=None) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / C10.OFFICIAL_NAME
    with tarfile.open(path, "w:gz") as tar:
        for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
            batch = payload if payload is not None else {
                b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                b"labels": list(rng.integers(0, 10, size=n).tolist())}
            _add(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch))
    return path


def test_official_archive_without_extraction(tmp_path):
    path = _official_archive(tmp_path / "o")
    with tarfile.open(path) as tar:
        ref = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"))
    x, y = C10._decode_official_tar(path, "test")
    assert torch.equal(x, torch.from_numpy(ref[b"data"].reshape(-1, 3, 32, 32)))
    assert y.tolist() == ref[b"labels"]
    xt, _ = C10._decode_official_tar(path, "train")
    assert xt.shape == (20, 3, 32, 32)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [C10.OFFICIAL_NAME]  # nothing extracted


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_official_archive_refuses_code_in_pickles(tmp_path):
    path = _official_archive(tmp_path / "e", payload={b"data": _Evil(), b"labels": []})
    with pytest.raises(DataError, match="refusing"):
        C10._decode_official_tar(path, "test")


def test_download_is_checked_and_atomic(tmp_path, monkeypatch):
    src = _official_archive(tmp_path / "server")
    monkeypatch.setattr(C10, "OFFICIAL_URL", src.as_uri())
    monkeypatch.setattr(C10, "OFFICIAL_MD5", "0" * 32)
    with pytest.raises(DataError, match="md5"):
        C10.download_official(tmp_path / "dl", progress=False)
    assert list((tmp_path / "dl").iterdir()) == []  # no partial file left behind
    monkeypatch.setattr(C10, "OFFICIAL_MD5", hashlib.md5(src.read_bytes()).hexdigest())
    got = C10.download_official(tmp_path / "dl", progress=False)
    assert got.read_bytes() == src.read_bytes()


def test_missing_or_bad_data_is_a_data_error(tmp_path):
    with pytest.raises(DataError):
        C10.load_cifar10("test", tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar10-jpg-test.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError):
        C10.load_cifar10("test", tmp_path / "bad")
    with pytest.raises(ConfigError):
        C10.load_cifar10("val", tmp_path / "bad")


@pytest.mark.shared_data
def test_real_cifar10_test_split(shared_data):
    x, y = C10.load_cifar10("test", shared_data / "cifar10")
    assert x.shape == (10000, 3, 32, 32) and torch.equal(y.bincount(), torch.full((10,), 1000))


# ------------------------------------------------------------------------------------ models

def test_resnets_shapes_and_depths():
    m = build_resnet_cifar("resnet26", rotation_head=True)
    assert len(m.trunk[2]) == 4 and len(m.trunk[3]) == 4 and len(m.head[0]) == 4
    x = torch.rand(2, 3, 32, 32)
    assert m(x).shape == (2, 10) and m.forward_rotation(x).shape == (2, 4)
    small = build_resnet_cifar("resnet8", norm="gn")
    assert small(x).shape == (2, 10)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in small.modules())
    with pytest.raises(ConfigError):
        ResNetCifar(depth=10)
    from fastadapt.models import build_backbone

    emb = build_backbone("resnet8", (1, 28, 28))  # registered backbones are embedding networks
    assert emb(torch.rand(3, 1, 28, 28)).shape == (3, emb.out_features) == (3, 64)
    with pytest.raises(ConfigError, match="rotation head"):
        small.forward_rotation(x)


# --------------------------------------------------------------------------------------- CLI

def test_cli_train_source_then_eval(tmp_path, capsys):
    make_jpg_archive(tmp_path / "d", "train", 6, seed=1)
    make_jpg_archive(tmp_path / "d", "test", 2, seed=2)
    run = tmp_path / "run"
    rc = tta_main(["tta", "train-source", "--data-dir", str(tmp_path / "d"), "--arch", "resnet8", "--rotation-head",
                   "--epochs", "1", "--batch-size", "16", "--out", str(run), "--no-progress"])
    assert rc == 0 and (run / "checkpoint.pt").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["rotation_head"] is True
    out = capsys.readouterr().out
    assert "clean test error" in out
    js = tmp_path / "r.json"
    rc = tta_main(["tta", "eval", str(run), "--method", "tent", "--corruption", "contrast", "--severity", "3",
                   "--batch-size", "8", "--json", str(js), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "contrast" in out and "±" in out and "ms/batch" in out
    res = json.loads(js.read_text())["results"][0]
    assert res["images"] == 20 and res["method"] == "tent" and res["severity"] == 3
    cost = res["cost_context"]  # every cost figure says on how many threads and under what load
    assert cost["threads"] == torch.get_num_threads() and cost["cpu_count"] == os.cpu_count()
    assert len(cost["load_avg"]) == 3 and len(cost["load_avg_at_start"]) == 3
    rc = tta_main(["tta", "eval", str(run), "--method", "ttt-online", "--corruption", "pixelate", "--max-images", "3",
                   "--copies", "4", "--no-progress"])
    assert rc == 0 and "3 images" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = tta_main(["tta", "eval", str(tmp_path / "none"), "--method", "bn", "--corruption", "fog"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        tta_main(["tta", "eval", str(tmp_path), "--method", "bn", "--severity", "7"])


# ------------------------------------------------------------------------- train-source outputs

def _train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["tta", "train-source", "--data-dir", str(data), "--arch", "resnet8", "--rotation-head",
            "--batch-size", "16", "--log-every", "1", "--out", str(run), "--no-progress", *extra]


def test_cli_train_source_writes_the_files_of_fastadapt_train(tmp_path, capsys):
    make_jpg_archive(tmp_path / "d", "train", 6, seed=1)
    make_jpg_archive(tmp_path / "d", "test", 2, seed=2)
    run = tmp_path / "run"
    assert tta_main(_train_args(tmp_path / "d", run, "--epochs", "2")) == 0
    assert "results.json" in capsys.readouterr().out
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoint.pt", "metrics.jsonl",
                                              "learning_curve.png", "results.json"}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["batch_size"] == 16 and cfg["lr"] == 0.1 and cfg["momentum"] == 0.9
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # 60 images / 16 = 3 iterations per epoch
    assert all(0 <= r["acc"] <= 1 and r["rot_loss"] > 0 and r["loss"] > r["rot_loss"] for r in rows)
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["clean_test_error"] <= 100 and res["test_images"] == 20 and res["train_seconds"] > 0
    assert res["cost_context"]["threads"] == torch.get_num_threads() and "load_avg" in res["cost_context"]


def test_train_source_stopped_mid_epoch_resumes_to_the_same_run(tmp_path):
    from fastadapt.tta.train_source import DEFAULTS, load_source_model, saved_progress, train_source

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (48,), generator=g)
    cfg = {**DEFAULTS, "rotation_head": True, "epochs": 2, "batch_size": 16, "log_every": 1}
    train_source(cfg, tmp_path / "whole", x, y, progress=False)
    calls = []
    with pytest.raises(KeyboardInterrupt):
        train_source(cfg, tmp_path / "cut", x, y, progress=False, stop=lambda: calls.append(1) or len(calls) == 2)
    assert saved_progress(tmp_path / "cut") == {"epoch": 0, "step": 2, "iteration": 2, "steps_per_epoch": 3,
                                                "epochs": 2}
    train_source(cfg, tmp_path / "cut", x, y, progress=False)
    a, _ = load_source_model(tmp_path / "whole")
    b, _ = load_source_model(tmp_path / "cut")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "train_seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")


def test_ctrl_c_during_train_source_says_where_the_run_was_saved(tmp_path, capsys, monkeypatch):
    import signal

    from fastadapt.tta import train_source as TS

    make_jpg_archive(tmp_path / "d", "train", 6, seed=1)
    make_jpg_archive(tmp_path / "d", "test", 2, seed=2)
    run = tmp_path / "run"
    crop, calls = TS.random_crop_flip, []

    def crop_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 5:  # during the second iteration of the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return crop(*a, **k)

    monkeypatch.setattr(TS, "random_crop_flip", crop_then_ctrl_c)
    try:
        rc = tta_main(_train_args(tmp_path / "d", run, "--epochs", "2"))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped 'tta train-source' without saying what was saved")
    err = capsys.readouterr().err
    assert rc == 130 and "in epoch 2 of 2 after iteration 2 of 3 (iteration 5 in all)" in err
    assert "resume" in err and "checkpointed" not in err
    assert TS.saved_progress(run)["iteration"] == 5 and (run / "learning_curve.png").is_file()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(C10, "load_cifar10", ctrl_c)
    rc = tta_main(_train_args(tmp_path / "d", tmp_path / "fresh", "--epochs", "2"))
    assert rc == 130 and "nothing was saved yet" in capsys.readouterr().err


# ------------------------------------------------------------------ tta eval: frost, partial results

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A one-epoch ResNet-8 source run with a rotation head on miniature CIFAR-10 archives."""
    root = tmp_path_factory.mktemp("tiny")
    make_jpg_archive(root / "d", "train", 6, seed=1)
    make_jpg_archive(root / "d", "test", 2, seed=2)
    assert tta_main(_train_args(root / "d", root / "run", "--epochs", "1")) == 0
    return root / "run"


@pytest.fixture
def no_frost(monkeypatch):
    from fastadapt.tta import corruptions as C

    def missing(frost_dir):
        raise DataError("frost needs the frost photographs frost1.png ... frost5.jpg: pip install --no-deps "
                        "imagecorruptions, or set FASTADAPT_FROST_DIR to a folder holding them")

    monkeypatch.setattr(C, "_frost_dir", missing)


def _eval_args(run: Path, *extra: str) -> list[str]:
    return ["tta", "eval", str(run), "--method", "source", "--max-images", "4", "--batch-size", "4",
            "--no-progress", *extra]


def test_eval_all_without_frost_photographs_skips_frost_up_front(tiny_run, tmp_path, capsys, no_frost):
    from fastadapt.tta.corruptions import CORRUPTIONS

    js = tmp_path / "all.json"
    assert tta_main(_eval_args(tiny_run, "--corruption", "all", "--json", str(js))) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: skipping frost") and err.count("\n") == 1 and "imagecorruptions" in err
    doc = json.loads(js.read_text())
    assert [r["corruption"] for r in doc["results"]] == [c for c in CORRUPTIONS if c != "frost"]
    assert doc["complete"] is True and list(doc["skipped"]) == ["frost"]
    assert "mean error over 14 corruptions (frost skipped)" in out


def test_eval_frost_by_name_without_photographs_fails_before_any_work(tmp_path, capsys, no_frost):
    rc = tta_main(_eval_args(tmp_path / "no-such-run", "--corruption", "frost"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: frost needs the frost photographs") and err.count("\n") == 1


def _fail_on_second_corruption(monkeypatch, exc: BaseException) -> None:
    from fastadapt.tta import evaluate as tta_eval

    real, calls = tta_eval.corrupt_dataset, []

    def corrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(tta_eval, "corrupt_dataset", corrupt)


def test_eval_saves_each_finished_corruption_so_a_failure_keeps_it(tiny_run, tmp_path, capsys, monkeypatch,
                                                                  no_frost):
    _fail_on_second_corruption(monkeypatch, DataError("disk full"))
    js = tmp_path / "partial.json"
    rc = tta_main(_eval_args(tiny_run, "--corruption", "all", "--json", str(js)))
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and err[-1].startswith("error: disk full") and f"saved in {js}" in err[-1]
    doc = json.loads(js.read_text())
    assert doc["complete"] is False and [r["corruption"] for r in doc["results"]] == ["gaussian_noise"]


def test_ctrl_c_during_eval_claims_no_checkpoint_and_keeps_finished_results(tiny_run, tmp_path, capsys,
                                                                         monkeypatch, no_frost):
    from fastadapt.cli import main as fastadapt_main

    _fail_on_second_corruption(monkeypatch, KeyboardInterrupt())
    js = tmp_path / "stopped.json"
    rc = fastadapt_main(_eval_args(tiny_run, "--corruption", "all", "--json", str(js)))
    err = capsys.readouterr().err
    assert rc == 130 and "checkpoint" not in err and f"the 1 finished corruption(s) are saved in {js}" in err
    assert [r["corruption"] for r in json.loads(js.read_text())["results"]] == ["gaussian_noise"]


# ------------------------------------------------------------------------------- the benchmark

def _benchmark():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tta_cifar10c.py"
    spec = importlib.util.spec_from_file_location("tta_cifar10c_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_records_load_and_threads_and_tests_differences_to_the_source(tiny_run, tmp_path, capsys):
    from fastadapt.measure.stats import mean_ci95
    from fastadapt.tta.evaluate import unpack_wrong

    bench, threads = _benchmark(), torch.get_num_threads()
    out = tmp_path / "bench.json"
    common = ["--run", str(tiny_run), "--methods", "source,bn,ttt", "--corruptions", "contrast,pixelate",
              "--ttt-corruptions", "contrast", "--threads", "1", "--out", str(out)]
    try:
        assert bench.main(common + ["--ttt-images", "2", "--budget", "1e-9"]) == 0
        assert "budget: 5 cell(s) not started" in capsys.readouterr().out
        assert bench.main(common + ["--ttt-images", "2"]) == 0
        text = capsys.readouterr().out
        first = json.loads(out.read_text())
        assert bench.main(common + ["--ttt-images", "3"]) == 0  # only TTT's cells are redone
        capsys.readouterr()
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(out.read_text())
    assert doc["results"]["bn"] == first["results"]["bn"] and doc["results"]["source"] == first["results"]["source"]
    machine = doc["machine"]
    assert machine["threads"] == 1 and len(machine["load_avg_before"]) == 3 and len(machine["load_avg_after"]) == 3
    cells = [c for m in doc["results"].values() for c in m.values()]
    assert len(cells) == 5 and all(c["cost_context"]["threads"] == 1 for c in cells)
    assert list(doc["results"]["ttt"]) == ["contrast"] and doc["results"]["ttt"]["contrast"]["images"] == 3
    # TTT against the source on the same 3 images: paired per image
    ttt, src = doc["results"]["ttt"]["contrast"], doc["source_on_same_images"]["ttt"]["contrast"]
    assert src["images"] == 3 and src["method"] == "source"
    d = [100.0 * (a - b) for a, b in zip(unpack_wrong(ttt["wrong_bits"], 3), unpack_wrong(src["wrong_bits"], 3))]
    mean, half = mean_ci95(d)
    got = doc["difference_to_source"]["ttt"]["contrast"]
    assert got["difference"] == pytest.approx(mean, abs=1e-3) and got["ci95"] == pytest.approx(half, abs=1e-3)
    assert got["significant"] == (abs(mean) > half)
    # BN: 20 images are a single batch of 128, so there is no batch-level interval
    assert doc["difference_to_source"]["bn"]["pixelate"]["significant"] is None
    assert "bn" in text and "no CI (single batch)" in text
    assert "significant" in text and "load average before" in text
