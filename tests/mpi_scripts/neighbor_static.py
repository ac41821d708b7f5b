"""neighbor_allreduce / neighbor_allgather on static topologies, checked against W @ X."""

import networkx as nx
import numpy as np
import torch
from _common import DTYPES, GROUP, assert_close, device, gathered, rank_values

import gossip
import topologies

N = GROUP.size
R = GROUP.rank


def _check_graph(graph, dtype=torch.float32, shape=(5, 3)):
    gossip.set_topology(graph)
    w = topologies.mixing_matrix(graph)
    x = rank_values(shape, dtype, seed=3)
    before = x.clone()
    y = gossip.neighbor_allreduce(x)
    assert torch.equal(x, before), f"rank {R}: input was modified"
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert_close(y, w[R] @ gathered(x), dtype, f"neighbor_allreduce on {graph.name or 'graph'}")


def test_default_topology_is_exponential_two():
    expected = topologies.exponential_two(N)
    assert nx.utils.graphs_equal(gossip.topology(), expected) or sorted(gossip.topology().edges) == sorted(
        expected.edges)
    assert gossip.in_neighbors() == sorted(j for j in expected.predecessors(R) if j != R)
    assert gossip.out_neighbors() == sorted(i for i in expected.successors(R) if i != R)
    x = rank_values((7,), torch.float64)
    assert_close(gossip.neighbor_allreduce(x), topologies.mixing_matrix(expected)[R] @ gathered(x),
                 torch.float64, "default exponential-2")


def test_ring_exponential_fully_connected_star():
    for make in (topologies.ring, topologies.exponential_two, topologies.fully_connected, topologies.star):
        _check_graph(make(N))


def test_star_with_self_weights():
    if N < 2:
        _check_graph(topologies.star(N))
        return
    graph = topologies.star(N, center=N - 1, leaf_self_weight=1.0 - 0.5 / (N - 1))
    _check_graph(graph, torch.float64)


def test_unweighted_graph_gets_uniform_weights():
    graph = nx.DiGraph()
    graph.add_nodes_from(range(N))
    for i in range(N):  # a directed one-way ring: receive from i-1 only
        if N > 1:
            graph.add_edge((i - 1) % N, i)
    gossip.set_topology(graph)
    x = rank_values((4,), torch.float64)
    rows = gathered(x)
    want = rows[R] if N == 1 else (rows[R] + rows[(R - 1) % N]) / 2
    assert_close(gossip.neighbor_allreduce(x), want, torch.float64, "uniform weights on a one-way ring")


def test_asymmetric_weights_match_w_times_x():
    rng = np.random.default_rng(7)  # same graph on every rank
    w = rng.random((N, N)) * (rng.random((N, N)) < 0.6)
    np.fill_diagonal(w, 1.0)
    w /= w.sum(axis=1, keepdims=True)
    _check_graph(topologies.from_matrix(w), torch.float64, shape=(11,))


def test_every_dtype():
    for dtype in DTYPES:
        _check_graph(topologies.exponential_two(N), dtype, shape=(33, 2))


def test_non_contiguous_input_and_out():
    gossip.set_topology(topologies.ring(N))
    w = topologies.mixing_matrix(topologies.ring(N))
    base = rank_values((6, 8), torch.float32)
    x = base.t()[::2]  # non-contiguous view
    assert not x.is_contiguous()
    y = gossip.neighbor_allreduce(x)
    assert_close(y, w[R] @ gathered(x.contiguous()), torch.float32, "non-contiguous input")
    out = torch.empty_like(x.contiguous())
    got = gossip.neighbor_allreduce(x, out=out)
    assert got is out
    assert_close(out, w[R] @ gathered(x.contiguous()), torch.float32, "out=")


def test_large_message():
    """4 MB: several message chunks; at most 4096 staging chunks (the staged CPU run's 64-byte chunks
    make it 256 kB: the pipeline's every path many times over, without 65536 copies each way)."""
    gossip.set_topology(topologies.exponential_two(N))
    numel = min(1 << 20, 4096 * gossip.settings().staging_chunk_bytes // 4)
    x = rank_values((numel,), torch.float32, seed=5)
    w = topologies.mixing_matrix(topologies.exponential_two(N))
    assert_close(gossip.neighbor_allreduce(x), w[R] @ gathered(x), torch.float32, f"{4 * numel} B message")


def test_src_weights_on_static_neighbours():
    gossip.set_topology(topologies.exponential_two(N))
    sources = gossip.in_neighbors()
    x = rank_values((5,), torch.float64)
    rows = gathered(x)
    if not sources:
        assert_close(gossip.neighbor_allreduce(x, self_weight=1.0, src_weights={}), rows[R], torch.float64, "n=1")
        return
    first = sources[0]
    y = gossip.neighbor_allreduce(x, self_weight=0.25, src_weights={first: 0.75})
    assert_close(y, 0.25 * rows[R] + 0.75 * rows[first], torch.float64, "src_weights subset")
    y = gossip.neighbor_allreduce(x, src_weights=sources)  # a list: uniform weights
    want = (rows[R] + rows[sources].sum(axis=0)) / (len(sources) + 1)
    assert_close(y, want, torch.float64, "src_weights list")


def test_neighbor_allgather_order():
    gossip.set_topology(topologies.ring(N))
    x = rank_values((2, 3), torch.float32)
    got = gossip.neighbor_allgather(x).view(-1, *x.shape)  # the sources' tensors concatenated along dim 0
    rows = gathered(x)
    assert got.shape == (len(gossip.in_neighbors()), 2, 3)
    for k, j in enumerate(gossip.in_neighbors()):
        assert_close(got[k], rows[j], torch.float32, f"neighbor_allgather row {k} from rank {j}")


def test_async_handles_out_of_order():
    gossip.set_topology(topologies.exponential_two(N))
    w = topologies.mixing_matrix(topologies.exponential_two(N))
    xs = [rank_values((100 + k,), torch.float32, seed=k) for k in range(4)]
    handles = [gossip.neighbor_allreduce_async(x) for x in xs]
    for k in (3, 1, 0, 2):
        y = handles[k].wait()
        assert handles[k].done()
        assert_close(y, w[R] @ gathered(xs[k]), torch.float32, f"async handle {k}")
    assert handles[0].wait() is handles[0].wait()  # wait is idempotent


def test_repeated_averaging_reaches_consensus():
    gossip.set_topology(topologies.exponential_two(N))
    x = rank_values((16,), torch.float64)
    mean = gathered(x).mean(axis=0)
    for _ in range(60):
        x = gossip.neighbor_allreduce(x)
    assert_close(x, mean, torch.float64, "consensus after 60 steps")


def test_check_off_still_correct():
    gossip.set_check(False)
    gossip.set_topology(topologies.ring(N))
    x = rank_values((9,), torch.float32)
    w = topologies.mixing_matrix(topologies.ring(N))
    assert_close(gossip.neighbor_allreduce(x), w[R] @ gathered(x), torch.float32, "check off")
    assert device().type in ("cpu", "cuda")
