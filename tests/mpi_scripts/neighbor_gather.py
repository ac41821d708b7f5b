"""neighbor_allgather / neighbor_allgather_async, static and with per-call ranks, against the
concatenation of the sources' tensors gathered with plain mpi4py; first dimensions that differ
between ranks, several-MB messages in chunks, dropped inputs, and inconsistent calls."""

import gc

import numpy as np
import torch
from _common import GROUP, device, expect_error

import gossip
import topologies

N = GROUP.size
R = GROUP.rank
BIG_ROW = 262_144  # float32 elements per row: 1 MiB, so every large message is several chunks


def _tensor(rows: int, tail: tuple[int, ...], dtype: torch.dtype, seed: int, rank: int = R) -> torch.Tensor:
    """Rank ``rank``'s tensor (rebuilt from the seed on any rank): values exact in every dtype tested."""
    g = torch.Generator().manual_seed(7919 * seed + rank)
    values = torch.randint(-64, 64, (rows, *tail), generator=g).to(torch.float64) / 8.0
    return values.to(dtype).to(device())


def _everyone(x: torch.Tensor) -> list[np.ndarray]:
    """Every rank's tensor, gathered with plain mpi4py (float64 NumPy, original shapes)."""
    return GROUP.allgather(x.detach().to("cpu", torch.float64).numpy())


def _expect(got: torch.Tensor, blocks: list[np.ndarray], tail: tuple[int, ...], what: str) -> None:
    want = np.concatenate(blocks) if blocks else np.zeros((0, *tail))
    assert tuple(got.shape) == want.shape, f"rank {R}: {what}: shape {tuple(got.shape)}, want {want.shape}"
    assert np.array_equal(got.to("cpu", torch.float64).numpy(), want), f"rank {R}: {what}: wrong values"


def _ring_peers(offsets: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Receive from R - o and send to R + o for each offset o (distinct ranks, never this one), in the given
    order: a consistent dynamic exchange."""
    seen, src, dst = set(), [], []
    for o in offsets:
        if o % N and o % N not in seen:
            seen.add(o % N)
            src.append((R - o) % N)
            dst.append((R + o) % N)
    return src, dst


def test_static_concatenates_in_in_neighbour_order():
    for graph in (topologies.ring(N), topologies.exponential_two(N)):
        gossip.set_topology(graph)
        sources = gossip.in_neighbors()
        assert sources == sorted(sources)
        for dtype, tail in ((torch.float32, (3,)), (torch.float64, ()), (torch.int64, (2, 2)), (torch.bfloat16, (5,))):
            x = _tensor(R + 1, tail, dtype, seed=1)  # a different first dimension on every rank
            before = x.clone()
            got = gossip.neighbor_allgather(x)
            assert got.dtype == dtype and got.device == x.device
            everyone = _everyone(x)
            _expect(got, [everyone[j] for j in sources], tail, f"static {dtype} {tail}")
            assert torch.equal(x, before)  # input untouched
    gossip.set_topology(topologies.exponential_two(N))


def test_static_equal_first_dimensions_and_empty_blocks():
    gossip.set_topology(topologies.exponential_two(N))
    x = _tensor(2, (3,), torch.float32, seed=2)
    got = gossip.neighbor_allgather(x)
    assert got.shape == (2 * len(gossip.in_neighbors()), 3)
    everyone = _everyone(x)
    _expect(got, [everyone[j] for j in gossip.in_neighbors()], (3,), "equal first dims")
    empty_on_odd = _tensor(0 if R % 2 else 3, (4,), torch.float32, seed=3)  # some ranks send no rows
    got = gossip.neighbor_allgather(empty_on_odd)
    everyone = _everyone(empty_on_odd)
    _expect(got, [everyone[j] for j in gossip.in_neighbors()], (4,), "empty blocks")


def test_dynamic_blocks_come_in_the_order_of_src_ranks():
    for offsets in ((1,), (2, 1), (1, 3, 2)):
        src, dst = _ring_peers(offsets)
        x = _tensor(R % 3 + 1, (2,), torch.float32, seed=4)
        got = gossip.neighbor_allgather(x, src_ranks=src, dst_ranks=dst)
        everyone = _everyone(x)
        _expect(got, [everyone[j] for j in src], (2,), f"dynamic {offsets}: sources {src}")
    # one-way: rank r sends to r + 1 only, and nobody sends back
    src, dst = ([R - 1] if R > 0 else []), ([R + 1] if R < N - 1 else [])
    x = _tensor(R + 2, (), torch.float64, seed=5)
    got = gossip.neighbor_allgather(x, src_ranks=src, dst_ranks=dst)
    everyone = _everyone(x)
    _expect(got, [everyone[j] for j in src], (), "a chain")


def test_async_handles_hold_the_buffers_of_several_mb_messages():
    """Inputs built inside the call and dropped at once, handles waited in reverse, memory scribbled in between:
    several-MB messages (chunks) land intact."""
    gossip.set_topology(topologies.exponential_two(N))
    src, dst = _ring_peers((1, 2))
    handles = [gossip.neighbor_allgather_async(_tensor(R + 2, (BIG_ROW,), torch.float32, seed=6)),
               gossip.neighbor_allgather_async(_tensor(3 - R % 2, (BIG_ROW,), torch.float32, seed=7),
                                               src_ranks=src, dst_ranks=dst)]
    gc.collect()
    junk = [torch.full((4 * BIG_ROW,), 7.0, device=device()) for _ in range(6)]  # reuses freed memory
    dynamic, static = handles[1].wait(), handles[0].wait()
    del junk
    blocks = [_tensor(j + 2, (BIG_ROW,), torch.float32, seed=6, rank=j).cpu().double().numpy()
              for j in gossip.in_neighbors()]
    _expect(static, blocks, (BIG_ROW,), "static async, several MB")
    blocks = [_tensor(3 - j % 2, (BIG_ROW,), torch.float32, seed=7, rank=j).cpu().double().numpy() for j in src]
    _expect(dynamic, blocks, (BIG_ROW,), "dynamic async, several MB")
    assert static.numel() * 4 >= 2 << 20 or not gossip.in_neighbors()  # MBs received


def test_inconsistent_calls_raise_on_every_rank():
    mismatch = gossip.InputMismatchError
    x = _tensor(2, (3,), torch.float32, seed=8)
    expect_error(lambda: gossip.neighbor_allgather(torch.zeros((), device=device())), "at least one dimension",
                 error=mismatch)
    expect_error(lambda: gossip.neighbor_allgather(x, src_ranks=[]), "src_ranks and dst_ranks together",
                 error=mismatch)
    expect_error(lambda: gossip.neighbor_allgather(x, src_ranks=[N], dst_ranks=[]),
                 f"rank {R}: src_ranks names rank {N}", error=mismatch)
    if N == 1:
        return
    # rank 0 sends to rank 1, which does not list rank 0 as a source
    src, dst = ([], [1]) if R == 0 else ([], [])
    expect_error(lambda: gossip.neighbor_allgather(x, src_ranks=src, dst_ranks=dst),
                 "rank 0 sends to rank 1, which does not receive from rank 0", error=mismatch)
    # trailing dimensions differ along an edge
    src, dst = _ring_peers((1,))
    y = _tensor(2, (3 + (R == 0),), torch.float32, seed=9)
    expect_error(lambda: gossip.neighbor_allgather(y, src_ranks=src, dst_ranks=dst), "neighbor_allgather",
                 error=mismatch)
    # a static call meeting a dynamic one
    expect_error(lambda: gossip.neighbor_allgather(x, **({} if R == 0 else {"src_ranks": src, "dst_ranks": dst})),
                 "different transfer paths", error=mismatch)
    # the runtime is usable afterwards
    got = gossip.neighbor_allgather(x, src_ranks=src, dst_ranks=dst)
    everyone = _everyone(x)
    _expect(got, [everyone[j] for j in src], (3,), "after the errors")
