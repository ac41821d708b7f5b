"""allreduce, broadcast, allgather, barrier, broadcast_parameters, layout queries, FlatBuffer."""

import time

import torch
from _common import DTYPES, GROUP, assert_close, device, gathered, rank_values

import gossip

N = GROUP.size
R = GROUP.rank


def test_rank_size_and_layout():
    assert gossip.rank() == R and gossip.size() == N
    local = GROUP.Split_type(GROUP.COMM_TYPE_SHARED if hasattr(GROUP, "COMM_TYPE_SHARED") else 0)
    assert gossip.local_size() == local.size and gossip.local_rank() == local.rank
    local.Free()
    assert gossip.machine_size() == 1 and gossip.machine_rank() == 0  # one host in tests


def test_allreduce_mean_and_sum_every_dtype():
    for dtype in DTYPES:
        x = rank_values((17, 3), dtype)
        rows = gathered(x)
        before = x.clone()
        assert_close(gossip.allreduce(x), rows.mean(axis=0), dtype, "allreduce mean")
        assert_close(gossip.allreduce(x, op="sum"), rows.sum(axis=0), dtype, "allreduce sum")
        assert torch.equal(x, before)


def test_allreduce_integers_and_out():
    x = torch.arange(5, dtype=torch.int64, device=device()) + R
    got = gossip.allreduce(x, op="sum")
    assert torch.equal(got.cpu(), torch.arange(5) * N + N * (N - 1) // 2)
    out = torch.empty(5, dtype=torch.float64, device=device())
    gossip.allreduce(x.double(), out=out)
    assert_close(out, (torch.arange(5) + (N - 1) / 2).numpy(), torch.float64, "allreduce out=")


def test_broadcast_from_each_root():
    for root in range(N):
        x = rank_values((4, 4), torch.float32, seed=root)
        rows = gathered(x)
        y = gossip.broadcast(x, root=root)
        assert_close(y, rows[root], torch.float32, f"broadcast from {root}")


def test_allgather_with_different_first_dims():
    x = torch.full((R + 1, 2), float(R), device=device())
    got = gossip.allgather(x)
    want = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(N)])
    assert torch.equal(got.cpu(), want)


def test_barrier_waits_for_the_last_rank():
    """No rank returns from the barrier before the last one has entered it: one rank at a time
    sleeps 0.3 s before entering, and every rank's return must come after that rank's arrival (all
    ranks run on one host here, so their monotonic clocks, ``time.perf_counter``, agree)."""
    for late in sorted({0, N - 1}):
        gossip.barrier()
        if R == late:
            time.sleep(0.3)
        entered = time.perf_counter()
        gossip.barrier()
        left = time.perf_counter()
        arrivals = GROUP.allgather(entered)
        assert left >= arrivals[late], (
            f"rank {R} left the barrier {arrivals[late] - left:.3f} s before rank {late} entered it "
            f"(it waited {left - entered:.3f} s)")


def test_broadcast_parameters_makes_models_equal():
    torch.manual_seed(R)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).to(device())
    model[1].running_mean.fill_(float(R))
    gossip.broadcast_parameters(model, root=0)
    for name, t in model.state_dict().items():
        rows = gathered(t.float())
        assert (rows == rows[0]).all(), f"rank {R}: {name} differs after broadcast_parameters"


def test_flat_buffer_binds_views_and_gossips_in_one_call():
    torch.manual_seed(R)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)).to(device())
    expected = [p.detach().clone() for p in model.parameters()]
    (buffer,) = gossip.FlatBuffer.for_module(model)
    assert buffer.flat.numel() == sum(p.numel() for p in model.parameters())
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)
        assert p.data_ptr() >= buffer.flat.data_ptr()
    averaged = gossip.allreduce(buffer.flat)
    buffer.flat.copy_(averaged)
    for p in model.parameters():
        rows = gathered(p)
        assert (abs(rows - rows[0]) < 1e-6).all()
    loss = model(torch.ones(2, 6, device=device())).sum()
    loss.backward()  # autograd still works through the re-bound parameters
    assert all(p.grad is not None for p in model.parameters())
