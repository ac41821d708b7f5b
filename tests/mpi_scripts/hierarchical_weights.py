"""Hierarchical gossip with per-call machine weights, its non-blocking form, and the allreduce within each
machine, against closed forms: the machine means worked out in NumPy from the gathered tensors, then
y_M = self_weight · m_M + Σ_{M'} src_M[M'] · scale_{M'}[M] · m_M' from every machine's gathered weights.
Run with the ``ranks_per_machine=k`` setting to pretend k ranks per machine on one host."""

import gc

import numpy as np
import torch
from _common import GROUP, assert_close, device, expect_error, rank_values

import gossip

N = GROUP.size
R = GROUP.rank
BIG = 1_500_000  # float32 elements: 6 MB, several chunks between the leaders


def _machine_means(x: torch.Tensor) -> np.ndarray:
    """Row M: the mean of machine M's tensors (float64, flat)."""
    everyone = np.stack(GROUP.allgather(x.detach().to("cpu", torch.float64).numpy().reshape(-1)))
    machine_of = np.array(GROUP.allgather(gossip.machine_rank()))
    return np.stack([everyone[machine_of == m].mean(axis=0) for m in range(gossip.machine_size())])


def _expected(means: np.ndarray, self_weight: float, src: dict, dst: dict) -> np.ndarray:
    """This machine's y_M from every machine's (self_weight, src, dst), gathered (dst as {machine: scale})."""
    specs = dict(GROUP.allgather((gossip.machine_rank(), (self_weight, src, dst))))
    m = gossip.machine_rank()
    y = specs[m][0] * means[m]
    for j, w in specs[m][1].items():
        y = y + w * specs[j][2][m] * means[j]
    return y


def _ring_weights(scales: tuple[float, float]) -> tuple[dict, dict]:
    """Receive from machines M ± 1 (weights 0.25 and 0.5), send to them with the given scales."""
    machines, m = gossip.machine_size(), gossip.machine_rank()
    src, dst = {}, {}
    for offset, weight, scale in ((1, 0.25, scales[0]), (-1, 0.5, scales[1])):
        peer = (m + offset) % machines
        if peer != m and peer not in src:
            src[peer], dst[(m - offset) % machines] = weight, scale
    return src, dst


def test_bluefog_moves_the_next_machines_mean():
    """BlueFog's own cases: self weight 0, receive machine M + 1's mean (weight 1 with a list of
    destinations, weight 0.5 with scale 2): every rank ends with m_{M+1}."""
    machines, m = gossip.machine_size(), gossip.machine_rank()
    if machines == 1:
        return
    x = rank_values((5, 3), torch.float64)
    means = _machine_means(x)
    nxt, prev = (m + 1) % machines, (m - 1) % machines
    y = gossip.hierarchical_neighbor_allreduce(x, self_weight=0.0, src_machine_weights={nxt: 1.0},
                                               dst_machine_weights=[prev])
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, means[nxt], torch.float64, "move, unit scales")
    y = gossip.hierarchical_neighbor_allreduce(x, self_weight=0.0, src_machine_weights={nxt: 0.5},
                                               dst_machine_weights={prev: 2.0})
    assert_close(y, means[nxt], torch.float64, "move, scale 2 and weight 1/2")


def test_per_call_weights_closed_form_every_dtype():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for scales in ((1.0, 1.0), (2.0, 0.5)):
            x = rank_values((4, 6), dtype, seed=3)
            src, dst = _ring_weights(scales)
            y = gossip.hierarchical_neighbor_allreduce(x, self_weight=0.125, src_machine_weights=src,
                                                       dst_machine_weights=dst)
            assert y.dtype == dtype and torch.equal(x, rank_values((4, 6), dtype, seed=3))
            assert_close(y, _expected(_machine_means(x), 0.125, src, dst), dtype, f"per-call {scales}")


def test_lists_and_the_default_self_weight():
    machines, m = gossip.machine_size(), gossip.machine_rank()
    x = rank_values((7,), torch.float64, seed=4)
    means = _machine_means(x)
    peers = sorted({(m + 1) % machines, (m - 1) % machines} - {m})
    senders = sorted({(m - 1) % machines, (m + 1) % machines} - {m})  # the same machines: a symmetric ring
    y = gossip.hierarchical_neighbor_allreduce(x, src_machine_weights=peers, dst_machine_weights=senders)
    want = (means[m] + sum(means[p] for p in peers)) / (len(peers) + 1)  # uniform weights 1/(k + 1)
    assert_close(y, want, torch.float64, "lists: uniform weights")
    y = gossip.hierarchical_neighbor_allreduce(x, src_machine_weights={p: 0.25 for p in peers},
                                               dst_machine_weights=senders)
    assert_close(y, (1 - 0.25 * len(peers)) * means[m] + 0.25 * sum(means[p] for p in peers), torch.float64,
                 "default self_weight = 1 - sum(src)")
    # plain sums are allowed (weights need not sum to 1): self weight 1, every received weight 1
    y = gossip.hierarchical_neighbor_allreduce(x, self_weight=1.0, src_machine_weights={p: 1.0 for p in peers},
                                               dst_machine_weights=senders)
    assert_close(y, means[m] + sum(means[p] for p in peers), torch.float64, "plain sum of machine means")
    y = gossip.hierarchical_neighbor_allreduce(x, self_weight=0.5, dst_machine_weights=[])
    assert_close(y, 0.5 * means[m], torch.float64, "no peers: self weight only")


def test_async_forms_several_mb_inputs_dropped():
    """Handles of both forms in flight together, inputs built in the call and dropped, waited in reverse
    order, memory scribbled in between: 6 MB tensors between the leaders."""
    src, dst = _ring_weights((2.0, 1.0))
    x = rank_values((BIG,), torch.float32, seed=5)
    means = _machine_means(x)
    want_static = gossip.hierarchical_neighbor_allreduce(x)
    handles = [gossip.hierarchical_neighbor_allreduce_async(rank_values((BIG,), torch.float32, seed=5)),
               gossip.hierarchical_neighbor_allreduce_async(rank_values((BIG,), torch.float32, seed=5),
                                                            self_weight=0.25, src_machine_weights=src,
                                                            dst_machine_weights=dst)]
    del x
    gc.collect()
    junk = [torch.full((BIG,), 7.0, device=device()) for _ in range(6)]
    per_call, static = handles[1].wait(), handles[0].wait()
    del junk
    assert torch.equal(static, want_static), f"rank {R}: async static form differs from the blocking one"
    assert_close(per_call, _expected(means, 0.25, src, dst), torch.float32, "async per-call, 6 MB")
    out = torch.empty(BIG, device=device())
    assert gossip.hierarchical_neighbor_allreduce_async(rank_values((BIG,), torch.float32, seed=5),
                                                        out=out).wait() is out
    assert torch.equal(out, want_static)


def test_local_allreduce_is_the_machine_mean_or_sum():
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = rank_values((3, 5), dtype, seed=6)
        means = _machine_means(x)
        m = gossip.machine_rank()
        assert_close(gossip.local_allreduce(x), means[m], dtype, "local mean")
        assert_close(gossip.local_allreduce(x, "sum"), means[m] * gossip.local_size(), dtype, "local sum")
    ints = torch.arange(4, dtype=torch.int64, device=device()) * (R + 1)
    machine_of = np.array(GROUP.allgather(gossip.machine_rank()))
    mine = np.flatnonzero(machine_of == gossip.machine_rank())
    want = np.arange(4) * int(sum(r + 1 for r in mine))
    assert np.array_equal(gossip.local_allreduce(ints, "sum").cpu().numpy(), want)
    out = torch.empty(3, 5, device=device())
    assert gossip.local_allreduce(rank_values((3, 5), torch.float32), out=out) is out


def test_bad_input_raises_on_every_rank():
    machines, m = gossip.machine_size(), gossip.machine_rank()
    mismatch = gossip.InputMismatchError
    x = torch.zeros(3, device=device())
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(x, self_weight=0.5, src_machine_weights={}),
                 "need dst_machine_weights", error=mismatch)
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(x, dst_machine_weights=[machines]),
                 f"dst_machine_weights names machine {machines}, out of range", error=mismatch)
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(x, dst_machine_weights={m: 1.0}),
                 "own machine", error=mismatch)
    expect_error(lambda: gossip.hierarchical_neighbor_allreduce(x, gossip.topology(), dst_machine_weights=[]),
                 "not both", error=mismatch)
    expect_error(lambda: gossip.local_allreduce(x, "max"), "'mean' or 'sum'", error=mismatch)
    if gossip.layout().ranks_per_machine > 1:  # the ranks of a machine disagree on its weights
        expect_error(lambda: gossip.hierarchical_neighbor_allreduce(x, self_weight=0.5 + gossip.local_rank(),
                                                                    dst_machine_weights=[]),
                     "the ranks of machine 0 pass different machine weights", error=mismatch)
        expect_error(lambda: gossip.local_allreduce(torch.zeros(3 + gossip.local_rank(), device=device())),
                     "local_allreduce", error=mismatch)
    if machines > 1:
        # machine 0 sends to machine 1, which receives from nobody
        dst = [1] if m == 0 else []
        expect_error(lambda: gossip.hierarchical_neighbor_allreduce(x, self_weight=1.0, src_machine_weights={},
                                                                    dst_machine_weights=dst),
                     "which does not receive from", error=mismatch)
        # machine 0 takes per-call weights, the others the machine topology
        call = (lambda: gossip.hierarchical_neighbor_allreduce(x, dst_machine_weights=[])) if m == 0 else \
            (lambda: gossip.hierarchical_neighbor_allreduce(x))
        expect_error(call, "hierarchical_neighbor_allreduce", error=mismatch)
    y = gossip.hierarchical_neighbor_allreduce(rank_values((3,), torch.float64))  # usable afterwards
    assert y.shape == (3,)
