"""BlueFog's API (``gossip.compat.bluefog``) against closed forms, through BlueFog's names only: ranks
and topologies, collectives with names and handles, neighbour and hierarchical averaging, windows,
``topology_util``'s graphs and the distributed optimizers (one step each against NumPy). Run with
``ranks_per_machine=2`` on 4 ranks (two machines)."""

import warnings

import networkx as nx
import numpy as np
import torch
from _common import GROUP

import gossip.compat.bluefog as bf
from gossip.compat.bluefog import topology_util as tu

N = GROUP.size
R = GROUP.rank


def _everyone(x: torch.Tensor) -> np.ndarray:
    return np.stack(GROUP.allgather(x.detach().double().cpu().numpy().reshape(-1)))


def _value(rank: int, numel: int = 6, dtype=torch.float64) -> torch.Tensor:
    return torch.arange(numel, dtype=dtype) + 10.0 * rank + 1.0


def _recv_matrix(graph: nx.DiGraph) -> np.ndarray:
    """W[i, j] = the weight receiver i gives sender j: BlueFog's adjacency matrix transposed."""
    return nx.to_numpy_array(graph, nodelist=range(graph.number_of_nodes())).T


def test_ranks_and_topologies():
    bf.init()
    for name in tu.__all__:  # bluefog.torch has topology_util's names too (bf.ExponentialGraph)
        assert getattr(bf, name) is getattr(tu, name), name
    assert (bf.size(), bf.rank()) == (N, R)
    assert bf.machine_size() == N // 2 and bf.machine_rank() == R // 2 and bf.local_size() == 2
    assert bf.local_rank() == R % 2 and bf.is_homogeneous()
    assert tu.IsTopologyEquivalent(bf.load_topology(), tu.ExponentialTwoGraph(N)) and not bf.is_topo_weighted()
    assert bf.set_topology(tu.RingGraph(N, connect_style=2))
    assert bf.in_neighbor_ranks() == [(R - 1) % N] and bf.out_neighbor_ranks() == [(R + 1) % N]
    assert bf.load_topology() is not None and not bf.is_topo_weighted()
    assert bf.in_neighbor_machine_ranks() == [1 - R // 2] and bf.out_neighbor_machine_ranks() == [1 - R // 2]
    assert bf.nccl_built() is False and isinstance(bf.mpi_threads_supported(), bool)
    assert isinstance(bf.unified_mpi_window_model_supported(), bool)
    bf.suspend()
    bf.resume()
    # unweighted: uniform 1/(indegree + 1) whatever the graph's weights; weighted: the graph's own
    star = tu.StarGraph(N)
    x = _value(R)
    for weighted in (False, True):
        assert bf.set_topology(star, is_weighted=weighted) and bf.is_topo_weighted() == weighted
        w = _recv_matrix(star) if weighted else _recv_matrix(gossip_uniform(star))
        got = bf.neighbor_allreduce(x, name="x.static")
        assert np.allclose(got.numpy(), (w @ _everyone(x))[R]), (weighted, got)
    bf.set_topology(tu.ExponentialTwoGraph(N))


def gossip_uniform(graph: nx.DiGraph) -> nx.DiGraph:
    import topologies

    return topologies.uniform_weights(graph)


def test_collectives_names_and_handles():
    bf.init()
    x = _value(R, 5)
    everyone = _everyone(x)
    assert np.allclose(bf.allreduce(x, name="a").numpy(), everyone.mean(0))
    assert np.allclose(bf.allreduce(x, average=False).numpy(), everyone.sum(0))
    machine = everyone[[m for m in range(N) if m // 2 == R // 2]]
    assert np.allclose(bf.allreduce(x, is_hierarchical_local=True).numpy(), machine.mean(0))
    y = x.clone()
    handle = bf.allreduce_nonblocking_(y, average=False, name="in-place")
    assert isinstance(handle, int) and isinstance(bf.poll(handle), bool)
    assert bf.synchronize(handle) is y and np.allclose(y.numpy(), everyone.sum(0))
    handles = [bf.allreduce_nonblocking(x * k, name=f"h{k}") for k in range(3)]
    for k, h in reversed(list(enumerate(handles))):  # any order
        assert np.allclose(bf.wait(h).numpy(), k * everyone.mean(0))
    try:
        bf.synchronize(handles[0])
        raise AssertionError("a used handle must be refused")
    except ValueError:
        pass
    assert np.allclose(bf.broadcast(x, 2, name="b").numpy(), everyone[2])
    z = x.clone()
    assert bf.broadcast_(z, 1) is z and np.allclose(z.numpy(), everyone[1])
    z = x.clone()
    bf.synchronize(bf.broadcast_nonblocking_(z, 3))
    assert np.allclose(z.numpy(), everyone[3])
    rows = torch.full((R + 1, 2), float(R))  # first dimensions differ
    gathered = bf.synchronize(bf.allgather_nonblocking(rows, name="g"))
    assert torch.equal(gathered, torch.cat([torch.full((k + 1, 2), float(k)) for k in range(N)]))
    bf.barrier()


def test_neighbor_ops_closed_forms():
    bf.init()
    ins = [(R - 2**i) % N for i in range(int(np.ceil(np.log2(N))))]
    outs = [(R + 2**i) % N for i in range(int(np.ceil(np.log2(N))))]
    assert sorted(ins) == bf.in_neighbor_ranks()
    x = torch.full((3, 2), float(R), dtype=torch.float64)
    # plain sum: weights that do not sum to 1
    got = bf.neighbor_allreduce(x, self_weight=1.0, src_weights=dict.fromkeys(ins, 1.0))
    assert torch.allclose(got, torch.full_like(x, sum(ins) + R)), got
    # BlueFog's destination-weight case: half of everything
    got = bf.neighbor_allreduce(x, self_weight=0.5, src_weights=dict.fromkeys(ins, 1.0),
                                dst_weights=dict.fromkeys(outs, 0.5), name="dst")
    assert torch.allclose(got, torch.full_like(x, (sum(ins) + R) * 0.5)), got
    # dynamic one-peer step, dst as a list of ranks
    handle = bf.neighbor_allreduce_nonblocking(x, self_weight=0.5, src_weights={(R - 1) % N: 0.5},
                                               dst_weights=[(R + 1) % N])
    assert torch.allclose(bf.synchronize(handle), torch.full_like(x, (R + (R - 1) % N) / 2))
    for bad in ({"self_weight": 0.5}, {"src_weights": {ins[0]: 1.0}}, {"dst_weights": [outs[0]]}):
        try:
            bf.neighbor_allreduce(x, **bad)
            raise AssertionError(f"{bad} must be refused")
        except ValueError:
            pass
    # pair gossip: 0-1, 2-3
    assert torch.allclose(bf.pair_gossip(x, R ^ 1), torch.full_like(x, (R + (R ^ 1)) / 2))
    # neighbour allgather: concatenated along dim 0, static and dynamic with different first dims
    got = bf.neighbor_allgather(x, name="nag")
    assert torch.equal(got, torch.cat([torch.full((3, 2), float(j), dtype=torch.float64) for j in sorted(ins)]))
    rows = torch.full((R + 1, 2), float(R))
    got = bf.neighbor_allgather(rows, src_ranks=[(R - 1) % N], dst_ranks=[(R + 1) % N])
    j = (R - 1) % N
    assert torch.equal(got, torch.full((j + 1, 2), float(j))), got
    # hierarchical: machine means mixed by the machine topology (exponential-2 over 2 machines: 1/2 each)
    v = _value(R, 4)
    everyone = _everyone(v)
    means = [everyone[[2 * m, 2 * m + 1]].mean(0) for m in range(N // 2)]
    got = bf.hierarchical_neighbor_allreduce(v, name="h")
    assert np.allclose(got.numpy(), np.mean(means, axis=0)), got
    other = 1 - R // 2
    got = bf.synchronize(bf.hierarchical_neighbor_allreduce_nonblocking(
        v, self_weight=1.0, src_machine_weights={other: 2.0}, dst_machine_weights=[other]))
    assert np.allclose(got.numpy(), means[R // 2] + 2.0 * means[other]), got
    # a machine naming itself in both (BlueFog's (m + 1) % machine_size on one machine): its own term
    got = bf.hierarchical_neighbor_allreduce(v, self_weight=0.0, src_machine_weights={R // 2: 0.25, other: 0.5},
                                             dst_machine_weights={R // 2: 2.0, other: 1.0})
    assert np.allclose(got.numpy(), 0.5 * means[R // 2] + 0.5 * means[other]), got


def test_windows():
    bf.init()
    bf.set_topology(tu.RingGraph(N))  # bidirectional: uniform 1/3
    left, right = (R - 1) % N, (R + 1) % N
    x = _value(R)
    assert bf.win_create(x, "w") and bf.get_current_created_window_names() == ["w"]
    with warnings.catch_warnings(record=True) as caught:  # refused while a window is open, as BlueFog
        warnings.simplefilter("always")
        assert bf.set_topology(tu.ExponentialTwoGraph(N)) is False
    assert any("windows are open" in str(c.message) for c in caught)
    assert tu.IsTopologyEquivalent(bf.load_topology(), tu.RingGraph(N))
    assert bf.in_neighbor_ranks() == sorted({left, right})
    bf.init()  # init keeps the topology too, and does not raise
    assert tu.IsTopologyEquivalent(bf.load_topology(), tu.RingGraph(N))
    assert bf.get_win_version("w") == {left: 0, right: 0}
    bf.barrier()
    assert bf.win_put(x, "w")
    bf.barrier()
    assert bf.get_win_version("w") == {left: 1, right: 1}
    out = bf.win_update("w", clone=True)  # default weights, the window's tensor unchanged
    assert torch.equal(x, _value(R)) and torch.allclose(out, (_value(left) + _value(R) + _value(right)) / 3)
    got = bf.win_update("w", self_weight=0.5, neighbor_weights={left: 0.5}, require_mutex=True)
    assert got is x and torch.allclose(x, (_value(R) + _value(left)) / 2)
    bf.barrier()
    # win_get reads the neighbour's current tensor: x changed in place above, not published by a put
    with torch.no_grad():
        x.copy_(_value(R) * 3)
    bf.barrier()
    assert bf.win_get("w", src_weights={right: 2.0})
    bf.barrier()  # every get has read before any tensor changes again
    got = bf.win_update("w", self_weight=0.0, neighbor_weights={right: 1.0})
    assert torch.allclose(got, 2.0 * 3 * _value(right)), got
    bf.barrier()
    assert bf.win_free("w") and bf.get_current_created_window_names() == []
    # push-sum: accumulate scaled sends with the associated p, collect, then x / p is the mean
    bf.set_topology(tu.RingGraph(N, connect_style=2))  # i sends to i + 1
    bf.turn_on_win_ops_with_associated_p()
    # BlueFog's buffers hold no mass until written, even as copies of the tensor: an update with the
    # default weights (1/2 each on this ring) folds p = 1/2 * 1 + 1/2 * 0
    copies = _value(R)
    bf.win_create(copies, "p0")
    bf.win_update("p0")
    assert bf.win_associated_p("p0") == 0.5, bf.win_associated_p("p0")
    assert np.allclose(copies.numpy(), _value(R).numpy())  # the buffer held a copy: x unchanged
    assert bf.win_free("p0")
    y = _value(R)
    bf.win_create(y, "ps", zero_init=True)
    bf.turn_off_win_ops_with_associated_p()
    for _ in range(80):
        bf.barrier()
        handle = bf.win_accumulate_nonblocking(y, "ps", self_weight=0.5, dst_weights={right: 0.5},
                                               require_mutex=True)
        assert bf.win_wait(handle) and not bf.win_wait(handle)
        bf.barrier()
        bf.win_update_then_collect("ps")
    p = bf.win_associated_p("ps")
    mean = np.mean([_value(k).numpy() for k in range(N)], axis=0)
    assert np.allclose(y.numpy() / p, mean, atol=1e-6), (y / p, mean)
    assert np.isclose(sum(GROUP.allgather(p)), N)  # mass kept
    with bf.win_mutex("ps"), bf.win_lock("ps"):
        pass
    bf.barrier()
    bf.win_free()
    bf.set_topology(tu.ExponentialTwoGraph(N))


def test_topology_util_graphs_match_bluefogs_matrices():
    def circulant(n, row):
        return np.array([np.roll(row, i) for i in range(n)])

    for n in (1, 2, 5, 8, 12, 22):
        x = np.array([1.0 if i & (i - 1) == 0 else 0.0 for i in range(n)])
        assert np.allclose(nx.to_numpy_array(tu.ExponentialTwoGraph(n)), circulant(n, x / x.sum()))
        for base in (2, 3):
            x = np.array([1.0] + [1.0 if tu.isPowerOf(i, base) else 0.0 for i in range(1, n)])
            assert np.allclose(nx.to_numpy_array(tu.ExponentialGraph(n, base)), circulant(n, x / x.sum()))
        x = np.array([1.0] + [1.0 if tu.isPowerOf(i if i <= n // 2 else n - i, 4) else 0.0 for i in range(1, n)])
        assert np.allclose(nx.to_numpy_array(tu.SymmetricExponentialGraph(n)), circulant(n, x / x.sum()))
        assert np.allclose(nx.to_numpy_array(tu.FullyConnectedGraph(n)), np.full((n, n), 1 / n))
        star = np.diag(np.full(n, 1 - 1 / n))
        star[0, :] = star[:, 0] = 1 / n
        assert np.allclose(nx.to_numpy_array(tu.StarGraph(n)), star)
        for style, row in ((0, {0: 1 / 3, 1: 1 / 3, -1: 1 / 3}), (1, {0: 0.5, -1: 0.5}), (2, {0: 0.5, 1: 0.5})):
            if n > 2:
                x = np.zeros(n)
                for k, w in row.items():
                    x[k] = w
                assert np.allclose(nx.to_numpy_array(tu.RingGraph(n, style)), circulant(n, x)), (n, style)
        rows = max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)
        cols = n // rows
        a = np.eye(n)
        for i in range(n):
            if (i + 1) % cols:
                a[i, i + 1] = a[i + 1, i] = 1
            if i + cols < n:
                a[i, i + cols] = a[i + cols, i] = 1
        deg = a.sum(1)
        mesh = np.where(a > 0, 1 / np.maximum.outer(deg, deg), 0.0)
        np.fill_diagonal(mesh, 0)
        np.fill_diagonal(mesh, 1 - mesh.sum(1))
        assert np.allclose(nx.to_numpy_array(tu.MeshGrid2DGraph(n)), mesh)
    assert tu.RingGraph(2).number_of_edges() == 4 and tu.isPowerOf(243, 3) and not tu.isPowerOf(12, 2)
    g = tu.ExponentialTwoGraph(8)
    assert tu.GetRecvWeights(g, 0) == (0.25, {4: 0.25, 6: 0.25, 7: 0.25})
    assert tu.GetSendWeights(g, 0)[1] == {1: 0.25, 2: 0.25, 4: 0.25}
    assert tu.IsTopologyEquivalent(g, tu.ExponentialGraph(8)) and not tu.IsTopologyEquivalent(g, tu.RingGraph(8))
    assert tu.IsRegularGraph(g) and not tu.IsRegularGraph(tu.StarGraph(5))
    one_peer = tu.GetDynamicOnePeerSendRecvRanks(g, 3)
    assert [next(one_peer) for _ in range(4)] == [([4], [2]), ([5], [1]), ([7], [7]), ([4], [2])]
    machines = tu.GetExp2DynamicSendRecvMachineRanks(16, 2, 5, 1)  # machine 2 of 8
    assert [next(machines) for _ in range(4)] == [([3], [1]), ([4], [0]), ([6], [6]), ([3], [1])]
    ring = tu.GetInnerOuterRingDynamicSendRecvRanks(8, 4, 1)  # machine 0, local 1
    assert [next(ring) for _ in range(2)] == [([2], [3]), ([5], [5])]
    expo = tu.GetInnerOuterExpo2DynamicSendRecvRanks(16, 4, 1)
    assert next(expo) == ([2], [3])


def test_infer_ranks_is_collective():
    bf.init()
    dst = [(R + 1) % N, (R + 2) % N]
    src, w = tu.InferSourceFromDestinationRanks(dst, construct_adjacency_matrix=True)
    assert src == sorted({(R - 1) % N, (R - 2) % N}) and np.allclose(w.sum(0), 1) and w[R, (R + 1) % N] > 0
    assert bf.InferDestinationFromSourceRanks(src) == sorted(dst)


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    gen = torch.Generator().manual_seed(100 + R)
    data, target = torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randn(8, 1, generator=gen,
                                                                                      dtype=torch.float64)
    return model, data, target


def _grad(w: np.ndarray, rank: int) -> np.ndarray:
    """The least-squares gradient of rank ``rank``'s data at ``w`` (independent of torch's autograd)."""
    gen = torch.Generator().manual_seed(100 + rank)
    a = torch.randn(8, 3, generator=gen, dtype=torch.float64).numpy()
    b = torch.randn(8, 1, generator=gen, dtype=torch.float64).numpy()
    return 2 * a.T @ (a @ w.reshape(3, 1) - b).reshape(-1) / 8


def _step(opt, model, data, target):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(data), target).backward()
    opt.step()
    return model.weight.detach().reshape(-1).clone()


def test_optimizers_one_step_each():
    bf.init()
    lr = 0.1
    w = _recv_matrix(tu.ExponentialTwoGraph(N))
    cases = {
        "atc": lambda o, m: bf.DistributedAdaptThenCombineOptimizer(o, m, bf.CommunicationType.neighbor_allreduce),
        "awc": lambda o, m: bf.DistributedAdaptWithCombineOptimizer(o, m),
        "gradient": lambda o, m: bf.DistributedGradientAllreduceOptimizer(o, m),
        "allreduce-atc": lambda o, m: bf.DistributedAdaptThenCombineOptimizer(o, m, bf.CommunicationType.allreduce),
        "hierarchical": lambda o, m: bf.DistributedAdaptThenCombineOptimizer(
            o, m, bf.CommunicationType.hierarchical_neighbor_allreduce),
        "winput": lambda o, m: bf.DistributedWinPutOptimizer(o, m),
        "empty": lambda o, m: bf.DistributedAdaptThenCombineOptimizer(o, m, bf.CommunicationType.empty),
    }
    for name, build in cases.items():
        model, data, target = _model_and_data()
        opt = build(torch.optim.SGD(model.parameters(), lr=lr), model)
        if name == "winput":
            opt.force_barrier = True  # fold exactly this step's models
        x0 = model.weight.detach().reshape(-1).numpy().copy()
        x1 = _step(opt, model, data, target)
        local = np.stack([x0 - lr * _grad(x0, k) for k in range(N)])
        expected = {"atc": (w @ local)[R], "awc": local[R], "gradient": local.mean(0), "allreduce-atc": local.mean(0),
                    "hierarchical": local.mean(0), "winput": local[R], "empty": local[R]}[name]
        assert np.allclose(x1.numpy(), expected), (name, x1, expected)
        if name in ("awc", "winput"):  # the second step combines the models of the first
            x2 = _step(opt, model, data, target)
            everyone = _everyone(x1)
            expected = (w @ everyone)[R] - lr * _grad(everyone[R], R)
            assert np.allclose(x2.numpy(), expected), (name, x2, expected)
        opt.close()
    # num_steps_per_communication K counts forward passes, as BlueFog: K forwards and backwards with the
    # gradients accumulated, then one step, combines at that step ...
    model, data, target = _model_and_data()
    opt = bf.DistributedAdaptThenCombineOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model,
                                                  num_steps_per_communication=2)
    x0 = model.weight.detach().reshape(-1).numpy().copy()
    opt.zero_grad()
    for half in (slice(0, 4), slice(4, 8)):  # two halves, each loss halved: the full batch's gradient
        (torch.nn.functional.mse_loss(model(data[half]), target[half]) / 2).backward()
    opt.step()
    local = np.stack([x0 - lr * _grad(x0, k) for k in range(N)])
    assert np.allclose(model.weight.detach().reshape(-1).numpy(), (w @ local)[R])
    # ... while one forward per step makes the first step local and the second combine
    x1 = _step(opt, model, data, target)
    assert np.allclose(x1.numpy(), (w @ local)[R] - lr * _grad((w @ local)[R], R))
    x2 = _step(opt, model, data, target)
    local = np.stack([row - lr * _grad(row, k) for k, row in enumerate(_everyone(x1))])
    assert np.allclose(x2.numpy(), (w @ local)[R]), x2
    opt.close()
    # the window optimizer's window goes with unregister_window (BlueFog's name): topologies can change again
    model, _, _ = _model_and_data()
    opt = bf.DistributedWinPutOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert bf.set_topology(tu.RingGraph(N)) is False
    opt.unregister_window()
    assert bf.set_topology(tu.ExponentialTwoGraph(N))
    # per-step weights as attributes: a one-peer exchange after the step
    model, data, target = _model_and_data()
    opt = bf.DistributedAdaptThenCombineOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    opt.self_weight, opt.src_weights, opt.dst_weights = 0.5, {(R - 1) % N: 0.5}, {(R + 1) % N: 1.0}
    x0 = model.weight.detach().reshape(-1).numpy().copy()
    x1 = _step(opt, model, data, target)
    local = np.stack([x0 - lr * _grad(x0, k) for k in range(N)])
    assert np.allclose(x1.numpy(), (local[R] + local[(R - 1) % N]) / 2)
    # an explicit synchronize (gradient clipping) then a step that does not average again
    model, data, target = _model_and_data()
    opt = bf.DistributedGradientAllreduceOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model)
    torch.nn.functional.mse_loss(model(data), target).backward()
    opt.synchronize()
    with opt.skip_synchronize():
        opt.step()
    assert np.allclose(model.weight.detach().reshape(-1).numpy(), local.mean(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _, _ = _model_and_data()
        bf.DistributedNeighborAllreduceOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model).close()
    assert any(issubclass(c.category, PendingDeprecationWarning) for c in caught)


def test_broadcast_parameters_and_optimizer_state():
    bf.init()
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(R))
    bf.broadcast_parameters(model.state_dict(), root_rank=1)
    assert all(torch.all(p == 1.0) for p in model.parameters())
    bf.allreduce_parameters(list(model.parameters()))
    assert all(torch.all(p == 1.0) for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (R + 1))
    bf.broadcast_optimizer_state(opt, root_rank=2)  # a fresh optimizer: its state is created first
    assert np.isclose(opt.param_groups[0]["lr"], 0.03) and all("exp_avg" in opt.state[p] for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            opt.state[p]["exp_avg"].fill_(float(R))
    bf.broadcast_optimizer_state(opt, root_rank=3)
    assert all(torch.all(opt.state[p]["exp_avg"] == 3.0) for p in model.parameters())
    with bf.timeline_context("x", "ACTIVITY"):
        pass
    assert bf.timeline_start_activity("y", "A") and bf.timeline_end_activity("y") and not bf.timeline_end_activity("y")


def test_init_reads_bluefog_nodes_per_machine():
    """Last: restarts the runtime. BLUEFOG_NODES_PER_MACHINE (BlueFog's machines of k ranks, for testing
    hierarchical ops on one machine) is read when ``init`` starts the runtime."""
    import os

    from _common import Skip
    from mpi4py import MPI

    import gossip

    if MPI.COMM_WORLD.size != N:
        raise Skip("bf.init starts the runtime on MPI.COMM_WORLD: needs a job of this run only")
    bf.shutdown()
    os.environ["BLUEFOG_NODES_PER_MACHINE"] = "1"
    try:
        bf.init()
        assert (bf.local_size(), bf.machine_size(), bf.machine_rank()) == (1, N, R)
        assert bf.in_neighbor_machine_ranks() == bf.in_neighbor_ranks()  # exponential-2 over N machines
        bf.barrier()
    finally:
        del os.environ["BLUEFOG_NODES_PER_MACHINE"]
        bf.shutdown()
        gossip.init(GROUP, ranks_per_machine=2)  # the runtime as the runner started it
