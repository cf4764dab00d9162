import torch

from isdretrieve.train.memory import EmbeddingQueue


def test_queue_is_fifo_and_wraps_around():
    q = EmbeddingQueue(size=5, dim=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q.embeddings.norm(dim=1), torch.ones(5))
    assert (q.indices == -1).all()
    for start in (0, 3):
        keys = torch.arange(start, start + 3, dtype=torch.float32).repeat(2, 1).T
        q.push(keys, torch.arange(start, start + 3))
    # pushes of 3 then 3 into 5 slots: rows 0-2 then 3,4,0
    assert q.indices.tolist() == [5, 1, 2, 3, 4]
    assert q.ptr.item() == 1
    assert q.embeddings[0].tolist() == [5.0, 5.0]


def test_snapshot_is_independent_of_later_pushes():
    q = EmbeddingQueue(size=4, dim=3)
    snap = q.snapshot()
    before = snap.clone()
    q.push(torch.zeros(2, 3), torch.tensor([7, 8]))
    assert torch.equal(snap, before)
    assert not torch.equal(q.embeddings, before)


def test_queue_state_round_trips_through_state_dict():
    a, b = EmbeddingQueue(6, 2), EmbeddingQueue(6, 2)
    a.push(torch.ones(4, 2), torch.arange(4))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.embeddings, b.embeddings) and a.ptr == b.ptr and torch.equal(a.indices, b.indices)
