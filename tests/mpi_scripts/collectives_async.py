"""Non-blocking allreduce, broadcast and allgather (``*_async`` returning handles) against closed forms,
with several-MB inputs the caller drops at once; allgather with different first dimensions; and the
correctly rounded mean of ``allreduce``, ``local_allreduce`` and the hierarchical machine mean.

Every rank's input is rebuilt from its seed on every rank, so the expected values come from NumPy
alone, without the library."""

import gc
from fractions import Fraction

import numpy as np
import torch
from _common import GROUP, assert_close, device, expect_error

import gossip

N = GROUP.size
R = GROUP.rank
BIG = 1_500_000  # float32 elements: 6 MB


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int, rank: int = R) -> torch.Tensor:
    """Rank ``rank``'s input: multiples of 1/8 in [-8, 8), exact in every dtype tested and in their sums."""
    g = torch.Generator().manual_seed(7907 * seed + rank)
    return (torch.randint(-64, 64, shape, generator=g).to(torch.float64) / 8.0).to(dtype).to(device())


def _all(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Every rank's float64 input, stacked (built locally from the seeds)."""
    return np.stack([_values(shape, torch.float64, seed, r).cpu().numpy() for r in range(N)])


def _scribble() -> list[torch.Tensor]:
    """Allocate and fill memory, so that memory freed too early is reused at once."""
    gc.collect()
    return [torch.full((BIG,), 7.0, device=device()) for _ in range(6)]


def test_allreduce_async_mean_sum_and_dropped_inputs():
    handles = [gossip.allreduce_async(_values((BIG,), torch.float32, seed=1)),
               gossip.allreduce_async(_values((BIG,), torch.float32, seed=2), "sum"),
               gossip.allreduce_async(_values((33, 2), torch.bfloat16, seed=3))]
    junk = _scribble()
    half, total, mean = handles[2].wait(), handles[1].wait(), handles[0].wait()
    del junk
    assert_close(mean, _all((BIG,), 1).mean(axis=0), torch.float32, "allreduce_async mean, 6 MB")
    assert_close(total, _all((BIG,), 2).sum(axis=0), torch.float32, "allreduce_async sum, 6 MB")
    assert half.dtype == torch.bfloat16
    assert_close(half, _all((33, 2), 3).mean(axis=0), torch.bfloat16, "allreduce_async bfloat16")
    ints = torch.arange(6, dtype=torch.int64, device=device()) * (R + 1)
    assert np.array_equal(gossip.allreduce_async(ints, "sum").wait().cpu().numpy(), np.arange(6) * N * (N + 1) // 2)
    out = torch.empty(4, 4, dtype=torch.float64, device=device())
    handle = gossip.allreduce_async(_values((4, 4), torch.float64, seed=4), out=out)
    assert handle.wait() is out
    assert_close(out, _all((4, 4), 4).mean(axis=0), torch.float64, "allreduce_async out=")


def test_broadcast_async_from_every_root():
    handles = [gossip.broadcast_async(_values((BIG,), torch.float32, seed=10 + root), root=root)
               for root in range(N)]
    flags = gossip.broadcast_async(torch.tensor([R % 2 == 0, R == 0], device=device()), root=N - 1)
    junk = _scribble()
    for root in reversed(range(N)):
        got = handles[root].wait()
        assert_close(got, _values((BIG,), torch.float64, 10 + root, root).cpu().numpy(), torch.float32,
                     f"broadcast_async from {root}, 6 MB")
    del junk
    assert flags.wait().tolist() == [(N - 1) % 2 == 0, N == 1]


def test_allgather_async_with_different_first_dimensions():
    rows = 1 + (R * 7) % 5  # differs between ranks (0-row blocks too, below)
    handle = gossip.allgather_async(_values((rows, 400_000), torch.float32, seed=20))  # 1.6-8 MB per rank
    empty_here = gossip.allgather_async(torch.full((0 if R == 0 else R, 3), R, dtype=torch.int64, device=device()))
    junk = _scribble()
    got, small = handle.wait(), empty_here.wait()
    del junk
    want = np.concatenate([_values((1 + (r * 7) % 5, 400_000), torch.float64, 20, r).cpu().numpy()
                           for r in range(N)])
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.array_equal(got.cpu().double().numpy(), want), f"rank {R}: allgather_async, several MB"
    want_small = np.concatenate([np.full((0 if r == 0 else r, 3), r) for r in range(N)])
    assert np.array_equal(small.cpu().numpy(), want_small)
    assert torch.equal(gossip.allgather(torch.ones(R + 1, 2, device=device())).cpu(),
                       torch.ones(N * (N + 1) // 2, 2))


def test_handles_poll_and_mismatches_raise():
    handle = gossip.allreduce_async(torch.ones(8, device=device()), "sum")
    while not handle.done():
        pass
    assert torch.equal(handle.wait().cpu(), torch.full((8,), float(N)))
    mismatch = gossip.InputMismatchError
    if N > 1:
        expect_error(lambda: gossip.allreduce_async(torch.ones(3 + (R == N - 1), device=device())), "allreduce",
                     error=mismatch)
    expect_error(lambda: gossip.allreduce_async(torch.ones(3, dtype=torch.int32, device=device())),
                 f"rank {R}: allreduce op 'mean' needs a floating-point tensor", error=mismatch)
    expect_error(lambda: gossip.broadcast_async(torch.ones(2, device=device()), root=N), "out of range",
                 error=mismatch)
    if N > 1:
        expect_error(lambda: gossip.allgather_async(torch.ones(2, 3 + (R == 0), device=device())), "allgather",
                     error=mismatch)


def _nearest_float32(value: Fraction) -> float:
    """The float32 nearest ``value`` (ties to even), found exactly with fractions."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(c.view(np.int32)) & 1)))


def test_means_are_correctly_rounded():
    """fl(Σ x_i / n), not Σ x_i · fl(1/n): with sums that are exact in float32 (small multiples of 1/8)
    every mean must be the float32 nearest the exact mean, e.g. 36 for 37, 35 and 36."""
    if N == 1:
        return
    g = torch.Generator().manual_seed(99)
    everyone = torch.randint(-4000, 4000, (N, 2000), generator=g).to(torch.float64) / 8.0  # the same on every rank
    everyone[:3, 0] = torch.tensor([37.0, 35.0, 36.0])[:N] if N >= 3 else everyone[:N, 0]
    mine = everyone[R].to(torch.float32).to(device())
    exact = [_nearest_float32(sum(Fraction(float(v)) for v in everyone[:, k]) / N) for k in range(everyone.shape[1])]
    for what, got in (("allreduce", gossip.allreduce(mine)), ("allreduce_async", gossip.allreduce_async(mine).wait())):
        bad = int((got.cpu().double().numpy() != np.array(exact)).sum())
        assert bad == 0, f"rank {R}: {what} mean is not correctly rounded in {bad} of {len(exact)} cases"
    if gossip.machine_size() == 1:  # one machine of every rank: the machine mean is the mean
        for what, got in (("local_allreduce", gossip.local_allreduce(mine)),
                          ("hierarchical_neighbor_allreduce", gossip.hierarchical_neighbor_allreduce(mine))):
            bad = int((got.cpu().double().numpy() != np.array(exact)).sum())
            assert bad == 0, f"rank {R}: {what} mean is not correctly rounded in {bad} of {len(exact)} cases"
