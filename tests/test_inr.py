"""Implicit neural representations: the image-function task family, Trans-INR, Learned Init and the
random-initialisation baseline, checked against hand computations and small training runs."""

import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastadapt as fa
from fastadapt.cli import main
from fastadapt.config import resolve
from fastadapt.data import build_task_source
from fastadapt.data.mnist import read_idx_images, split_indices
from fastadapt.engine.evaluate import evaluate
from fastadapt.errors import ConfigError, DataError
from fastadapt.methods.base import MetaLearner
from fastadapt.models.inr import INR, fourier_frequencies, inr_apply, inr_param_shapes
from fastadapt.tasks import Episode
from fastadapt.tasks.image_function import (ImageFunctionTasks, coordinate_grid, pixel_index, psnr,
                                            scatter_to_image)

DT = torch.float64
TINY_TRANSFORMER = dict(patch_size=4, trans_dim=16, trans_depth=1, heads=2, head_dim=8, ff_dim=32)


def smooth_images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """``uint8 [n, C, size, size]`` images of a random brightness plus a random low-frequency pattern
    (a few 2-D cosines)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = (0.25 + 0.5 * torch.rand(n, channels, 1, 1, generator=g)).expand(n, channels, size, size)
    for _ in range(3):
        fy, fx, phase = (torch.rand(n, channels, 1, 1, generator=g) * s for s in (3.0, 3.0, 6.3))
        amp = 0.15 * torch.rand(n, channels, 1, 1, generator=g)
        out = out + amp * torch.cos(fy * yy + fx * xx + phase)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


# --------------------------------------------------------------------------- the task family

def test_coordinates_are_pixel_centres_and_map_back_to_their_pixels():
    c = coordinate_grid(4, 4)
    assert c.shape == (16, 2)
    assert torch.allclose(c[0], torch.tensor([-0.75, -0.75])) and torch.allclose(c[5], torch.tensor([-0.25, -0.25]))
    assert torch.equal(pixel_index(coordinate_grid(5, 7), 5, 7), torch.arange(35))


def test_episodes_observe_all_or_a_random_subset_of_the_pixels():
    images = smooth_images(6, size=8, channels=3)
    full = ImageFunctionTasks(images)
    ep = full.sample_batch(torch.Generator().manual_seed(0), 3)
    assert ep.support_x.shape == (3, 64, 2) and ep.query_y.shape == (3, 64, 3) and ep.batched
    assert torch.equal(ep.support_y, ep.query_y)
    # the query set on the grid is the image itself
    one = full.sample(torch.Generator().manual_seed(1))
    assert any(torch.equal((scatter_to_image(one.query_x, one.query_y, (3, 8, 8)) * 255).round().byte(), im)
               for im in images)
    sparse = ImageFunctionTasks(images, support_fraction=0.25)
    ep = sparse.sample_batch(torch.Generator().manual_seed(0), 2)
    assert ep.support_x.shape == (2, 16, 2) and ep.query_x.shape == (2, 64, 2)
    for t in range(2):  # observed values are the image's values at the observed coordinates
        idx = pixel_index(ep.support_x[t], 8, 8)
        assert len(set(idx.tolist())) == 16
        assert torch.equal(ep.support_y[t], ep.query_y[t][idx])
    grid = scatter_to_image(ep.support_x[0], ep.support_y[0], (3, 8, 8), with_mask=True)
    assert grid.shape == (4, 8, 8) and int(grid[3].sum()) == 16
    with pytest.raises(ConfigError, match="--support-fraction"):
        ImageFunctionTasks(images, support_fraction=0.0)


def test_psnr_against_a_hand_computation():
    assert float(psnr(0.01)) == pytest.approx(20.0)
    assert torch.allclose(psnr(torch.tensor([1e-3, 0.25], dtype=DT)),
                          torch.tensor([30.0, -10 * math.log10(0.25)], dtype=DT))

    class Grey(MetaLearner):
        """Predicts 0.5 everywhere."""

        task_kind = "image_function"

        def adapt(self, sx, sy):
            return None

        def predict(self, adapted, x):
            return torch.full((x.shape[0], 1), 0.5)

    images = smooth_images(5, size=8, seed=3)
    source = ImageFunctionTasks(images)
    res = evaluate(Grey(), source, episodes=7, seed=4, progress=False)
    gen = torch.Generator().manual_seed(4)
    by_hand = []
    for _ in range(7):
        y = source.sample(gen).query_y.double()
        by_hand.append(10 * math.log10(1.0 / float(((y - 0.5) ** 2).mean())))
    mean = sum(by_hand) / 7
    sd = math.sqrt(sum((v - mean) ** 2 for v in by_hand) / 6)
    assert res["psnr"] == pytest.approx(mean, abs=1e-9)
    assert res["ci95"] == pytest.approx(1.96 * sd / math.sqrt(7), abs=1e-9)
    assert "psnr:" in fa.format_result(res) and "dB" in fa.format_result(res)


# --------------------------------------------------------------------------- the INR

def test_an_inr_fits_one_simple_image_to_high_psnr():
    torch.manual_seed(0)
    image = smooth_images(1, size=16, seed=1)[0]
    ep = ImageFunctionTasks(image[None]).sample(torch.Generator().manual_seed(0))
    net = INR(depth=3, width=32, out_dim=1, pe_dim=16, pe_sigma=8.0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.mse_loss(net(ep.support_x), ep.support_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(psnr(F.mse_loss(net(ep.query_x), ep.query_y))) > 35.0


def test_inr_apply_runs_one_network_or_a_batch_of_networks():
    shapes = inr_param_shapes(3, 8, 2, pe_dim=6)
    assert shapes == {"w0": (12, 8), "b0": (8,), "w1": (8, 8), "b1": (8,), "w2": (8, 2), "b2": (2,)}
    params = {k: torch.randn(3, *s, dtype=DT) for k, s in shapes.items()}
    x = torch.rand(3, 5, 2, dtype=DT) * 2 - 1
    freqs = fourier_frequencies(6, 4.0, dtype=DT)
    batched = inr_apply(params, x, freqs)
    for i in range(3):
        assert torch.allclose(batched[i], inr_apply({k: v[i] for k, v in params.items()}, x[i], freqs))


# --------------------------------------------------------------------------- Trans-INR

@pytest.mark.parametrize("depth, width, n_groups, shape", [
    (1, 8, 4, (3, 12, 12)),     # one layer: the output layer alone, min(4, 3) = 3 tokens
    (2, 16, 16, (1, 10, 10)),   # 10 px with 4 px patches: padded to 12 (9 patch tokens)
    (3, 32, 8, (3, 8, 8)),      # 4 columns per token
    (5, 24, 64, (3, 12, 12)),   # more groups than columns: one token per column
])
def test_trans_inr_predicts_the_weights_of_any_inr_shape(depth, width, n_groups, shape):
    torch.manual_seed(0)
    model = fa.TransINR(shape, inr_depth=depth, inr_width=width, pe_dim=8, n_groups=n_groups, **TINY_TRANSFORMER)
    c = shape[0]
    expected = inr_param_shapes(depth, width, c, pe_dim=8)
    assert model.weights.num_tokens == sum(min(n_groups, s[1]) for k, s in expected.items() if k.startswith("w"))
    images = smooth_images(3, size=shape[1], channels=c)
    ep = ImageFunctionTasks(images).sample_batch(torch.Generator().manual_seed(0), 3)
    params = model.predict_weights(ep.support_x, ep.support_y)
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: (3, *s) for k, s in expected.items()}
    assert model.render(params, ep.query_x).shape == (3, shape[1] * shape[2], c)
    for i in range(depth):
        w, base = params[f"w{i}"], model.weights.base[f"w{i}"]
        assert torch.allclose(w.norm(dim=1), torch.ones(3, w.shape[2]), atol=1e-5)  # unit columns
        g = min(n_groups, w.shape[2])
        ratio = F.normalize(w / base, dim=1)  # the token's modulation vector of each column
        for j in range(g, w.shape[2]):  # column j shares the token of column j mod g
            assert torch.allclose(ratio[:, :, j], ratio[:, :, j % g], atol=1e-4)
        assert torch.equal(params[f"b{i}"], model.weights.base[f"b{i}"].expand(3, -1))
    # a single image adapts to unbatched weights that give the same output
    adapted = model.adapt(ep.support_x[0], ep.support_y[0])
    torch.testing.assert_close(model.predict(adapted, ep.query_x[0]), model.render(params, ep.query_x)[0])


def test_trans_inr_refuses_groups_that_do_not_divide_a_layer():
    with pytest.raises(ConfigError, match="--n-groups 5 must divide"):
        fa.TransINR((1, 8, 8), inr_width=16, n_groups=5, **TINY_TRANSFORMER)


def test_test_time_optimisation_fits_the_observed_pixels_better():
    torch.manual_seed(0)
    model = fa.TransINR((1, 8, 8), inr_depth=2, inr_width=16, pe_dim=8, tto_steps=20, tto_lr=1e-2,
                        **TINY_TRANSFORMER)
    ep = ImageFunctionTasks(smooth_images(1, size=8)).sample(torch.Generator().manual_seed(0))
    predicted = {k: v[0] for k, v in model.predict_weights(ep.support_x[None], ep.support_y[None]).items()}
    refined = model.adapt(ep.support_x, ep.support_y)
    before = F.mse_loss(model.predict(predicted, ep.support_x), ep.support_y)
    after = F.mse_loss(model.predict(refined, ep.support_x), ep.support_y)
    assert float(after.detach()) < 0.5 * float(before.detach())


def block_images(n: int, size: int = 16, blocks: int = 2, seed: int = 0) -> torch.Tensor:
    """``uint8 [n, 1, size, size]`` images of ``blocks`` x ``blocks`` squares of random grey levels:
    a fit of the mean (what a few gradient steps from a random start reach) leaves most of the error."""
    levels = torch.rand(n, 1, blocks, blocks, generator=torch.Generator().manual_seed(seed))
    images = levels.repeat_interleave(size // blocks, -1).repeat_interleave(size // blocks, -2)
    return (images * 255).round().to(torch.uint8)


def test_briefly_trained_trans_inr_beats_random_init_on_held_out_images():
    torch.manual_seed(0)
    train = ImageFunctionTasks(block_images(512, seed=0), "train")
    test = ImageFunctionTasks(block_images(64, seed=1), "test")
    cfg = {"dataset": "builtin-images", "inr_depth": 3, "inr_width": 32, "pe_dim": 16, "pe_sigma": 8.0}
    model = fa.TransINR.from_config({**cfg, **TINY_TRANSFORMER, "trans_dim": 64, "trans_depth": 2, "heads": 4,
                                     "head_dim": 16, "ff_dim": 128}, train.in_shape)
    fa.meta_train(model, train, fa.TrainSettings(steps=300, meta_batch=8, lr=1e-3, progress=False))
    trained = evaluate(model, test, episodes=40, seed=0, progress=False)["psnr"]
    torch.manual_seed(0)
    baseline = fa.RandomInit.from_config({**cfg, "inner_steps": 2, "inner_lr": 0.3}, train.in_shape)
    random = evaluate(baseline, test, episodes=40, seed=0, progress=False)["psnr"]
    # about 20.9 dB against 13.3 dB on this machine
    assert trained > random + 4.0, (trained, random)


# --------------------------------------------------------------------------- Learned Init

def _hand_meta_grads(model, batch, steps, lr, second_order):
    """Mean query MSE after ``steps`` SGD steps per task, unrolled by hand, and its gradients."""
    params = dict(model.named_parameters())
    names = list(params)
    freqs = model.freqs.to(DT)
    total = 0.0
    fitted = []
    for t in range(batch.num_tasks):
        p = dict(params)
        for _ in range(steps):
            loss = F.mse_loss(inr_apply(p, batch.support_x[t], freqs), batch.support_y[t])
            grads = torch.autograd.grad(loss, [p[k] for k in names], create_graph=second_order)
            p = {k: p[k] - lr * (g if second_order else g.detach()) for k, g in zip(names, grads)}
        fitted.append(p)
        total = total + F.mse_loss(inr_apply(p, batch.query_x[t], freqs), batch.query_y[t])
    total = total / batch.num_tasks
    return dict(zip(names, torch.autograd.grad(total, [params[k] for k in names]))), fitted


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_init_inner_loop_equals_a_hand_unroll(batching, first_order):
    torch.manual_seed(0)
    model = INR(depth=3, width=8, out_dim=3, pe_dim=6, pe_sigma=4.0).to(DT)
    learner = fa.LearnedInit(model, inner_steps=2, inner_lr=0.3, first_order=first_order, batching=batching)
    source = ImageFunctionTasks(smooth_images(4, size=6, channels=3), support_fraction=0.5)
    batch = source.sample_batch(torch.Generator().manual_seed(0), 3)
    batch = Episode(*(t.to(DT) for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    want, fitted = _hand_meta_grads(model, batch, 2, 0.3, second_order=not first_order)
    loss, metrics = learner.meta_loss(batch)
    loss.backward()
    for k, g in want.items():
        torch.testing.assert_close(learner.model.get_parameter(k).grad, g, rtol=1e-10, atol=1e-12)
    assert set(metrics) == {"loss", "mse", "psnr"}
    adapted = learner.adapt(batch.support_x[1], batch.support_y[1])
    for k, v in fitted[1].items():
        torch.testing.assert_close(adapted[k], v.detach(), rtol=1e-10, atol=1e-12)


def test_random_init_changes_nothing_when_trained():
    cfg = resolve("random-init", None, {"dataset": "builtin-images", "image_size": 12})
    source = build_task_source(cfg, "train", 1, 1, 1)
    learner = fa.RandomInit.from_config(cfg, source.in_shape)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    metrics = learner.train_step(source.sample_batch(torch.Generator().manual_seed(0), 2), opt, 1)
    assert "psnr" in metrics
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_image_methods_and_other_datasets_refuse_each_other():
    for cls in (fa.TransINR, fa.LearnedInit, fa.RandomInit):
        cfg = resolve(cls.name, None, {"dataset": "builtin"})
        with pytest.raises(ConfigError, match="needs an image-function dataset.*cifar10-images"):
            cls.from_config(cfg, (1, 28, 28))
    with pytest.raises(ConfigError, match="maml does not handle 'image_function' tasks"):
        fa.MAML.from_config(resolve("maml", None, {"dataset": "builtin-images"}), (1, 28, 28))


# --------------------------------------------------------------------------- data and splits

def write_idx(path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, rows, cols) + images.astype(np.uint8).tobytes())


def test_mnist_idx_reader_and_the_test_file_split(tmp_path):
    images = np.arange(20 * 4 * 4).reshape(20, 4, 4) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    assert torch.equal(read_idx_images(tmp_path / "t10k-images-idx3-ubyte.gz")[:, 0], torch.from_numpy(images).byte())
    idx = split_indices(20)
    assert sorted(idx["train"].tolist() + idx["test"].tolist()) == list(range(20))
    assert idx["test"].tolist() == [4, 9, 14, 19]
    cfg = {"dataset": "mnist-images", "data_dir": str(tmp_path), "image_size": 4}
    train, test = (build_task_source(cfg, s, 1, 1, 1) for s in ("train", "test"))
    assert (len(train), len(test)) == (16, 4) and train.id_space == test.id_space
    assert not set(train.ids.tolist()) & set(test.ids.tolist())
    assert torch.equal(test.images[:, 0], torch.from_numpy(images[[4, 9, 14, 19]]).byte())
    # with the official training file, the official split
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:7])
    from fastadapt.data.mnist import mnist_splits

    mnist_splits.cache_clear()
    assert len(build_task_source(cfg, "train", 1, 1, 1)) == 7 and len(build_task_source(cfg, "test", 1, 1, 1)) == 20
    mnist_splits.cache_clear()


def test_mnist_reader_refuses_damaged_files(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 10, 28, 28) + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx_images(bad)
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">IIII", 0x801, 10, 28, 28))
    with pytest.raises(DataError, match="not an IDX image file"):
        read_idx_images(bad)
    with pytest.raises(DataError, match="no t10k-images"):
        build_task_source({"dataset": "mnist-images", "data_dir": str(tmp_path / "none")}, "train", 1, 1, 1)


def test_builtin_image_splits_are_disjoint():
    cfg = {"dataset": "builtin-images", "image_size": 28}
    ids = {s: set(build_task_source(cfg, s, 1, 1, 1).ids.tolist()) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    assert (len(ids["train"]), len(ids["test"])) == (20000, 6000)


@pytest.mark.shared_data
def test_real_mnist_and_omniglot_image_splits_are_disjoint(shared_data):
    mnist = {"dataset": "mnist-images", "data_dir": str(shared_data / "mnist")}
    train, test = (build_task_source(mnist, s, 1, 1, 1) for s in ("train", "test"))
    assert (len(train), len(test)) == (8000, 2000) and not set(train.ids.tolist()) & set(test.ids.tolist())
    omni = {"dataset": "omniglot-images", "data_dir": str(shared_data / "omniglot"), "progress": False}
    train, test = (build_task_source(omni, s, 1, 1, 1) for s in ("train", "test"))
    assert (len(train), len(test)) == (1028 * 20, 423 * 20) and not set(train.ids.tolist()) & set(test.ids.tolist())
    assert train.in_shape == (1, 28, 28)


@pytest.mark.slow
@pytest.mark.shared_data
def test_cifar10_images_use_the_official_splits(shared_data):
    cfg = {"dataset": "cifar10-images", "data_dir": str(shared_data / "cifar10"), "progress": False, "image_size": 16}
    train, test = (build_task_source(cfg, s, 1, 1, 1) for s in ("train", "test"))
    assert (len(train), len(test)) == (50000, 10000) and train.in_shape == (3, 16, 16)
    assert train.id_space != test.id_space  # two different archives


# --------------------------------------------------------------------------- command line

TINY = ["--dataset", "builtin-images", "--image-size", "12", "--steps", "2", "--meta-batch", "2", "--eval-episodes",
        "3", "--inr-depth", "2", "--inr-width", "8", "--pe-dim", "4", "--no-progress"]


@pytest.mark.parametrize("method, extra", [
    ("trans-inr", ["--trans-dim", "8", "--trans-depth", "1", "--heads", "1", "--head-dim", "8", "--ff-dim", "8",
                   "--n-groups", "4"]),
    ("learned-init", ["--inner-lr", "0.1"]),
    ("random-init", ["--inner-optim", "adam"]),
])
def test_train_then_eval_prints_psnr_and_writes_a_grid(method, extra, tmp_path, capsys):
    run = tmp_path / method
    assert main(["train", method, *TINY, *extra, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "12x12 images (1 channel), all pixels observed" in out and "psnr:" in out and "dB" in out
    assert (run / "reconstructions-test.png").is_file()
    js = tmp_path / "eval.json"
    assert main(["eval", str(run), "--episodes", "4", "--support-fraction", "0.5", "--json", str(js),
                 "--no-progress"]) == 0
    res = json.loads(js.read_text())
    assert res["episodes"] == 4 and res["ci95"] >= 0 and math.isfinite(res["psnr"])
    assert res["support_fraction"] == 0.5 and res["image_size"] == 12 and "ways" not in res
    grid = tmp_path / method / "reconstructions-test-support0.5.png"
    assert grid.is_file() and grid.stat().st_size < 1_000_000 and res["grid"] == str(grid)
    assert "(ground truth | observed | " in capsys.readouterr().out


def test_an_interrupted_trans_inr_run_resumes_to_the_same_weights(tmp_path):
    source = ImageFunctionTasks(smooth_images(32, size=8), "train")

    def learner():
        torch.manual_seed(0)
        return fa.TransINR(source.in_shape, inr_depth=2, inr_width=8, pe_dim=4, n_groups=4, **TINY_TRANSFORMER)

    def settings(steps):
        return fa.TrainSettings(steps=steps, meta_batch=2, lr=1e-3, checkpoint_every=0, progress=False)

    whole = learner()
    fa.meta_train(whole, source, settings(6), tmp_path / "whole")
    parts = learner()
    fa.meta_train(parts, source, settings(3), tmp_path / "parts")
    resumed = learner()  # a fresh process would rebuild it from scratch, then load the checkpoint
    fa.meta_train(resumed, source, settings(6), tmp_path / "parts")
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_default_run_folder_of_an_image_function_run_names_the_image_size():
    from fastadapt.config import default_run_dir

    cfg = resolve("trans-inr", None, {"dataset": "cifar10-images"})
    assert str(default_run_dir(cfg)) == "runs/trans-inr-cifar10-images-32px-seed0"

