"""Messages of several MB, where MPI no longer copies eagerly: every op against NumPy, buffers that
outlive the caller's handle, and (with ``debug_buffers``) the checks that catch misuse.

Run over Open MPI's TCP transport (``OMPI_MCA_btl=tcp,self``) and on emulated machines, where a
buffer freed or reused while in flight shows as a crash or as wrong values.
"""

import gc

import numpy as np
import torch
from _common import GROUP, assert_close, expect_error, gathered, rank_values

import algorithms
import gossip
import topologies
from gossip.runtime import current

N = GROUP.size
R = GROUP.rank
BIG = 1_500_000  # float32: 6 MB, several 1 MiB chunks


def _scribble() -> list[torch.Tensor]:
    """Allocate and fill memory, so that freed buffers are reused at once."""
    return [torch.full((BIG,), 7.0) for _ in range(4)]


def test_static_exponential_blocking_and_async():
    graph = topologies.exponential_two(N)
    gossip.set_topology(graph)
    w = topologies.mixing_matrix(graph)
    x = rank_values((BIG,), torch.float32, seed=1)
    rows = gathered(x)
    assert_close(gossip.neighbor_allreduce(x), w[R] @ rows, torch.float32, "blocking static, 6 MB")
    handles = [gossip.neighbor_allreduce_async(x * k) for k in (1.0, 2.0, 3.0)]
    junk = _scribble()
    for k, handle in reversed(list(zip((1.0, 2.0, 3.0), handles, strict=True))):
        assert_close(handle.wait(), k * (w[R] @ rows), torch.float32, f"async static x{k}, waited in reverse")
    del junk


def test_neighbor_allgather_rows_in_chunks():
    gossip.set_topology(topologies.exponential_two(N))
    x = rank_values((BIG,), torch.float32, seed=7)
    rows = gathered(x)
    got = gossip.neighbor_allgather(x).view(-1, *x.shape)  # the sources' tensors concatenated along dim 0
    assert got.shape == (len(gossip.in_neighbors()), BIG)
    for k, j in enumerate(gossip.in_neighbors()):
        assert_close(got[k], rows[j], torch.float32, f"neighbor_allgather row {k} from rank {j}, 6 MB")


def test_one_peer_exchanges_at_every_distance():
    schedule = topologies.OnePeerExponentialTwo(N)
    x = rank_values((BIG,), torch.float32, seed=2)
    for step in range(2 * schedule.period):
        p = schedule.peers(step, R)
        rows = gathered(x)
        handle = gossip.neighbor_allreduce_async(x, self_weight=p.self_weight, src_weights=p.src_weights,
                                                 dst_weights=p.dst_weights)
        junk = _scribble()
        y = handle.wait()
        del junk
        assert_close(y, schedule.mixing_matrix(step)[R] @ rows, torch.float32, f"one-peer step {step}, 6 MB")
        x = y


def test_dropped_handles_keep_their_buffers_until_complete():
    if N == 1:
        return
    rt = current()
    before = rt.in_flight.adopted
    x = rank_values((BIG,), torch.float32, seed=3)
    for _ in range(3):
        gossip.neighbor_allreduce_async(x.clone(), self_weight=0.5, src_weights={(R - 1) % N: 0.5},
                                        dst_weights=[(R + 1) % N])  # dropped at once, receive buffer too
        gc.collect()
        junk = _scribble()
        del junk
    assert rt.in_flight.adopted - before == 3
    rows = gathered(x)
    y = gossip.neighbor_allreduce(x, self_weight=0.5, src_weights={(R - 1) % N: 0.5}, dst_weights=[(R + 1) % N])
    assert_close(y, 0.5 * rows[R] + 0.5 * rows[(R - 1) % N], torch.float32, "the exchange after dropped ones")


def test_dropped_overlapped_optimizer_then_another():
    """What crashed: an adapt-while-combine optimizer collected with its next gossip in flight."""
    for name in ("dsgd-awc", "awc-dmsgd"):
        model = torch.nn.Linear(1000, 1000)
        opt = algorithms.create(name, model.parameters(), lr=0.01, topology=topologies.OnePeerExponentialTwo(N))
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 1000)).square().mean().backward()
            opt.step()
        del opt, model
        gc.collect()
        junk = _scribble()
        del junk
    x = rank_values((BIG,), torch.float32, seed=4)
    rows = gathered(x)
    w = topologies.mixing_matrix(topologies.ring(N))
    gossip.set_topology(topologies.ring(N))
    assert_close(gossip.neighbor_allreduce(x), w[R] @ rows, torch.float32, "static ring after the dropped ones")
    current().in_flight.complete_all()  # every rank adopted the same ops: they all complete
    assert current().in_flight.pending() == 0


def test_collectives_and_hierarchical():
    x = rank_values((BIG,), torch.float32, seed=5)
    rows = gathered(x)
    assert_close(gossip.allreduce(x), rows.mean(axis=0), torch.float32, "allreduce mean, 6 MB")
    assert_close(gossip.broadcast(x, root=N - 1), rows[N - 1], torch.float32, "broadcast, 6 MB")
    machines = gossip.machine_size()
    y = gossip.hierarchical_neighbor_allreduce(x)
    local = np.array(GROUP.allgather(gossip.machine_rank()))
    means = np.stack([rows[local == m].mean(axis=0) for m in range(machines)])
    w = topologies.mixing_matrix(topologies.exponential_two(machines))
    assert_close(y, w[gossip.machine_rank()] @ means, torch.float32, "hierarchical, 6 MB")


def test_debug_mode_catches_a_sent_tensor_written_in_flight():
    if not current().debug_buffers or N == 1:
        return
    x = rank_values((BIG,), torch.float32, seed=6)
    handle = gossip.neighbor_allreduce_async(x, self_weight=0.5, src_weights={(R - 1) % N: 0.5},
                                             dst_weights=[(R + 1) % N])
    x.add_(1.0)  # misuse: the tensor is still being sent
    expect_error(handle.wait, "modified before the op completed", error=gossip.GossipError)


def test_debug_mode_poisons_released_buffers():
    if not current().debug_buffers:
        return
    pool = current().pool
    buf = pool.acquire(1000, torch.float32, torch.device("cpu"))
    buf.fill_(1.0)
    pool.release(buf)
    assert torch.isnan(buf).all(), "a released buffer must be poisoned in debug mode"
    expect_error(lambda: pool.release(buf), "released twice", error=RuntimeError)
    assert pool.acquire(1000, torch.float32, torch.device("cpu")).data_ptr() == buf.data_ptr()


def test_emulated_machines_are_separate_hosts():
    """Under ``gossiprun --emulate`` every machine is its own host to MPI: shared memory within, TCP between."""
    import os
    import socket

    if "GOSSIP_EMULATED_LINK_BITS" not in os.environ:
        return
    names = GROUP.allgather(socket.gethostname())
    assert len(set(names)) == gossip.machine_size() > 1, (names, gossip.machine_size())
    assert not gossip.uses_shared_memory()


def test_progress_thread_runs_when_asked_and_sleeps_when_idle():
    progress = current().progress
    if not gossip.settings().progress_thread:
        assert progress is None
        return
    assert progress is not None and progress._thread.is_alive()
    assert current().in_flight.active == 0, "nothing is in flight between tests"
