import pytest
import torch

from fastadapt.errors import ConfigError
from fastadapt.tasks import ClassPool, Episode, EpisodeSampler

from conftest import make_pool


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    raw = (x[:, 0, 0, :2] * 255).round().long()
    return [(int(c), int(i)) for c, i in raw]


def test_shapes_labels_and_disjoint_sets():
    sampler = EpisodeSampler(make_pool(), ways=5, shots=3, queries=4)
    ep = sampler.sample(torch.Generator().manual_seed(1))
    assert ep.support_x.shape == (15, 1, 8, 8) and ep.query_x.shape == (20, 1, 8, 8)
    assert ep.support_x.dtype == torch.float32 and float(ep.support_x.max()) <= 1.0
    assert ep.support_y.tolist() == [k for k in range(5) for _ in range(3)]
    assert ep.query_y.tolist() == [k for k in range(5) for _ in range(4)]
    support, query = decode(ep.support_x), decode(ep.query_x)
    assert not set(support) & set(query), "support and query images must be distinct"
    assert len(set(support)) == 15 and len(set(query)) == 20
    # Every label maps to exactly one source class, the same in support and query.
    for k in range(5):
        s_cls = {c for (c, _), y in zip(support, ep.support_y.tolist()) if y == k}
        q_cls = {c for (c, _), y in zip(query, ep.query_y.tolist()) if y == k}
        assert len(s_cls) == 1 and s_cls == q_cls
    assert len({c for c, _ in support}) == 5


def test_deterministic_by_seed_and_varies_across_seeds():
    sampler = EpisodeSampler(make_pool(), ways=5, shots=1, queries=2)
    a = sampler.sample(torch.Generator().manual_seed(7))
    b = sampler.sample(torch.Generator().manual_seed(7))
    c = sampler.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    assert not torch.equal(a.query_x, c.query_x)


def test_a_batch_is_the_episodes_drawn_one_after_another():
    # sample_batch gathers all tasks in one pass; it must give what sequential draws give.
    sampler = EpisodeSampler(make_pool(), ways=5, shots=2, queries=3)
    batch = sampler.sample_batch(torch.Generator().manual_seed(3), 4)
    g = torch.Generator().manual_seed(3)
    one_by_one = Episode.stack([sampler.sample(g) for _ in range(4)])
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(batch, name), getattr(one_by_one, name)), name
    assert batch.support_x.shape == (4, 10, 1, 8, 8) and batch.query_y.shape == (4, 15)


def test_all_classes_and_images_are_reachable():
    sampler = EpisodeSampler(make_pool(classes=6, per_class=5), ways=3, shots=1, queries=1)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        ep = sampler.sample(g)
        seen.update(decode(ep.support_x) + decode(ep.query_x))
    assert seen == {(c, i) for c in range(6) for i in range(5)}


def test_uneven_classes_never_pick_missing_images():
    images = torch.zeros(3 + 7 + 4, 1, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0] * 3 + [1] * 7 + [2] * 4)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.cat([torch.arange(3), torch.arange(7), torch.arange(4)]).to(torch.uint8)
    pool = ClassPool.from_labels(images, labels)
    sampler = EpisodeSampler(pool, ways=3, shots=2, queries=1)
    g = torch.Generator().manual_seed(0)
    counts = {0: 3, 1: 7, 2: 4}
    for _ in range(100):
        ep = sampler.sample(g)
        for c, i in decode(ep.support_x) + decode(ep.query_x):
            assert i < counts[c]


def test_batch_has_task_dimension():
    sampler = EpisodeSampler(make_pool(), ways=4, shots=2, queries=3)
    batch = sampler.sample_batch(torch.Generator().manual_seed(0), 6)
    assert batch.batched and batch.num_tasks == 6
    assert batch.support_x.shape == (6, 8, 1, 8, 8) and batch.query_y.shape == (6, 12)
    assert isinstance(batch.task(2), Episode) and not batch.task(2).batched


def test_too_many_ways_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--ways 13 is more than the 12 classes"):
        EpisodeSampler(make_pool(), ways=13, shots=1, queries=1)


def test_too_many_shots_and_queries_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--shots 6 \+ --queries 5 = 11 images per class.*only 10"):
        EpisodeSampler(make_pool(), ways=5, shots=6, queries=5)


@pytest.mark.parametrize("kw", [dict(ways=1, shots=1, queries=1), dict(ways=5, shots=0, queries=1),
                                dict(ways=5, shots=1, queries=0)])
def test_non_positive_sizes_are_rejected(kw):
    with pytest.raises(ConfigError):
        EpisodeSampler(make_pool(), **kw)


def _same(a, b) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.device == y.device and torch.equal(x, y), name


def test_a_placed_sampler_draws_the_same_stream():
    # on_device's copy gathers from its own images but draws the same indices from the generator.
    from fastadapt.tasks.sampler import on_device

    sampler = EpisodeSampler(make_pool(classes=9, per_class=7), ways=4, shots=2, queries=3)
    placed = sampler._placed(torch.device("cpu"))
    assert placed is not sampler and placed.pool is sampler.pool
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _same(sampler.sample(g1), placed.sample(g2))
    _same(sampler.sample_batch(g1, 3), placed.sample_batch(g2, 3))
    a, b = sampler.sample_batch_with_classes(g1, 2), placed.sample_batch_with_classes(g2, 2)
    _same(a.episode, b.episode)
    assert torch.equal(a.classes, b.classes)
    la, lb = sampler.sample_labelled(g1, 6), placed.sample_labelled(g2, 6)
    assert torch.equal(la.x, lb.x) and torch.equal(la.y, lb.y)
    # The CPU needs no copy; sources without on_device are used as they are.
    assert on_device(sampler, "cpu") is sampler
    other = object()
    assert on_device(other, "cuda") is other
