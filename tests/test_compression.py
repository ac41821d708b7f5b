"""Compressors (no MPI): exact wire bytes, round-trip error bounds, int4 packing, top-k exactness,
unbiased stochastic rounding; then one mpirun job over TCP for the compressed ops and CHOCO-SGD
(tests/mpi_scripts/compression.py), with messages of several MB in one of its runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gossip
from gossip.ops.compression import unpack_int4
from tests.mpi_harness import Run, run_mpi

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def every_compressor() -> list[gossip.Compressor]:
    return [gossip.Identity(), gossip.Float16(), gossip.BFloat16(), gossip.Int8(),
            gossip.Int8(block=7, rounding="nearest"), gossip.Int4(), gossip.Int4(block=5, rounding="nearest"),
            gossip.TopK(0.01), gossip.TopK(0.3), gossip.RandomK(0.1, seed=3), gossip.RandomK(0.5, unbiased=True),
            gossip.SignNorm(), gossip.SignNorm(block=3)]


def expected_bytes(c: gossip.Compressor, n: int, dtype: torch.dtype) -> int:
    """The documented message size, written out per compressor (not read from the code under test)."""
    size = dtype.itemsize
    if isinstance(c, gossip.Identity):
        return n * size
    if isinstance(c, gossip.Float16 | gossip.BFloat16):
        return 2 * n
    if isinstance(c, gossip.Int8):
        return n + 4 * math.ceil(n / c.block)
    if isinstance(c, gossip.Int4):
        return math.ceil(n / 2) + 4 * math.ceil(n / c.block)
    k = min(n, max(1, math.ceil(c.fraction * n))) if hasattr(c, "fraction") else 0
    if isinstance(c, gossip.TopK):
        return k * (4 + size)
    if isinstance(c, gossip.RandomK):
        return 8 + k * size
    if isinstance(c, gossip.SignNorm):
        return math.ceil(n / 8) + 4 * math.ceil(n / c.block)
    raise AssertionError(c)


def sample(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)


def round_trip(c: gossip.Compressor, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.numel(), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32, device=x.device)
    return c.decompress(c.compress(x), out, x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_messages_are_flat_bytes_of_exactly_the_documented_size(dtype, device):
    for c in every_compressor():
        for n in (1, 2, 7, 64, 1000, 4097):
            message = c.compress(sample(n, dtype, n, device))
            assert message.dtype == torch.uint8 and message.dim() == 1 and message.device.type == device
            assert message.numel() == c.wire_bytes(n, dtype) == expected_bytes(c, n, dtype), (c, n, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_error_bounds(device):
    x = sample(10_000, device=device)
    xs = x.double().cpu()
    assert torch.equal(round_trip(gossip.Identity(), x), x)
    for c, relative, tiny in ((gossip.Float16(), 2.0 ** -11, 2.0 ** -25), (gossip.BFloat16(), 2.0 ** -8, 0.0)):
        err = (round_trip(c, x).double().cpu() - xs).abs()  # half an ulp (of a subnormal, for tiny values)
        assert bool((err <= relative * xs.abs() + tiny).all()), c
    for cls, levels in ((gossip.Int8, 127), (gossip.Int4, 7)):
        for rounding, bound in (("nearest", 0.5), ("stochastic", 1.0)):
            c = cls(block=100, rounding=rounding, seed=1)
            err = (round_trip(c, x).double().cpu() - xs).abs().view(-1, 100)
            scale = xs.abs().view(-1, 100).amax(dim=1, keepdim=True) / levels
            assert bool((err <= bound * scale * (1 + 1e-6)).all()), c
            if rounding == "nearest":
                assert float((err / scale).max()) > 0.45  # the bound is tight: the test can fail
    signs = round_trip(gossip.SignNorm(block=100), x).cpu()
    means = xs.abs().view(-1, 100).mean(dim=1)
    assert torch.allclose(signs.double().abs().view(-1, 100), means[:, None].expand(-1, 100), rtol=1e-6)
    assert bool(((signs < 0) == (x.cpu() < 0)).all())


def test_sign_norm_keeps_zero_positive_and_a_partial_block_mean():
    c = gossip.SignNorm(block=4)
    x = torch.tensor([0.0, -2.0, 1.0, 1.0, -3.0, 0.0])
    got = round_trip(c, x)
    assert got.tolist() == [1.0, -1.0, 1.0, 1.0, -1.5, 1.5]
    assert c.compress(x)[8:].tolist() == [0b010010]  # scales first (two float32), then one bit per element


def test_int4_packs_two_levels_per_byte():
    c = gossip.Int4(block=16, rounding="nearest")
    levels = torch.tensor([-7, -6, -1, 0, 1, 2, 5, 7, 3])  # absmax 7: the scale is 1, the levels are the values
    message = c.compress(levels.float())
    scale = message[:4].view(torch.float32)
    packed = message[4:]
    assert float(scale) == 1.0 and packed.numel() == 5
    nibbles = (levels + 8).tolist() + [8]  # odd length: the last high nibble is level 0
    assert packed.tolist() == [nibbles[2 * i] | (nibbles[2 * i + 1] << 4) for i in range(5)]
    assert unpack_int4(packed, 9).tolist() == levels.tolist()
    assert round_trip(c, levels.float()).tolist() == levels.float().tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_k_sends_exactly_the_largest_magnitudes(dtype, device):
    n = 200  # integers up to 200: exact in every dtype, so no rounding makes a tie
    g = torch.Generator().manual_seed(5)
    x = ((torch.randperm(n, generator=g) + 1) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).to(dtype)
    c = gossip.TopK(0.05)
    k = math.ceil(0.05 * n)
    got = round_trip(c, x.to(device)).cpu()
    kept = np.argsort(-np.abs(x.double().numpy()))[:k]
    want = torch.zeros(n, dtype=got.dtype)
    want[kept] = x[kept].to(got.dtype)
    assert torch.equal(got, want)
    acc = torch.ones(n, dtype=got.dtype, device=device)
    assert torch.equal(c.decompress_add(c.compress(x.to(device)), acc, 2.0, dtype).cpu(), 1 + 2 * want)


def test_random_k_indices_come_from_the_shared_seed_not_the_wire():
    n, x = 500, sample(500)
    sender, receiver = gossip.RandomK(0.1, seed=11), gossip.RandomK(0.1, seed=11)
    first, second = sender.compress(x), sender.compress(x)
    assert first.numel() == 8 + 50 * 4  # the round number and 50 values: no indices
    a = receiver.decompress(first, torch.empty(n))
    b = receiver.decompress(second, torch.empty(n))
    assert int((a != 0).sum()) == 50 and torch.equal(a[a != 0], x[a != 0])
    assert not torch.equal(a != 0, b != 0)  # a new round, new indices
    other = gossip.RandomK(0.1, seed=12)  # another seed: other indices (the message does not carry the seed)
    assert not torch.equal(other.decompress(other.compress(x), torch.empty(n)) != 0, a != 0)
    unbiased = gossip.RandomK(0.1, seed=11, unbiased=True).compress(x)
    assert torch.allclose(receiver.decompress(unbiased, torch.empty(n)), a * 10)


@pytest.mark.parametrize("make", [lambda s: gossip.Int8(block=64, seed=s), lambda s: gossip.Int4(block=64, seed=s)],
                         ids=["int8", "int4"])
def test_stochastic_rounding_is_unbiased_over_seeds(make):
    """The mean over K seeds of the round trip is x within 6 standard errors (each element's rounding
    error has |e| < scale, so its mean's standard error is below scale/(2 sqrt K)); nearest rounding's
    bias on the same x is far outside that band, so the check can fail."""
    seeds = 600
    x = sample(2048, seed=3)
    levels = 127 if isinstance(make(0), gossip.Int8) else 7
    scale = (x.abs().view(-1, 64).amax(dim=1, keepdim=True) / levels).expand(-1, 64).reshape(-1)
    mean = torch.stack([round_trip(make(s), x) for s in range(seeds)]).double().mean(dim=0)
    band = 6 * scale.double() / (2 * math.sqrt(seeds))
    deviation = (mean - x.double()).abs()
    assert bool((deviation <= band).all()), float((deviation / band).max())
    nearest = round_trip(type(make(0))(block=64, rounding="nearest"), x).double()
    assert float(((nearest - x.double()).abs() / band).max()) > 1.5  # a biased rounding does not pass


def test_random_k_unbiased_option_over_seeds():
    seeds, x = 800, sample(64, seed=9)
    mean = torch.stack([round_trip(gossip.RandomK(0.25, seed=s, unbiased=True), x) for s in range(seeds)]).mean(dim=0)
    band = 6 * x.abs() * math.sqrt((4 - 1) / seeds)  # variance (n/k − 1) x² per element
    assert bool(((mean - x).abs() <= band).all())
    biased = torch.stack([round_trip(gossip.RandomK(0.25, seed=s), x) for s in range(seeds)]).mean(dim=0)
    assert not bool(((biased - x).abs() <= band).all())  # E = x/4: outside the band


def test_messages_decompress_from_any_byte_offset():
    """Received messages are rows of one buffer, at offsets their sections need not align with."""
    x = sample(333, torch.float64)
    for c in every_compressor():
        message = c.compress(x)
        holder = torch.zeros(message.numel() + 3, dtype=torch.uint8)
        holder[3:] = message
        want = c.decompress(message, torch.empty(333, dtype=torch.float64), torch.float64)
        assert torch.equal(c.decompress(holder[3:], torch.empty(333, dtype=torch.float64), torch.float64), want)


def test_state_dict_carries_the_random_state_and_counters():
    for c in (gossip.Int8(seed=4), gossip.RandomK(0.2, seed=4)):
        x = sample(256)
        c.compress(x)
        c.bytes_sent = 123
        saved = c.state_dict()
        nxt = c.compress(x)
        again = type(c)(0.2, seed=9) if isinstance(c, gossip.RandomK) else type(c)(seed=9)
        again.load_state_dict(saved)
        assert torch.equal(again.compress(x), nxt) and again.bytes_sent == 123


def test_compressor_by_name():
    assert isinstance(gossip.compressor_by_name("INT8"), gossip.Int8)
    assert gossip.compressor_by_name("int4_32").block == 32
    assert gossip.compressor_by_name("topk-0.01").fraction == 0.01
    assert gossip.compressor_by_name("randomk-0.1", seed=3).seed == 3
    assert isinstance(gossip.compressor_by_name("bf16"), gossip.BFloat16)
    assert gossip.compressor_by_name("sign-128").block == 128
    assert isinstance(gossip.compressor_by_name("none"), gossip.Identity)
    c = gossip.TopK(0.5)
    assert gossip.compressor_by_name(c) is c
    for bad in ("zip", "topk", "topk-2", "int8-0"):
        with pytest.raises(ValueError):
            gossip.compressor_by_name(bad)
    with pytest.raises(TypeError):
        gossip.Int8().compress(torch.arange(5))


# --- under mpirun ---------------------------------------------------------------------------------

@pytest.mark.mpi
def test_compressed_ops_and_choco_sgd_under_mpirun_over_tcp():
    """Over Open MPI's TCP transport: 1, 3 and 4 ranks, and 4 ranks with tensors of 1.5 M elements (messages
    of 1.5 to 6 MB, the static exchange in point-to-point chunks) and the debug buffer checks."""
    run_mpi([Run("compression.py", 4), Run("compression.py", 3), Run("compression.py", 1),
             Run("compression.py", 4, {"debug_buffers": True}, {"large": True})],
            env={"OMPI_MCA_btl": "tcp,self"}, limit=300)
