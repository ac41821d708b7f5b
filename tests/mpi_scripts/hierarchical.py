"""Hierarchical neighbour averaging against its closed form: machine means (from the gathered
tensors and each rank's machine) mixed by the machine-level W, on every rank of each machine.
Run with the ``ranks_per_machine=k`` setting to pretend k ranks per machine on one host."""

import numpy as np
import torch
from _common import GROUP, expect_error, rank_values
from algorithms_sync import dsgd_follows

import gossip
import topologies
from gossip.plan.schedule import HierarchicalSchedule, schedule_for

N = GROUP.size
R = GROUP.rank


def _layout() -> np.ndarray:
    return np.array(GROUP.allgather(gossip.machine_rank()))


def _sized(w: np.ndarray, machine_of: np.ndarray) -> np.ndarray:
    """What hierarchical gossip applies to the machine means for machine-level W: W itself on machines of
    equal size; for sizes s, off-diagonal rows scaled by s_min/s_M and the diagonal 1 − (1 − W_MM)s_min/s_M
    (row-stochastic with sᵀW̃ = sᵀ: the average over ranks is kept)."""
    sizes = np.bincount(machine_of)
    keep = sizes.min() / sizes
    sized = keep[:, None] * w
    np.fill_diagonal(sized, 1 - keep * (1 - np.diag(w)))
    if sizes.min() != sizes.max():
        assert np.allclose(sizes @ sized, sizes) and np.allclose(sized.sum(1), 1)
    return sized


def _expected(x: torch.Tensor, w: np.ndarray) -> np.ndarray:
    everyone = np.stack(GROUP.allgather(x.detach().double().cpu().numpy().reshape(-1)))
    machine_of = _layout()
    means = np.stack([everyone[machine_of == m].mean(axis=0) for m in range(gossip.machine_size())])
    return (_sized(w, machine_of) @ means)[gossip.machine_rank()]


def test_machine_layout_is_consistent():
    machine_of = _layout()
    assert sorted(set(machine_of)) == list(range(gossip.machine_size()))
    assert np.all(np.diff(machine_of) >= 0)  # machines are blocks of consecutive ranks here
    assert gossip.local_size() == int(np.sum(machine_of == gossip.machine_rank()))


def test_closed_form_on_static_and_time_varying_machine_graphs():
    machines = gossip.machine_size()
    cases = [(None, topologies.to_matrix(topologies.exponential_two(machines)), 0),
             (topologies.ring(machines), topologies.to_matrix(topologies.ring(machines)), 0)]
    family = topologies.OnePeerExponentialTwo(machines)
    cases += [(family, family.mixing_matrix(step), step) for step in range(3)]
    for machine_topology, w, step in cases:
        for dtype in (torch.float32, torch.float64):
            x = rank_values((3, 4), dtype, seed=step)
            y = gossip.hierarchical_neighbor_allreduce(x, machine_topology, step)
            assert y.shape == x.shape and y.dtype == dtype
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            assert np.allclose(y.double().cpu().numpy().reshape(-1), _expected(x, w), rtol=tol, atol=tol), (step, dtype)
            assert torch.equal(x, rank_values((3, 4), dtype, seed=step))  # input untouched
    half = rank_values((5,), torch.bfloat16)
    y = gossip.hierarchical_neighbor_allreduce(half)
    assert y.dtype == torch.bfloat16
    w = topologies.to_matrix(topologies.exponential_two(machines))
    assert np.allclose(y.double().cpu().numpy(), _expected(half, w), rtol=2e-2, atol=2e-2)
    out = torch.empty(3, 4)
    got = gossip.hierarchical_neighbor_allreduce(rank_values((3, 4), torch.float32), out=out)
    assert got is out


def test_one_machine_is_the_global_average_and_repeats_reach_consensus():
    x = rank_values((6,), torch.float64)
    mean = np.mean(np.stack(GROUP.allgather(x.cpu().numpy())), axis=0)
    if gossip.machine_size() == 1:
        assert np.allclose(gossip.hierarchical_neighbor_allreduce(x).cpu().numpy(), mean, atol=1e-12)
    family = topologies.OnePeerExponentialTwo(gossip.machine_size())
    y = x
    for step in range(12):
        y = gossip.hierarchical_neighbor_allreduce(y, family, step)
    sizes = np.bincount(_layout())  # ranks per machine (one collective, on every rank)
    if gossip.machine_size() & (gossip.machine_size() - 1) == 0 and len(set(sizes)) == 1:
        assert np.allclose(y.cpu().numpy(), mean, atol=1e-10)  # equal machines, a power of two: exact
    if gossip.machine_size() == 2 and len(set(sizes)) == 2:  # unequal machines: the average over ranks, not machines
        assert np.allclose(y.cpu().numpy(), mean, atol=1e-5), (y, mean)


def test_bad_input_raises_on_every_rank():
    machines = gossip.machine_size()
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(torch.zeros(3), topologies.ring(machines + 2)),
                 "machine topology has", f"{machines + 2} nodes")
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(torch.zeros(3, dtype=torch.int64)), "float tensor")
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(torch.zeros(3), step=-1), "step must be")
    if N > 1:
        expect_error(lambda: gossip.hierarchical_neighbor_allreduce(torch.zeros(4 if R == N - 1 else 3)),
                     "hierarchical_neighbor_allreduce", error=gossip.InputMismatchError)


def test_dsgd_on_a_hierarchical_schedule_follows_its_equation():
    """x ← W_h (x − γ g) with W_h[i, j] = W̃_machines(k)[M(i), M(j)] / |M(j)|, step by step (W̃: :func:`_sized`)."""
    machine_of = _layout()
    sizes = np.bincount(machine_of)
    family = topologies.OnePeerExponentialTwo(gossip.machine_size())
    for schedule, w_machines in ((HierarchicalSchedule(), family.mixing_matrix),
                                 (HierarchicalSchedule(topologies.ring(gossip.machine_size())),
                                  lambda k: topologies.to_matrix(topologies.ring(gossip.machine_size()))),
                                 (schedule_for("hierarchical"), family.mixing_matrix)):
        assert "hierarchical" in schedule.describe()
        dsgd_follows(schedule, lambda step, w=w_machines: _sized(w(step), machine_of)[machine_of][:, machine_of]
                     / sizes[machine_of][None, :], steps=4, seed=2)
    expect_error(lambda: HierarchicalSchedule(topologies.ring(gossip.machine_size() + 3)), "machine topology has")
