"""Scale beyond one process: a CNN with anypool layers trained under DistributedDataParallel (2 CPU ranks, gloo)
ends with the same parameters as single-process training on the same global batch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

STEPS, WORLD, BATCH = 3, 2, 8



def _model() -> nn.Module:
    from anypool.layers import torch as layers

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), layers.AdaptiveMaxPool2d((5, 4)),  # 11x13 -> 9x11 -> 5x4: overlapping windows
        nn.Conv2d(6, 8, 1), layers.AdaptiveAvgPool2d((3, 7)),  # 5x4 -> 3x7: down one axis, up the other
        nn.Conv2d(8, 4, 1), layers.GlobalAvgPool(), nn.Linear(4, 2),
    ).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(BATCH, 3, 11, 13, generator=gen, dtype=torch.float64),
            torch.randn(BATCH, 2, generator=gen, dtype=torch.float64))


def _train(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()  # mean over the local batch; DDP averages over ranks
        opt.step()


def _worker(rank: int, rendezvous: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        _train(model, x[shard], y[shard])
        if rank == 0:
            torch.save(model.module.state_dict(), result)
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    result = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(result)), nprocs=WORLD, join=True)
    distributed = torch.load(result)

    single = _model()
    _train(single, *_data())
    reference = single.state_dict()
    assert distributed.keys() == reference.keys()
    initial = _model().state_dict()
    for name, value in reference.items():
        assert not torch.equal(value, initial[name]) or "bias" in name, f"{name} did not train"
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12, msg=name)
