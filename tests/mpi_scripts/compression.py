"""Compressed ops and CHOCO-SGD against NumPy, with the bytes they count checked against the topology.

The expected values never come from the code under test: every compressor's round trip is
re-implemented below in NumPy from its documented wire format (:func:`np_roundtrip`), each rank's
state is gathered with plain mpi4py, and CHOCO-SGD's recursion is written out on the full (n, d)
state, with one public copy per rank (static graph) or per edge (time-varying family). The run's
``large`` parameter makes the op tensors several MB (the TCP job).
"""

import math

import numpy as np
import torch
from _common import GROUP, device, expect_error, gathered, param

import gossip
import topologies
from algorithms.choco_sgd import ChocoSGD
from gossip.ops.compressed import compressed_allreduce_async

N = GROUP.size
R = GROUP.rank
NUMEL = 1_500_001 if param("large", False) else 1001  # odd: a partial last block, an odd number of nibbles


def np_roundtrip(c: gossip.Compressor, x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """What ``c`` makes of ``x`` (values exactly representable in ``dtype``), after its wire format, in NumPy."""
    work = np.float64 if dtype == torch.float64 else np.float32
    x = x.astype(work)
    n = x.size
    if isinstance(c, gossip.Identity):
        return x.astype(np.float64)
    if isinstance(c, gossip.Float16):
        return x.astype(np.float16).astype(np.float64)
    if isinstance(c, gossip.BFloat16):  # float32 -> bfloat16, round to nearest even, on the bits
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    if isinstance(c, gossip.Int8 | gossip.Int4 | gossip.SignNorm):  # per block, padded with zeros to whole blocks
        blocks = np.zeros(-(-n // c.block) * c.block, dtype=work)
        blocks[:n] = x
        blocks = blocks.reshape(-1, c.block)
        if isinstance(c, gossip.SignNorm):
            counts = np.minimum(c.block, n - c.block * np.arange(blocks.shape[0]))
            scale = (np.abs(blocks).sum(axis=1) / counts.astype(work)).astype(np.float32)[:, None]
            levels = np.where(blocks < 0, -1.0, 1.0)
        else:
            assert c.rounding == "nearest"
            top = work(127 if isinstance(c, gossip.Int8) else 7)
            scale = (np.abs(blocks).max(axis=1) / top).astype(np.float32)[:, None]
            levels = np.clip(np.round(blocks / np.where(scale > 0, scale, 1).astype(work)), -top, top)
        return (levels.astype(np.float32) * scale).reshape(-1)[:n].astype(np.float64)
    if isinstance(c, gossip.TopK):
        k = min(n, max(1, math.ceil(c.fraction * n)))
        kept = np.argsort(-np.abs(x), kind="stable")[:k]
        out = np.zeros(n)
        out[kept] = x[kept]
        return out
    raise AssertionError(f"no NumPy round trip for {c}")


def deterministic() -> list[gossip.Compressor]:
    if param("large", False):  # messages of 6, 3 and 1.5 MB
        return [gossip.Identity(), gossip.BFloat16(), gossip.Int8(block=100, rounding="nearest")]
    return [gossip.Identity(), gossip.Float16(), gossip.BFloat16(), gossip.Int8(block=100, rounding="nearest"),
            gossip.Int4(block=64, rounding="nearest"), gossip.TopK(0.05), gossip.SignNorm(block=256)]


def values(seed: int, rank: int = R) -> torch.Tensor:
    """``rank``'s float32 test tensor: random signs and magnitudes in (0, 3], distinct over the elements of all
    ranks (no tie for top-k to break, even in a sum's blocks, which hold several ranks' values)."""
    g = torch.Generator().manual_seed(1000 * seed + rank)
    magnitudes = (torch.randperm(NUMEL, generator=g).double() * N + rank + 1) * (3.0 / (N * NUMEL))
    signs = torch.randint(0, 2, (NUMEL,), generator=g).double() * 2 - 1
    return (magnitudes * signs).float().to(device())


def close(got: torch.Tensor, want: np.ndarray, what: str, rtol: float = 1e-6) -> None:
    got = got.detach().to("cpu", torch.float64).reshape(-1).numpy()
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= rtol * scale, f"rank {R}: {what} off by {err:.3g} (scale {scale:.3g})"


# --- the ops ---------------------------------------------------------------------------------------

def spans(numel: int) -> list[tuple[int, int]]:
    """The blocks of the compressed allreduce: rank b reduces the b-th of N contiguous blocks, the first
    numel mod N of them one element longer than the rest."""
    bounds, at = [], 0
    for b in range(N):
        length = numel // N + (1 if b < numel % N else 0)
        bounds.append((at, at + length))
        at += length
    return bounds


def np_two_stage(c: gossip.Compressor, rows: np.ndarray, op: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """The compressed reduce-scatter and allgather in NumPy: (the result, each rank's blocks after stage 1).
    Stage 1 decodes every rank's block, sums in float32 in rank order and divides by N in float32;
    stage 2 is the round trip of that reduced block."""
    numel = rows.shape[1]
    first, result = np.zeros_like(rows), np.zeros(numel)
    for a, b in spans(numel):
        if b == a:
            continue
        decoded = np.stack([np_roundtrip(c, row[a:b], torch.float32) for row in rows])
        first[:, a:b] = decoded
        acc = np.zeros(b - a, dtype=np.float32)
        for row in decoded:
            acc = acc + row.astype(np.float32)
        if op == "mean":
            acc = acc / np.float32(N)
        result[a:b] = np_roundtrip(c, acc.astype(np.float64), torch.float32)
    return result, first


def wire_counts(c: gossip.Compressor, numel: int) -> tuple[int, int]:
    """(bytes, messages) this rank hands MPI: every other rank's block once, its own reduced block N − 1 times."""
    sizes = [c.wire_bytes(b - a) if b > a else 0 for a, b in spans(numel)]
    others = [size for k, size in enumerate(sizes) if k != R and size]
    return sum(others) + (N - 1) * sizes[R], len(others) + (N - 1 if sizes[R] else 0)


def test_compressed_allreduce_is_a_compressed_reduce_scatter_and_allgather():
    """Deterministic compressors: the result is NumPy's two-stage computation (stage-1 round trip of every
    rank's block, float32 sum, stage-2 round trip of the reduced block), bitwise equal on every rank;
    ``sent`` is this rank's stage-1 blocks; the bytes counted, by the compressor and by gossip.traffic,
    are the messages' exact sizes: 2(N − 1)/N compressed copies of the tensor."""
    for k, c in enumerate(deterministic()):
        x = values(k)
        own = torch.empty_like(x)
        gossip.reset_traffic()
        result = gossip.compressed_allreduce(x, c, sent=own)
        want, first = np_two_stage(c, gathered(x))
        close(own, first[R], f"{c}: sent", rtol=1e-6)
        close(result, want, f"{c}: compressed_allreduce mean")
        everyone = gathered(result)
        assert (everyone == everyone[0]).all(), f"rank {R}: {c}: the ranks' results differ"
        assert result.dtype == x.dtype and result.shape == x.shape
        nbytes, messages = wire_counts(c, NUMEL)
        assert c.bytes_sent == nbytes and c.messages_sent == messages, (c, c.bytes_sent, nbytes)
        assert gossip.traffic().by_op.get("compressed_allreduce", (0, 0))[0] == nbytes, gossip.traffic()
        if N > 1:
            whole = c.wire_bytes(NUMEL)
            assert nbytes <= 2 * (N - 1) * whole // N + 2 * N * 256, (nbytes, whole)  # a few block scales more
        summed = gossip.compressed_allreduce(x, c, "sum")
        close(summed, np_two_stage(c, gathered(x), "sum")[0], f"{c}: compressed_allreduce sum", rtol=2e-6)
    tiny = values(5)[:2].contiguous()  # fewer elements than ranks: empty blocks send nothing
    c = gossip.Int8(block=100, rounding="nearest")
    close(gossip.compressed_allreduce(tiny, c), np_two_stage(c, gathered(tiny))[0], "two elements")
    assert c.bytes_sent == wire_counts(c, 2)[0]


def test_compressed_allreduce_async_overlaps_the_allgather():
    """Two compressed allreduces in flight, waited on in reverse order: each equals the blocking op, bitwise."""
    c = gossip.Int8(block=100, rounding="nearest")
    a, b = values(30), values(31)
    first = compressed_allreduce_async(a, c)
    second = compressed_allreduce_async(b, c, "sum")
    got_b, got_a = second.wait(), first.wait()
    assert torch.equal(got_a, gossip.compressed_allreduce(a, c))
    assert torch.equal(got_b, gossip.compressed_allreduce(b, c, "sum"))


def test_stochastic_compressors_reduce_what_each_rank_sent():
    """Stochastic rounding and random-k: stage 1 reduces exactly the values each rank's blocks decode to
    (gathered through ``sent``); stage 2 rounds the reduced block once more, within one level of each
    quantizer block's scale, and random-k with a shared seed keeps the same indices on every rank and
    in both stages, so it returns that mean."""
    for k, c in enumerate([gossip.Int8(seed=R), gossip.Int4(seed=7 + R), gossip.RandomK(0.1, seed=3)]):
        x = values(10 + k)
        own = torch.empty_like(x)
        result = gossip.compressed_allreduce(x, c, sent=own)
        sent = gathered(own)
        mean = np.zeros(NUMEL, dtype=np.float32)
        for row in sent:
            mean = mean + row.astype(np.float32)
        mean = (mean / np.float32(N)).astype(np.float64)
        everyone = gathered(result)
        assert (everyone == everyone[0]).all(), f"rank {R}: {c}: the ranks' results differ"
        if isinstance(c, gossip.RandomK):
            close(result, mean, f"{c}: mean of what was sent")
            support = sent != 0
            assert (support == support[0]).all(), "random-k with a shared seed: the same indices on every rank"
            assert support[0].sum() <= sum(c.kept(b - a) for a, b in spans(NUMEL))
        else:
            for a, b in spans(NUMEL):
                block = np.zeros(-(-(b - a) // c.block) * c.block)
                block[:b - a] = mean[a:b]
                scale = np.abs(block.reshape(-1, c.block)).max(axis=1) / c.levels
                bound = np.repeat(scale, c.block)[:b - a] * (1 + 1e-5) + 1e-7
                err = np.abs(result.cpu().double().numpy()[a:b] - mean[a:b])
                assert (err <= bound).all(), f"rank {R}: {c}: stage 2 off by {float((err / bound).max()):.3g} levels"
        assert c.bytes_sent == wire_counts(c, NUMEL)[0]


def test_bfloat16_on_the_wire_is_summed_in_float32():
    """1 + r/128 is exact in bfloat16, but the sum over ranks needs more than bfloat16's 8 bits: the
    float32 sum is exact and goes back on the wire rounded once, bf16(Σ); a running sum in bfloat16
    would round at every addition and end elsewhere."""
    x = torch.full((NUMEL,), 1.0 + R / 128.0, device=device())
    exact = sum(1.0 + r / 128.0 for r in range(N))
    once = float(torch.tensor(exact).to(torch.bfloat16))
    got = gossip.compressed_allreduce(x, gossip.BFloat16(), "sum")
    assert got.dtype == torch.float32
    assert bool((got == once).all()), f"rank {R}: {got[:3]} != {once}"
    running = torch.tensor(0.0, dtype=torch.bfloat16)
    for r in range(N):
        running = running + torch.tensor(1.0 + r / 128.0, dtype=torch.bfloat16)
    if N >= 3:
        assert float(running) != once  # what a bfloat16 sum would give
    half = gossip.compressed_allreduce(x.to(torch.bfloat16), gossip.BFloat16(), "sum")
    assert half.dtype == torch.bfloat16 and bool((half.float() == once).all())


def test_compressed_neighbor_allreduce_static_and_dynamic():
    """The weighted sum of every rank's round trip, own included, on the static topology (a
    neighbourhood collective) and on a ring given per call (point-to-point); bytes = out-degree
    message sizes."""
    graph = topologies.ring(N)
    gossip.set_topology(graph)
    w = topologies.to_matrix(graph)
    for k, c in enumerate(deterministic()):
        x = values(20 + k)
        decoded = np.stack([np_roundtrip(c, row, torch.float32) for row in gathered(x)])
        own = torch.empty_like(x)
        close(gossip.compressed_neighbor_allreduce(x, c, sent=own), w[R] @ decoded, f"{c}: static ring")
        close(own, decoded[R], f"{c}: static sent", rtol=1e-6)
        outdegree = len(gossip.out_neighbors())
        assert c.bytes_sent == outdegree * c.wire_bytes(NUMEL) and c.messages_sent == outdegree
        if N > 1:
            c.reset_counters()
            left, right = (R - 1) % N, (R + 1) % N
            y = gossip.compressed_neighbor_allreduce(x, c, self_weight=0.5, src_weights={left: 0.5},
                                                     dst_weights=[right])
            close(y, 0.5 * decoded[R] + 0.5 * decoded[left], f"{c}: dynamic one-peer")
            assert c.bytes_sent == c.wire_bytes(NUMEL)


def test_compressed_neighbor_exchange_sends_each_destination_its_own_message():
    """One-peer exponential-2 steps with a different tensor for every destination: each receiver
    gets NumPy's round trip of what its source meant for it; bytes = one message per destination."""
    family = topologies.OnePeerExponentialTwo(N)
    large = param("large", False)
    c = gossip.Int8(block=100, rounding="nearest") if large else gossip.TopK(0.1)
    steps = 1 if large else family.period + 1
    for step in range(steps):
        peers = family.peers(step, R)
        sends = {d: values(100 * step + d) * (R + 1) for d in peers.dst_weights}
        got = gossip.compressed_neighbor_exchange(sends, sorted(peers.src_weights), c, like=values(0))
        for d, t in sends.items():
            close(got.sent[d], np_roundtrip(c, t.cpu().double().numpy(), torch.float32), f"step {step}: sent to {d}")
        for j in peers.src_weights:
            meant = values(100 * step + R, rank=j) * (j + 1)  # what rank j built for this rank
            close(got.received[j], np_roundtrip(c, meant.cpu().double().numpy(), torch.float32),
                  f"step {step}: received from {j}")
    sent_messages = sum(len(family.peers(s, R).dst_weights) for s in range(steps))
    assert c.bytes_sent == sent_messages * c.wire_bytes(NUMEL) and c.messages_sent == sent_messages
    total_sent = GROUP.allreduce(c.bytes_sent)
    total_received = GROUP.allreduce(sum(len(family.peers(s, R).src_weights) for s in range(steps)))
    assert total_sent == total_received * c.wire_bytes(NUMEL)  # every byte counted went to a rank that took it


def test_mismatched_compressors_are_refused_on_every_rank():
    if N == 1:
        return
    x = values(0)
    c = gossip.TopK(0.1 if R else 0.2)
    expect_error(lambda: gossip.compressed_allreduce(x, c), "compressed_allreduce", error=gossip.InputMismatchError)
    expect_error(lambda: gossip.compressed_allreduce(x.int(), gossip.Int8()), "compressed_allreduce",
                 error=gossip.InputMismatchError)


# --- CHOCO-SGD ------------------------------------------------------------------------------------

D = 37  # parameters: a weight of 30 and a bias of 7, in two parameter groups


def problem(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's least-squares batch at ``step`` (different data on every rank)."""
    g = torch.Generator().manual_seed(7919 * step + R)
    a = torch.randn(12, 30, generator=g, dtype=torch.float64) + 0.3 * R
    return a.to(device()), torch.randn(12, 7, generator=g, dtype=torch.float64).to(device())


def make(topology, compressor, gamma=0.6, momentum=0.0, weight_decay=0.0, seed=0) -> tuple[ChocoSGD, list]:
    g = torch.Generator().manual_seed(seed + R)  # different on every rank: the optimizer broadcasts rank 0's
    w = torch.nn.Parameter(torch.randn(30, generator=g, dtype=torch.float64).to(device()))
    b = torch.nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64).to(device()))
    groups = [{"params": [w]}, {"params": [b], "lr": 0.03}]
    opt = ChocoSGD(groups, lr=0.05, topology=topology, compressor=compressor, consensus_step=gamma,
                   momentum=momentum, weight_decay=weight_decay)
    return opt, [w, b]


def backward(params, step: int) -> None:
    w, b = params
    a, y = problem(step)
    (0.5 * ((a @ w)[:, None] + b[None, :] - y).square().mean()).backward()


def rates(opt: ChocoSGD) -> np.ndarray:
    return np.concatenate([np.full(30, 0.05), np.full(7, 0.03)])


def choco_follows(topology, compressor, steps: int = 6, **hyper) -> ChocoSGD:
    """Step ``steps`` times; after each step the gathered models must follow NumPy's CHOCO recursion
    (identity compressor: DSGD-like x + γ (W x − x) on the half step, no public copies at all)."""
    opt, params = make(topology, compressor, **hyper)
    gamma, beta, wd = hyper.get("gamma", 0.6), hyper.get("momentum", 0.0), hyper.get("weight_decay", 0.0)
    lr = rates(opt)
    x = gathered(opt.x)
    assert np.allclose(x, x[0]), "every rank starts from rank 0's parameters"
    m = np.zeros_like(x)
    x_hat = np.zeros_like(x)  # static: one public copy per rank
    copies: dict[tuple[int, int], np.ndarray] = {}  # time-varying: one per directed edge (j, i)
    dynamic = isinstance(topology, topologies.DynamicTopology)
    for step in range(steps):
        opt.zero_grad()
        backward(params, step)
        g = gathered(opt.g) + wd * x
        opt.step()
        if beta:
            m = beta * m + g
            g = m
        half = x - lr * g
        w = topology.mixing_matrix(step) if dynamic else topologies.to_matrix(topology)
        if isinstance(compressor, gossip.Identity):
            x = half + gamma * (w @ half - half)
        elif not dynamic:
            x_hat = x_hat + np.stack([np_roundtrip(compressor, half[i] - x_hat[i], torch.float64) for i in range(N)])
            x = half + gamma * (w @ x_hat - x_hat)
        else:
            edges = [(j, i) for j in range(N) for i in topology.peers(step, j).dst_weights]
            for j, i in edges:
                copy = copies.setdefault((j, i), np.zeros(D))
                copies[(j, i)] = copy + np_roundtrip(compressor, half[j] - copy, torch.float64)
            x = half.copy()
            for j, i in edges:
                x[i] += gamma * w[i, j] * copies[(j, i)]
                x[j] -= gamma * w[i, j] * copies[(j, i)]
        got = gathered(opt.x)
        err = float(np.abs(got - x).max())
        assert err < 1e-10, f"rank {R}: {opt.compressor} on {opt.describe()}, step {step}: off by {err:.3g}"
    return opt


def test_choco_sgd_on_a_static_ring_follows_the_paper():
    ring = topologies.ring(N)
    for compressor in (gossip.Identity(), gossip.TopK(0.2), gossip.Int8(block=16, rounding="nearest")):
        opt = choco_follows(ring, compressor, steps=6)
        outdegree = len(gossip.out_neighbors())
        assert opt.bytes_sent == 6 * outdegree * compressor.wire_bytes(D, torch.float64), opt.bytes_sent
    choco_follows(ring, gossip.TopK(0.3), steps=5, gamma=0.4, momentum=0.9, weight_decay=0.01)


def test_choco_sgd_identity_with_unit_step_is_dsgd():
    """γ = 1 and no compression: x ← W (x − η g), DSGD adapt-then-combine."""
    ring = topologies.ring(N)
    choco_follows(ring, gossip.Identity(), steps=4, gamma=1.0)


def test_choco_sgd_on_a_time_varying_family_keeps_one_copy_per_edge():
    family = topologies.OnePeerExponentialTwo(N)
    for compressor in (gossip.Identity(), gossip.TopK(0.2), gossip.Int8(block=16, rounding="nearest")):
        opt = choco_follows(family, compressor, steps=2 * family.period + 1)
        sends = sum(len(family.peers(s, R).dst_weights) for s in range(2 * family.period + 1))
        assert opt.bytes_sent == sends * compressor.wire_bytes(D, torch.float64)
        assert set(opt.sent_copies) == {d for s in range(family.period) for d in family.peers(s, R).dst_weights}
    choco_follows(topologies.RandomMatching(N, seed=5), gossip.TopK(0.3), steps=4, momentum=0.5)


def test_choco_sgd_keeps_the_average_and_reaches_consensus():
    """Σ_i x_i moves only by the gradient steps (the consensus step keeps it), and with top-k the
    ranks still agree: plain averaging steps with no gradient shrink the consensus distance."""
    for topology in (topologies.ring(N), topologies.OnePeerExponentialTwo(N)):
        opt, params = make(topology, gossip.TopK(0.3), gamma=0.3, seed=4)
        with torch.no_grad():
            opt.x.add_(torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(R)).to(device()))
        mean = gathered(opt.x).mean(axis=0)
        start = gossip.metrics.consensus_distance(opt.x)
        for _ in range(60):
            opt.zero_grad()  # zero gradient: only the consensus steps move x
            opt.step()
        assert np.allclose(gathered(opt.x).mean(axis=0), mean, atol=1e-12)
        if N > 1:
            assert gossip.metrics.consensus_distance(opt.x) < 1e-3 * start


def test_choco_sgd_state_dict_round_trips_bitwise():
    """Mid-run save and load (public copies, per-edge copies, momentum, the compressor's random state):
    the next steps repeat bitwise."""
    for topology in (topologies.ring(N), topologies.OnePeerExponentialTwo(N)):
        opt, params = make(topology, gossip.Int8(block=8, seed=R), momentum=0.9)
        for step in range(3):
            opt.zero_grad()
            backward(params, step)
            opt.step()
        saved, x_saved = opt.state_dict(), opt.x.clone()
        after = []
        for step in range(3, 6):
            opt.zero_grad()
            backward(params, step)
            opt.step()
            after.append(opt.x.clone())
        fresh, fresh_params = make(topology, gossip.Int8(block=8, seed=99))
        with torch.no_grad():
            fresh.x.copy_(x_saved)
        fresh.load_state_dict(saved)
        assert fresh.step_count == 3
        for k, step in enumerate(range(3, 6)):
            fresh.zero_grad()
            backward(fresh_params, step)
            fresh.step()
            assert torch.equal(fresh.x, after[k]), f"rank {R}: step {step} differs after load_state_dict"


def test_choco_sgd_refuses_what_it_cannot_run():
    expect_error(lambda: make("allreduce", "int8"), "static graph or a time-varying family")
    expect_error(lambda: make(None, "int8", gamma=0.0), "consensus_step")
    expect_error(lambda: make(None, "gzip"), "unknown compressor")
    opt, _ = make(None, "topk-0.01")
    assert "TopK(0.01)" in opt.describe() and opt.compressor.bytes_sent == 0
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64, device=device()))
    for name, gamma in (("topk-0.01", 0.05), ("int8", 1.0), ("sign", 0.5)):  # γ from the compressor when not given
        assert ChocoSGD([w], lr=0.1, compressor=name).param_groups[0]["consensus_step"] == gamma
