"""The hardware layout, gossip.probe() and the scheduler on the running job: the same finite model
on every rank; Scheduler.auto builds the schedule its cost model picks, and DSGD on it follows
x ← W(x − γg) with that plan's W. Run with the ``ranks_per_machine=k``
setting to pretend machines."""

import math

import numpy as np
import torch
from _common import GROUP, expect_error
from algorithms_sync import dsgd_follows

import gossip
import topologies
from gossip import CostModel, LinkCost, Scheduler
from gossip.plan.schedule import AllreduceSchedule, PeriodicGlobalAverage

N = GROUP.size
FAST, SLOW = LinkCost(0.0, 1e-12), LinkCost(0.0, 1e-9)  # bandwidth only
LATENCY = LinkCost(1e-5, 0.0)  # latency only


def test_layout():
    layout = gossip.layout()
    local_sizes = GROUP.allgather(gossip.local_size())
    assert (layout.size, layout.machines, layout.local_size) == (N, gossip.machine_size(), gossip.local_size())
    assert layout.ranks_per_machine == max(local_sizes)
    assert layout.gpus_per_machine == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert GROUP.allgather(layout.machines) == [layout.machines] * N


def test_probe_measures_the_links():
    model = gossip.probe(repeats=6)
    assert model.size == N and model.ranks_per_machine == max(GROUP.allgather(gossip.local_size()))
    assert GROUP.allgather(model) == [model] * N  # every rank got rank 0's measurements
    for link in (model.intra, model.inter):
        for value in (link.latency, link.inverse_bandwidth, link.reduce):
            assert math.isfinite(value) and value >= 0, model
    if N > 1:
        assert model.intra.latency + model.intra.inverse_bandwidth * 4e6 > 0  # a 4 MB message takes time
        small, large = model.predict(1e3), model.predict(1e8)
        assert all(large[plan] >= small[plan] for plan in small)
    expect_error(lambda: gossip.probe(small=10, large=5), "0 < small < large")


def test_auto_builds_and_runs_the_plan_it_chose():
    machines, k = gossip.machine_size(), gossip.layout().ranks_per_machine
    average = np.full((N, N), 1.0 / N)
    # small and latency-bound, with a large per-op overhead: allreduce
    chosen = Scheduler.auto(1e3, CostModel(LATENCY, LATENCY, N, k, overhead=1e-2))
    assert chosen.choice.name == "allreduce" and isinstance(chosen.schedule, AllreduceSchedule)
    assert "chosen: allreduce" in chosen.describe()
    dsgd_follows(chosen, lambda step: average)
    # bandwidth-bound, one rank per machine in the model: one-peer exponential-2
    chosen = Scheduler.auto(1e8, CostModel(SLOW, SLOW, N, 1))
    assert chosen.choice.name == "one-peer exponential-2", chosen.describe()
    one_peer = topologies.OnePeerExponentialTwo(N)
    dsgd_follows(chosen, one_peer.mixing_matrix)
    # fast machines, a slow network: hierarchical (machine average, one-peer between machines)
    if machines > 1 and k > 1:
        chosen = Scheduler.auto(1e8, CostModel(FAST, SLOW, N, k))
        assert chosen.choice.name == "hierarchical", chosen.describe()
        machine_of = np.array(GROUP.allgather(gossip.machine_rank()))
        sizes = np.bincount(machine_of)
        between = topologies.OnePeerExponentialTwo(machines)
        dsgd_follows(chosen, lambda step: between.mixing_matrix(step)[machine_of][:, machine_of]
                      / sizes[machine_of][None, :])
    # latency-bound, a mixing target of one step: only the static exponential graph meets it unaided
    chosen = Scheduler.auto(1e3, CostModel(LATENCY, LATENCY, N, 1), mixing_steps=1)
    assert chosen.choice.name == "exponential-2" and chosen.choice.global_avg_every is None, chosen.describe()
    dsgd_follows(chosen, lambda step: topologies.to_matrix(topologies.exponential_two(N)))
    # a fixed global averaging period H: Gossip-PGA over the chosen gossip
    chosen = Scheduler.auto(1e3, CostModel(LATENCY, LATENCY, N, 1), mixing_steps=1, global_avg_every=3)
    assert chosen.choice.name == "one-peer exponential-2" and isinstance(chosen.schedule, PeriodicGlobalAverage)
    dsgd_follows(chosen, lambda step: average if (step + 1) % 3 == 0 else one_peer.mixing_matrix(step))
    # a warm-up of exact averages before the gossip
    chosen = Scheduler.auto(1e8, CostModel(SLOW, SLOW, N, 1), warmup_steps=2)
    dsgd_follows(chosen, lambda step: average if step < 2 else one_peer.mixing_matrix(step))
    expect_error(lambda: Scheduler.auto(1e8, CostModel(SLOW, SLOW, N, 1), warmup_steps=-1), "warmup_steps")


def test_auto_probes_by_default_and_refuses_inconsistent_input():
    chosen = Scheduler.auto(4e3)
    assert chosen.cost.size == N and "chosen: " in chosen.describe()
    expect_error(lambda: Scheduler.auto(1e3, CostModel(LATENCY, LATENCY, N + 1, 1)), f"the job has {N}")
    expect_error(lambda: Scheduler.auto(0, CostModel(LATENCY, LATENCY, N, 1)), "model_bytes")
    # rank 0 alone thinks the model is large: the choices differ, every rank raises
    model_bytes = 1e8 if GROUP.rank == 0 else 1e3
    expect_error(lambda: Scheduler.auto(model_bytes, CostModel(LATENCY, SLOW, N, 1, overhead=1e-3)),
                 "Scheduler.auto chose", "on rank 0", error=gossip.InputMismatchError)
