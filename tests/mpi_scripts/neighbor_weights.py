"""Neighbour weights taken as given (no sum to 1 required) and correctly rounded uniform averages.

x_i ← w_ii x_i + Σ_j w_ij s_ji x_j is checked against the closed form computed from every rank's
input (gathered with plain mpi4py), for plain neighbourhood sums, push-sum with arbitrary scales,
negative weights and a static topology whose rows do not sum to 1. Uniform averages of float32,
float16 and bfloat16 values are compared exactly (bit for bit) with the float64 mean rounded to
the dtype. Each case runs blocking (node shared memory on one machine unless the run turns it
off) and non-blocking (MPI messages), on a small tensor and on a 4 MB one (several chunks).
"""

import itertools

import numpy as np
import torch
from _common import GROUP, assert_close, expect_error, gathered, rank_values

import gossip
import topologies

N = GROUP.size
R = GROUP.rank
LARGE = 1 << 20  # float32 elements: 4 MB, several message chunks


def _both(x: torch.Tensor, **weights) -> list[tuple[str, torch.Tensor]]:
    """The blocking and the non-blocking op on ``x`` with ``weights``."""
    return [("blocking", gossip.neighbor_allreduce(x, **weights)),
            ("non-blocking", gossip.neighbor_allreduce_async(x, **weights).wait())]


def _sizes() -> list[int]:
    return [5, LARGE]


def test_plain_sum_over_the_static_in_neighbours():
    sources = gossip.in_neighbors()
    for n in _sizes():
        x = rank_values((n,), torch.float64, seed=n)
        every = gathered(x)
        want = every[R] + sum(every[j] for j in sources)
        for how, got in _both(x, self_weight=1.0, src_weights=dict.fromkeys(sources, 1.0)):
            assert_close(got, want, torch.float64, f"static neighbour sum ({how}, {n} elements)")


def test_dynamic_sum_and_push_sum_with_any_scales():
    if N < 3:
        return
    prev, prev2, nxt, nxt2 = (R - 1) % N, (R - 2) % N, (R + 1) % N, (R + 2) % N
    for n in _sizes():
        x = rank_values((n,), torch.float64, seed=7 + n)
        every = gathered(x)
        # plain sum with one neighbour: unit scales, self weight 1 and source weight 1
        for how, got in _both(x, self_weight=1.0, src_weights={prev: 1.0}, dst_weights=[nxt]):
            assert_close(got, every[R] + every[prev], torch.float64, f"dynamic sum ({how})")
        # push-sum with scales whose total with the self weight is not 1, and uneven receive weights
        scales = {nxt: 0.7, nxt2: 0.9}
        src = {prev: 2.0, prev2: -0.5}
        want = 0.6 * every[R] + 2.0 * 0.7 * every[prev] - 0.5 * 0.9 * every[prev2]
        for how, got in _both(x, self_weight=0.6, src_weights=src, dst_weights=scales):
            assert_close(got, want, torch.float64, f"push-sum with scales 0.7, 0.9 and self weight 0.6 ({how})")


def test_static_weights_need_not_sum_to_one():
    sources = gossip.in_neighbors()
    x = rank_values((6,), torch.float64, seed=3)
    every = gathered(x)
    want = 3.0 * every[R] + sum(0.25 * every[j] for j in sources)  # the static in-neighbours, other weights
    for how, got in _both(x, self_weight=3.0, src_weights=dict.fromkeys(sources, 0.25)):
        assert_close(got, want, torch.float64, f"self weight 3, neighbour weights 1/4 ({how})")


def test_non_finite_weights_are_refused_naming_the_rank():
    if N < 2:
        return
    nan_self = float("nan") if R == N - 1 else 0.5
    expect_error(lambda: gossip.neighbor_allreduce(torch.ones(3), self_weight=nan_self,
                                                   src_weights={(R - 1) % N: 0.5}, dst_weights=[(R + 1) % N]),
                 f"rank {N - 1}", "self_weight is non-finite", error=gossip.InputMismatchError)
    inf_src = {(R - 1) % N: float("inf") if R == 0 else 1.0}
    expect_error(lambda: gossip.neighbor_allreduce(torch.ones(3), self_weight=1.0, src_weights=inf_src,
                                                   dst_weights=[(R + 1) % N]),
                 "rank 0", "non-finite weight inf", error=gossip.InputMismatchError)


def test_set_topology_with_any_row_sums():
    graph = topologies.ring(N)
    for _, _, data in graph.edges(data=True):
        data["weight"] = 1.0  # every rank sums its closed neighbourhood
    if N > 1:
        expect_error(lambda: gossip.set_topology(graph), "weights received by rank 0", "not 1",
                     error=gossip.InputMismatchError)
    try:
        gossip.set_topology(graph, allow_any_row_sums=True)
        x = rank_values((4,), torch.float64, seed=11)
        every = gathered(x)
        want = every[R] + sum(every[j] for j in gossip.in_neighbors())
        for how, got in _both(x):
            assert_close(got, want, torch.float64, f"static topology of unit weights ({how})")
    finally:
        gossip.set_topology(topologies.exponential_two)


def _exact_mean(values: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The float64 mean (exact sum, one division) rounded to ``dtype``."""
    return (sum(v.double() for v in values) / len(values)).to(dtype)


def _all_values(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Every rank's input, the same on every rank: random values over several binades."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-4, 8, (n,), generator=g))
            .to(dtype) for _ in range(N)]


def _assert_exact(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    bad = (got != want).nonzero().flatten()
    if bad.numel():
        k = int(bad[0])
        raise AssertionError(f"rank {R}: {what}: {bad.numel()} of {want.numel()} values not the correctly rounded "
                             f"mean, e.g. index {k}: got {got[k].item()!r}, want {want[k].item()!r}")


def test_uniform_mean_of_37_35_36_is_36():
    if N < 3:
        return
    # rank 1 averages itself, rank 0 and rank 2 (in that order), with the default uniform weights of a
    # per-call exchange: every order of 37, 35 and 36 over the three, one order per element
    orders = list(itertools.permutations([37.0, 35.0, 36.0]))
    position = {1: 0, 0: 1, 2: 2}.get(R)
    x = torch.tensor([order[position] if position is not None else 0.0 for order in orders], dtype=torch.float32)
    src = [0, 2] if R == 1 else []
    dst = [1] if R in (0, 2) else []
    for how, got in _both(x, src_weights=src, dst_weights=dst):
        if R == 1:
            assert torch.equal(got, torch.full_like(got, 36.0)), \
                f"rank 1: means of 37, 35, 36 in the orders {orders} ({how}) are {got.tolist()}, not 36.0"


def test_uniform_means_are_correctly_rounded():
    """Triples (ring), and the whole job (fully connected: N values), per-call and static weights."""
    if N < 3:
        return
    prev, nxt = (R - 1) % N, (R + 1) % N
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in _sizes() if dtype == torch.float32 else _sizes()[:1]:
            every = _all_values(n, dtype, seed=n + len(str(dtype)))
            x = every[R]
            triple = _exact_mean([every[prev], x, every[nxt]], dtype)
            for how, got in _both(x, src_weights=[prev, nxt], dst_weights=[prev, nxt]):
                _assert_exact(got, triple, f"per-call mean of 3 {dtype} ({how}, {n} elements)")
            gossip.set_topology(topologies.fully_connected(N))
            try:
                whole = _exact_mean(every, dtype)
                for how, got in _both(x):
                    _assert_exact(got, whole, f"static uniform mean of {N} {dtype} ({how}, {n} elements)")
            finally:
                gossip.set_topology(topologies.exponential_two)


def test_random_triples_and_quads_small_tensors():
    """Many small random triples and quads, each compared with the float64 mean rounded to float32."""
    if N < 4:
        return
    rng = np.random.default_rng(5)
    every = [torch.from_numpy(rng.uniform(-100, 100, 4096).astype(np.float32)) for _ in range(N)]
    peers = [(R - 1) % N, (R + 1) % N, (R + 2) % N]
    quad = _exact_mean([every[R], *(every[p] for p in peers)], torch.float32)
    senders = [(R + 1) % N, (R - 1) % N, (R - 2) % N]  # who receives from this rank
    for how, got in _both(every[R], src_weights=peers, dst_weights=senders):
        _assert_exact(got, quad, f"mean of 4 float32 ({how})")
