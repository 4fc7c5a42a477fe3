import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.methods.protonet import ProtoNet, prototypes, squared_euclidean
from fastadapt.tasks import Episode


class Identity(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def hand_logits(support, support_y, query, ways):
    protos = [support[support_y == k].mean(0).tolist() for k in range(ways)]
    return torch.tensor([[-sum((q[d] - p[d]) ** 2 for d in range(len(q))) for p in protos] for q in query.tolist()],
                        dtype=torch.float64)


def test_prototypes_are_class_means():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert torch.allclose(prototypes(z, y, 2), torch.tensor([[2.0, 1.0], [1.0, 3.0]]))


def test_logits_equal_hand_computed_squared_euclidean():
    g = torch.Generator().manual_seed(0)
    support = torch.randn(6, 3, generator=g, dtype=torch.float64)
    support_y = torch.tensor([0, 1, 2, 0, 1, 2])
    query = torch.randn(4, 3, generator=g, dtype=torch.float64)
    net = ProtoNet(Identity())
    got = net.logits(support, support_y, query)
    ref = hand_logits(support, support_y, query, 3)
    assert torch.allclose(got, ref, atol=1e-10)
    # adapt/predict (evaluation path) agree with the training path
    assert torch.allclose(net.predict(net.adapt(support, support_y), query), got, atol=1e-10)


def test_squared_euclidean_matches_cdist():
    x, p = torch.randn(7, 5), torch.randn(3, 5)
    assert torch.allclose(squared_euclidean(x, p), torch.cdist(x, p) ** 2, atol=1e-4)


def test_meta_loss_is_cross_entropy_over_tasks():
    g = torch.Generator().manual_seed(1)
    eps = [Episode(torch.randn(4, 2, generator=g), torch.tensor([0, 0, 1, 1]),
                   torch.randn(6, 2, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])) for _ in range(3)]
    net = ProtoNet(Identity())
    loss, metrics = net.meta_loss(Episode.stack(eps))
    ref = torch.stack([F.cross_entropy(net.logits(e.support_x, e.support_y, e.query_x), e.query_y) for e in eps]).mean()
    assert torch.allclose(loss, ref)
    assert abs(metrics["loss"] - float(ref)) < 1e-6
    hits = [(net.logits(e.support_x, e.support_y, e.query_x).argmax(-1) == e.query_y).float().mean() for e in eps]
    assert metrics["accuracy"] == pytest.approx(100.0 * float(torch.stack(hits).mean()))  # percent, as everywhere
    assert "acc" not in metrics


def test_embedding_gets_gradients():
    net = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    ep = Episode(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), torch.randn(2, 4), torch.tensor([0, 1]))
    loss, _ = net.meta_loss(Episode.stack([ep]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
