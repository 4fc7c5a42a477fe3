"""Progress where stderr is not a terminal (logs, CI, nohup): plain lines every few seconds."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

import fastadapt.progress as progress
from fastadapt.cli import main
from fastadapt.errors import ConfigError
from fastadapt.progress import progress_bar


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress, "_clock", c)
    return c


def test_lines_every_interval_with_postfix_rate_and_time_left(clock, monkeypatch, capsys):
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "10")
    bar = progress_bar(total=10, desc="meta-train maml")
    for _ in range(10):
        clock.now += 4.0
        bar.update(1)
        bar.set_postfix({"loss": "1.250", "accuracy": "40.000"})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    # a line at 12 s (step 3), 24 s (step 6), 36 s (step 9), and a last one at the end
    assert len(lines) == 4, lines
    assert lines[0].startswith("meta-train maml: 3/10 it (30%)")
    assert "loss=1.250" in lines[1] and "accuracy=40.000" in lines[1]
    assert "0.25 it/s" in lines[0] and "elapsed 00:12" in lines[0] and "left 00:28" in lines[0]
    assert lines[-1].startswith("meta-train maml: 10/10 it (100%)") and "elapsed 00:40" in lines[-1]


def test_short_work_and_disabled_progress_print_nothing(clock, monkeypatch, capsys):
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "10")
    for _ in progress_bar(range(5), desc="short"):  # done within the interval: silent
        clock.now += 1.0
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "0.001")
    for _ in progress_bar(range(5), enabled=False, desc="off"):
        clock.now += 1.0
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "0")  # 0: no lines
    for _ in progress_bar(range(5), desc="zero"):
        clock.now += 100.0
    assert capsys.readouterr().err == ""


def test_iterating_counts_items_and_total_comes_from_len(clock, monkeypatch, capsys):
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "5")
    seen = []
    for i in progress_bar(list(range(4)), desc="eval", unit="episode"):
        seen.append(i)
        clock.now += 3.0
    assert seen == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("eval: 2/4 episode (50%)") and "episode/s" in lines[0]
    assert lines[-1].startswith("eval: 4/4 episode (100%)")


def test_byte_counts_are_scaled(clock, monkeypatch, capsys):
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "1")
    with progress_bar(total=4_000_000, unit="B", unit_scale=True, desc="archive.tar.gz") as bar:
        clock.now += 2.0
        bar.update(1_000_000)
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith("archive.tar.gz: 1.00M/4.00M B (25%)") and "500k B/s" in line


def test_bad_interval_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "often")
    with pytest.raises(ConfigError, match="FASTADAPT_PROGRESS_SECONDS='often'"):
        progress_bar(total=3)


def test_image_decoding_shows_progress_in_logs(tmp_path, monkeypatch, capsys):
    from fastadapt.data.images import load_images

    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "1e-9")
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((10, 10), 40 * i, dtype=np.uint8)).save(paths[-1])
    load_images(paths, 8, "L", desc="decoding test images")
    assert "decoding test images: 3/3 image (100%)" in capsys.readouterr().err
    load_images(paths, 8, "L", desc="decoding test images", progress=False)
    assert capsys.readouterr().err == ""


def _cifar_jpg_archive(path, split="test", per_class=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for c, name in enumerate(("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(np.full((32, 32, 3), 20 * c + i, dtype=np.uint8)).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"{split}/{name}/{i}.jpg")
                info.size = len(buf.getvalue())
                buf.seek(0)
                tar.addfile(info, buf)


def test_cifar10_decoding_shows_progress_in_logs(tmp_path, monkeypatch, capsys):
    from fastadapt.data.cifar10 import load_cifar10

    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "1e-9")
    _cifar_jpg_archive(tmp_path / "cifar10-jpg-test.tar.gz")
    images, labels = load_cifar10("test", tmp_path, progress=False)
    assert images.shape == (20, 3, 32, 32) and capsys.readouterr().err == ""
    _cifar_jpg_archive(tmp_path / "b" / "cifar10-jpg-test.tar.gz", per_class=3)  # another archive: not cached
    load_cifar10("test", tmp_path / "b")
    assert "decoding CIFAR-10 test" in capsys.readouterr().err


def test_cli_training_prints_progress_lines_unless_no_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTADAPT_PROGRESS_SECONDS", "1e-9")
    args = ["train", "protonet", "--ways", "3", "--shots", "1", "--queries", "2", "--steps", "3",
            "--eval-episodes", "2", "--log-every", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "meta-train protonet: 3/3 it (100%), loss=" in err and "test: 2/2" in err
    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
