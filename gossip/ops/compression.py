"""Compressors: a tensor into one flat ``uint8`` message of a fixed size, and back.

A **compressor** turns a floating-point tensor of n elements into one flat ``uint8`` message of a
size fixed by n and the tensor's dtype (:meth:`Compressor.wire_bytes`, exact: the bytes MPI is
handed), and a message back into n values (:meth:`Compressor.decompress`). Compressors are pure
torch, CPU or CUDA, and know nothing of MPI:

==================  ==========================================================  =====================
compressor          on the wire                                                 bytes for n elements
==================  ==========================================================  =====================
:class:`Identity`   the values themselves                                       n · itemsize
:class:`Float16`    IEEE half precision (summed in float32 when reduced)        2n
:class:`BFloat16`   bfloat16 (summed in float32 when reduced)                   2n
:class:`Int8`       integers in [−127, 127], one float32 scale (absmax/127)     n + 4⌈n/B⌉
                    per block of B elements
:class:`Int4`       integers in [−7, 7] packed two per byte, one float32        ⌈n/2⌉ + 4⌈n/B⌉
                    scale (absmax/7) per block
:class:`TopK`       the k = ⌈f n⌉ largest magnitudes: int32 indices and values  k (4 + itemsize)
:class:`RandomK`    k = ⌈f n⌉ values at indices drawn from a shared seed and    8 + k · itemsize
                    the message's round number (the indices are not sent)
:class:`SignNorm`   one sign bit per element, one float32 scale per block       ⌈n/8⌉ + 4⌈n/B⌉
                    (the block's mean magnitude ‖x_b‖₁/|b|)
==================  ==========================================================  =====================

``itemsize`` is that of the compressed tensor's dtype. The quantizers round to the nearest level
or stochastically (``rounding="stochastic"``: ⌊v + u⌋ with u uniform in [0, 1), so that
E[decompress(compress(x))] = x, as QSGD's stochastic quantization: Alistarh, Grubic, Li, Tomioka
and Vojnovic, "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
2017). Top-k and random-k are the sparsifiers of Stich, Cordonnier and Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018; random-k with ``unbiased=True`` scales the kept values by n/k. The sign
compressor with a per-block scale is the scaled sign of Karimireddy, Rebjock, Stich and Jaggi,
"Error Feedback Fixes SignSGD and other Gradient Compression Schemes", ICML 2019 (after Bernstein,
Wang, Azizzadenesheli and Anandkumar, "signSGD", ICML 2018). Top-k, sign and nearest rounding are
biased; the algorithms that use them (CHOCO-SGD, error feedback) correct for it.

The ops that send messages and count their bytes are in :mod:`gossip.ops.compressed`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

# --- message layout -------------------------------------------------------------------------------

def _sections(message: torch.Tensor, parts: Sequence[tuple[torch.dtype, int]]) -> list[torch.Tensor]:
    """Views of the flat ``uint8`` ``message`` as consecutive sections ``(dtype, count)``, in order.

    Compressors list their sections widest dtype first, so every section starts aligned to its own
    itemsize and the message carries no padding. A message received at an offset its sections do
    not align with (one row of a gathered buffer) is copied first.
    """
    widest = max((dtype.itemsize for dtype, _ in parts), default=1)
    if message.storage_offset() % widest:
        message = message.clone()
    views, offset = [], 0
    for dtype, count in parts:
        size = count * dtype.itemsize
        views.append(message[offset:offset + size].view(dtype))
        offset += size
    if offset != message.numel():
        raise ValueError(f"a message of {message.numel()} bytes, expected {offset}")
    return views


def _flat(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"{what} compresses floating-point tensors, got "
                        f"{tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
    return tensor.detach().reshape(-1)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype compressors compute in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- compressors ----------------------------------------------------------------------------------

class Compressor:
    """A compressor: :meth:`compress` a tensor into one flat ``uint8`` message of
    :meth:`wire_bytes` bytes, :meth:`decompress` it into values.

    ``unbiased`` says whether E[decompress(compress(x))] = x. ``bytes_sent`` and
    ``messages_sent`` count what the compressed ops handed to MPI with this compressor on this
    rank (a message sent to three ranks counts three times); :meth:`state_dict` carries them and
    the compressor's random state.
    """

    unbiased = False

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.messages_sent = 0

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the message for a tensor of ``numel`` elements of ``dtype``."""
        raise NotImplementedError

    def compress(self, tensor: torch.Tensor) -> torch.Tensor:
        """The message for ``tensor`` (any shape, read flat): a new flat ``uint8`` tensor on its device."""
        raise NotImplementedError

    def decompress(self, message: torch.Tensor, out: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Write the values ``message`` holds into the flat ``out`` (its length is n) and return it.
        ``dtype`` is that of the tensor that was compressed (default ``out``'s)."""
        raise NotImplementedError

    def decompress_add(self, message: torch.Tensor, acc: torch.Tensor, weight: float = 1.0,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """``acc += weight * decompress(message)`` (flat ``acc``); returns ``acc``."""
        values = self.decompress(message, torch.empty_like(acc), dtype)
        return acc.add_(values, alpha=weight)

    def describe(self) -> str:
        """The compressor and its parameters in words, equal on ranks that compress alike."""
        return type(self).__name__

    def reset_counters(self) -> None:
        """Set :attr:`bytes_sent` and :attr:`messages_sent` back to zero."""
        self.bytes_sent = self.messages_sent = 0

    def state_dict(self) -> dict:
        """The counters and any random state, for checkpoints."""
        return {"bytes_sent": self.bytes_sent, "messages_sent": self.messages_sent}

    def load_state_dict(self, state: Mapping) -> None:
        self.bytes_sent = int(state.get("bytes_sent", 0))
        self.messages_sent = int(state.get("messages_sent", 0))

    def __repr__(self) -> str:
        return self.describe()


class Identity(Compressor):
    """No compression: the tensor's own bytes (the baseline, and exact CHOCO-SGD = DSGD)."""

    unbiased = True

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return numel * dtype.itemsize

    def compress(self, tensor: torch.Tensor) -> torch.Tensor:
        return _flat(tensor, "Identity").clone().view(torch.uint8)

    def decompress(self, message, out, dtype=None):
        (values,) = _sections(message, [(dtype or out.dtype, out.numel())])
        return out.copy_(values)


class _Cast(Compressor):
    """The values cast to a 16-bit float type on the wire."""

    wire_dtype = torch.float16

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return 2 * numel

    def compress(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = _flat(tensor, type(self).__name__)
        return flat.to(self.wire_dtype, copy=True).view(torch.uint8)

    def decompress(self, message, out, dtype=None):
        (values,) = _sections(message, [(self.wire_dtype, out.numel())])
        return out.copy_(values)


class Float16(_Cast):
    """IEEE half precision on the wire (values beyond ±65504 become infinite)."""

    wire_dtype = torch.float16


class BFloat16(_Cast):
    """bfloat16 on the wire: float32's range, 8 bits of mantissa."""

    wire_dtype = torch.bfloat16


_ROUNDINGS = ("nearest", "stochastic")


class _Random(Compressor):
    """A compressor with its own random generator (one per device), seeded with ``seed``."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This compressor's generator on ``device`` (seeded with ``seed`` at first use)."""
        device = torch.device(device)
        found = self._generators.get(device)
        if found is None:
            found = self._generators[device] = torch.Generator(device=device)
            found.manual_seed(self.seed)
        return found

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seed": self.seed,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.seed = int(state.get("seed", self.seed))
        for device, rng_state in state.get("generators", {}).items():
            self.generator(torch.device(device)).set_state(rng_state)


class _BlockQuantizer(_Random):
    """Integers in [−levels, levels] with one float32 scale, absmax/levels, per block of ``block``
    elements; nearest or stochastic rounding."""

    levels = 127

    def __init__(self, block: int, rounding: str, seed: int) -> None:
        super().__init__(seed)
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be an int >= 1, got {block!r}")
        if rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {rounding!r}")
        self.block = block
        self.rounding = rounding
        self.unbiased = rounding == "stochastic"

    def describe(self) -> str:
        return f"{type(self).__name__}(block={self.block}, rounding={self.rounding!r})"

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def _payload_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return 4 * self.blocks(numel) + self._payload_bytes(numel)

    def quantize(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(levels, scales)``: the integers (int8, one per element) and the float32 block scales."""
        n, b = flat.numel(), self.block
        work = flat.to(_work_dtype(flat.dtype))
        padded = torch.zeros(self.blocks(n) * b, dtype=work.dtype, device=work.device)
        padded[:n] = work
        scales = (padded.view(-1, b).abs().amax(dim=1) / self.levels).to(torch.float32)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).to(work.dtype)
        v = (padded.view(-1, b) / safe[:, None]).view(-1)[:n]
        if self.rounding == "stochastic":
            u = torch.rand(n, generator=self.generator(v.device), dtype=v.dtype, device=v.device)
            v = torch.floor(v + u)
        else:
            v = torch.round(v)
        return v.clamp_(-self.levels, self.levels).to(torch.int8), scales

    def dequantize(self, q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = q * scale`` of each element's block, computed in float32."""
        n, b = out.numel(), self.block
        values = torch.zeros(scales.numel() * b, dtype=torch.float32, device=out.device)
        values[:n] = q
        values.view(-1, b).mul_(scales[:, None])
        return out.copy_(values[:n])


class Int8(_BlockQuantizer):
    """8-bit integers with a float32 scale per block of ``block`` elements (``rounding`` "nearest"
    or "stochastic", which is unbiased; ``seed`` seeds the latter: give each rank its own)."""

    levels = 127

    def __init__(self, block: int = 256, rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(block, rounding, seed)

    def _payload_bytes(self, numel: int) -> int:
        return numel

    def compress(self, tensor):
        flat = _flat(tensor, "Int8")
        q, scales = self.quantize(flat)
        message = torch.empty(self.wire_bytes(flat.numel()), dtype=torch.uint8, device=flat.device)
        scale_part, q_part = _sections(message, [(torch.float32, scales.numel()), (torch.int8, flat.numel())])
        scale_part.copy_(scales)
        q_part.copy_(q)
        return message

    def decompress(self, message, out, dtype=None):
        n = out.numel()
        scales, q = _sections(message, [(torch.float32, self.blocks(n)), (torch.int8, n)])
        return self.dequantize(q, scales, out)


class Int4(_BlockQuantizer):
    """4-bit integers in [−7, 7], packed two per byte (element 2i in the low nibble, as ``level + 8``),
    with a float32 scale per block of ``block`` elements; rounding and seed as :class:`Int8`."""

    levels = 7

    def __init__(self, block: int = 64, rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(block, rounding, seed)

    def _payload_bytes(self, numel: int) -> int:
        return -(-numel // 2)

    def compress(self, tensor):
        flat = _flat(tensor, "Int4")
        n = flat.numel()
        q, scales = self.quantize(flat)
        nibbles = torch.full((2 * self._payload_bytes(n),), 8, dtype=torch.uint8, device=flat.device)
        nibbles[:n] = (q + 8).to(torch.uint8)
        pairs = nibbles.view(-1, 2)
        message = torch.empty(self.wire_bytes(n), dtype=torch.uint8, device=flat.device)
        scale_part, packed = _sections(message, [(torch.float32, scales.numel()), (torch.uint8, pairs.shape[0])])
        scale_part.copy_(scales)
        torch.bitwise_or(pairs[:, 0], torch.bitwise_left_shift(pairs[:, 1], 4), out=packed)
        return message

    def decompress(self, message, out, dtype=None):
        n = out.numel()
        scales, packed = _sections(message, [(torch.float32, self.blocks(n)), (torch.uint8, self._payload_bytes(n))])
        return self.dequantize(unpack_int4(packed, n), scales, out)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The ``numel`` levels (int8 in [−8, 7]) of :class:`Int4`'s packed bytes."""
    low = torch.bitwise_and(packed, 15)
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack([low, high], dim=1).view(-1)[:numel].to(torch.int8) - 8


def _kept(fraction: float, numel: int) -> int:
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


def _check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return float(fraction)


class _Sparse:
    """Decoding shared by the sparse compressors: ``_unpack`` gives (indices, values); the rest is zero."""

    def decompress(self, message, out, dtype=None):
        indices, values = self._unpack(message, out.numel(), dtype or out.dtype)
        out.zero_()
        out[indices] = values.to(out.dtype)
        return out

    def decompress_add(self, message, acc, weight=1.0, dtype=None):
        indices, values = self._unpack(message, acc.numel(), dtype or acc.dtype)
        return acc.index_add_(0, indices, values.to(acc.dtype), alpha=weight)


class TopK(_Sparse, Compressor):
    """The k = ⌈``fraction`` · n⌉ elements of largest magnitude, exactly: their int32 indices
    (ascending) and values in the tensor's dtype; the rest are zero (Stich et al., NeurIPS 2018)."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = _check_fraction(fraction)

    def describe(self) -> str:
        return f"TopK({self.fraction:g})"

    def kept(self, numel: int) -> int:
        """k for a tensor of ``numel`` elements."""
        return _kept(self.fraction, numel)

    def _sections(self, message: torch.Tensor, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) views of a message: the wider section first, so both are aligned."""
        k = self.kept(numel)
        if dtype.itemsize > 4:
            values, indices = _sections(message, [(dtype, k), (torch.int32, k)])
        else:
            indices, values = _sections(message, [(torch.int32, k), (dtype, k)])
        return indices, values

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return self.kept(numel) * (4 + dtype.itemsize)

    def compress(self, tensor):
        flat = _flat(tensor, "TopK")
        n = flat.numel()
        if n >= 2 ** 31:
            raise ValueError(f"TopK sends int32 indices: {n} elements are too many")
        chosen = torch.topk(flat.abs(), self.kept(n), sorted=False).indices.sort().values
        message = torch.empty(self.wire_bytes(n, flat.dtype), dtype=torch.uint8, device=flat.device)
        indices, values = self._sections(message, n, flat.dtype)
        indices.copy_(chosen)
        values.copy_(flat[chosen])
        return message

    def _unpack(self, message: torch.Tensor, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        indices, values = self._sections(message, numel, dtype)
        return indices.long(), values



class RandomK(_Sparse, _Random):
    """k = ⌈``fraction`` · n⌉ elements at random indices, the same on every rank that shares
    ``seed``: the indices are drawn from (``seed``, the message's round number), so the message
    carries only the round (8 bytes, int64) and the values in the tensor's dtype. Each
    :meth:`compress` is a new round. ``unbiased=True`` scales the values by n/k."""

    def __init__(self, fraction: float, seed: int = 0, unbiased: bool = False) -> None:
        super().__init__(seed)
        self.fraction = _check_fraction(fraction)
        self.unbiased = bool(unbiased)
        self.round = 0
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def describe(self) -> str:
        return f"RandomK({self.fraction:g}, seed={self.seed}{', unbiased' if self.unbiased else ''})"

    def kept(self, numel: int) -> int:
        return _kept(self.fraction, numel)

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return 8 + self.kept(numel) * dtype.itemsize

    def indices(self, round_: int, numel: int, device: torch.device) -> torch.Tensor:
        """The round's indices (ascending int64 on ``device``): k distinct ones, a pure function of
        (seed, round, n), drawn with NumPy's ``default_rng([seed, round])``."""
        key = (self.seed, round_, numel, torch.device(device))
        if self._cache is None or self._cache[0] != key:
            chosen = np.random.default_rng([self.seed, round_]).choice(numel, self.kept(numel), replace=False)
            self._cache = (key, torch.from_numpy(np.sort(chosen)).to(device))
        return self._cache[1]

    def compress(self, tensor):
        flat = _flat(tensor, "RandomK")
        n = flat.numel()
        message = torch.empty(self.wire_bytes(n, flat.dtype), dtype=torch.uint8, device=flat.device)
        header, values = _sections(message, [(torch.int64, 1), (flat.dtype, self.kept(n))])
        header.fill_(self.round)
        picked = flat[self.indices(self.round, n, flat.device)]
        values.copy_(picked * (n / self.kept(n)) if self.unbiased and n else picked)
        self.round += 1
        return message

    def _unpack(self, message, numel, dtype):
        header, values = _sections(message, [(torch.int64, 1), (dtype, self.kept(numel))])
        return self.indices(int(header.item()), numel, message.device), values


    def state_dict(self) -> dict:
        return {**super().state_dict(), "round": self.round}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.round = int(state.get("round", 0))


class SignNorm(Compressor):
    """One sign bit per element (8 per byte, element 8i + j in bit j; 1 for negative) and one
    float32 scale per block of ``block`` elements, the block's mean magnitude ‖x_b‖₁/|b|; values
    decompress to ±scale (zero to +scale). The scaled sign of Karimireddy et al., ICML 2019."""

    def __init__(self, block: int = 4096) -> None:
        super().__init__()
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be an int >= 1, got {block!r}")
        self.block = block

    def describe(self) -> str:
        return f"SignNorm(block={self.block})"

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return 4 * self.blocks(numel) + -(-numel // 8)

    def compress(self, tensor):
        flat = _flat(tensor, "SignNorm")
        n, b = flat.numel(), self.block
        work = flat.to(_work_dtype(flat.dtype))
        padded = torch.zeros(self.blocks(n) * b, dtype=work.dtype, device=work.device)
        padded[:n] = work.abs()
        counts = torch.full((self.blocks(n),), float(b), dtype=work.dtype, device=work.device)
        if n % b:
            counts[-1] = n % b
        scales = (padded.view(-1, b).sum(dim=1) / counts).to(torch.float32)
        bits = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=flat.device)
        bits[:n] = (flat < 0).to(torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
        message = torch.empty(self.wire_bytes(n), dtype=torch.uint8, device=flat.device)
        scale_part, packed = _sections(message, [(torch.float32, scales.numel()), (torch.uint8, bits.numel() // 8)])
        scale_part.copy_(scales)
        packed.copy_(torch.bitwise_left_shift(bits.view(-1, 8), shifts).sum(dim=1).to(torch.uint8))
        return message

    def decompress(self, message, out, dtype=None):
        n, b = out.numel(), self.block
        scales, packed = _sections(message, [(torch.float32, self.blocks(n)), (torch.uint8, -(-n // 8))])
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        negative = torch.bitwise_and(torch.bitwise_right_shift(packed[:, None], shifts), 1).view(-1)[:n]
        values = torch.zeros(scales.numel() * b, dtype=torch.float32, device=out.device)
        values[:n] = 1.0 - 2.0 * negative.to(torch.float32)
        values.view(-1, b).mul_(scales[:, None])
        return out.copy_(values[:n])


def compressor_by_name(name: str, seed: int = 0) -> Compressor:
    """A compressor from a short name, for command lines and config files (case-insensitive; ``_``
    and ``-`` alike): ``identity`` (or ``none``), ``fp16``, ``bf16``, ``int8``, ``int4`` (an optional
    block size: ``int8-64``), ``topk-F`` and ``randomk-F`` (F the fraction kept, e.g. ``topk-0.01``)
    and ``sign`` (``sign-B`` for blocks of B). ``seed`` seeds stochastic rounding and random-k."""
    if isinstance(name, Compressor):
        return name
    text = str(name).strip().lower().replace("_", "-")
    base, _, arg = text.partition("-")
    try:
        if base in ("identity", "none") and not arg:
            return Identity()
        if base in ("fp16", "float16") and not arg:
            return Float16()
        if base in ("bf16", "bfloat16") and not arg:
            return BFloat16()
        if base in ("int8", "int4"):
            cls = Int8 if base == "int8" else Int4
            return cls(seed=seed) if not arg else cls(block=int(arg), seed=seed)
        if base == "topk" and arg:
            return TopK(float(arg))
        if base == "randomk" and arg:
            return RandomK(float(arg), seed=seed)
        if base == "sign":
            return SignNorm() if not arg else SignNorm(block=int(arg))
    except ValueError as err:
        raise ValueError(f"compressor {name!r}: {err}") from None
    raise ValueError(f"unknown compressor {name!r}: use identity, fp16, bf16, int8[-B], int4[-B], topk-F, "
                     "randomk-F or sign[-B]")


__all__ = ["BFloat16", "Compressor", "Float16", "Identity", "Int4", "Int8", "RandomK", "SignNorm", "TopK",
           "compressor_by_name", "unpack_int4"]
