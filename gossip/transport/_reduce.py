"""The weighted sum ``out = sum_k w_k * t_k`` in one pass over memory.

The terms are flat tensors of ``out``'s length, possibly in different places (received buffers,
neighbours' shared-memory segments, the input itself). On CPU the sum is built chunk by chunk, so
the accumulator stays in cache while every term is added: each term is read once and ``out``
written once, as a fused kernel would. Terms of weight 0 are left out.

Unequal weights are accumulated in the terms' dtype (float32 for float16/bfloat16 terms).
Equal weights (uniform averaging) of more than two terms are summed first, in float64, and scaled
once: divided by m when every weight is 1/m for an integer m (to the weights' float64 rounding,
so that a self weight computed as 1 - (m-1)/m counts), else multiplied by the weight; then
rounded to ``out``'s dtype. For float32 and half-precision terms the float64 sum of a few values
is exact, and a float64 quotient rounded to 24 bits or fewer is the correctly rounded quotient
(53 ≥ 2·24 + 2: S. A. Figueroa, "When is double rounding innocuous?", ACM SIGNUM Newsletter
30(3), 1995), so the uniform average of k float32 values is their correctly rounded mean.
Rounding the weight first, ``fl(1/3)·a + fl(1/3)·b + fl(1/3)·c``, is not: the mean of 37, 35 and
36 comes out 36.0000038 in float32 that way. Two terms of weight ½ (one-peer gossip) need no
float64: ``½a + ½b`` has exact products and one rounding. On CPU the float64 sum takes about
three times as long as the plain one (16 MB of float32, three terms: 6.7 ms instead of 2.4 ms on
one core), from torch's mixed-precision additions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gossip.transport._buffers import LOW_PRECISION

# Bytes of the accumulator's chunk on CPU: large enough that per-chunk Python dispatch is
# negligible (~1 us per 512 KiB), small enough to stay in L2 while every term is added.
_CHUNK_BYTES = 1 << 19
# Elements of one chunk on a GPU, where each chunk costs a few kernel launches: bounds the
# accumulator's scratch to 128 MiB whatever the tensor's size.
_CUDA_CHUNK = 1 << 24
# How far m * w may be from 1 for a weight w to count as 1/m: a few units of float64 rounding, as
# in a self weight computed as 1 - (m - 1)/m.
_RECIPROCAL_TOLERANCE = 16 * 2.0 ** -53

Term = tuple[float, torch.Tensor]


def uniform_divisor(weight: float) -> int | None:
    """The integer m ≥ 2 with ``weight`` = 1/m to float64 rounding, or None."""
    if not 0.0 < weight <= 0.5:
        return None
    m = round(1.0 / weight)
    return m if abs(m * weight - 1.0) <= _RECIPROCAL_TOLERANCE else None


def _uniform_scale(weights: Sequence[float]) -> int | float | None:
    """For equal weights, what their sum is scaled by: the divisor m (an int) when every weight is
    1/m, else the weight (a float); None for unequal weights, and for one or two terms of a
    power-of-two weight, which the plain sum already rounds correctly."""
    first = weights[0]
    divisor = uniform_divisor(first)
    if divisor is not None and all(uniform_divisor(w) == divisor for w in weights):
        if len(weights) <= 2 and all(w == first for w in weights) and math.frexp(first)[0] == 0.5:
            return None
        return divisor
    if all(w == first for w in weights) and not (len(weights) <= 2 and math.frexp(first)[0] == 0.5):
        return first
    return None


def weighted_sum(terms: Sequence[Term], out: torch.Tensor) -> torch.Tensor:
    """Write ``sum_k w_k * t_k`` for ``terms = [(w_k, t_k), ...]`` into flat ``out`` and return it.

    Every ``t_k`` is flat, of ``out``'s length, dtype and device; ``out`` may be the first term's
    tensor, not a later one's. Equal weights are summed in float64 and scaled once (module
    docstring). Requires at least one term.
    """
    if not terms:
        raise ValueError("weighted_sum needs at least one term")
    live = [(float(w), t) for w, t in terms if w != 0.0]
    if not live:
        return out.zero_()
    scale = _uniform_scale([w for w, _ in live])
    wide = torch.float64 if scale is not None else torch.float32 if out.dtype in LOW_PRECISION else out.dtype
    in_place = wide == out.dtype  # the accumulator is ``out`` itself
    n = out.numel()
    if out.is_cuda:
        chunk = n if in_place else _CUDA_CHUNK
    else:
        chunk = _CHUNK_BYTES // (torch.finfo(wide).bits // 8)
    if n <= chunk:
        acc = out if in_place else torch.empty(n, dtype=wide, device=out.device)
        _accumulate(live, scale, None, acc)
        if not in_place:
            out.copy_(acc)
        return out
    scratch = None if in_place else torch.empty(chunk, dtype=wide, device=out.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        acc = out[start:stop] if scratch is None else scratch[: stop - start]
        _accumulate(live, scale, slice(start, stop), acc)
        if scratch is not None:
            out[start:stop].copy_(acc)
    return out


def _accumulate(terms: Sequence[Term], scale: int | float | None, span: slice | None, acc: torch.Tensor) -> None:
    """``acc = sum_k w_k * t_k[span]`` (``span`` None: the whole terms); ``acc`` may be wider than
    the terms. With equal weights (``scale`` not None) the terms are summed, then divided by
    ``scale`` when it is an int, else multiplied by it."""
    weight, first = terms[0]
    first = first if span is None else first[span]
    if scale is not None:
        if acc.data_ptr() != first.data_ptr():
            acc.copy_(first)
        for _, term in terms[1:]:
            acc.add_(term if span is None else term[span])
        if isinstance(scale, int):
            acc.div_(scale)
        elif scale != 1.0:
            acc.mul_(scale)
        return
    if acc.dtype == first.dtype:
        torch.mul(first, weight, out=acc)
    else:  # widen before scaling, so the product is not rounded to half precision
        acc.copy_(first).mul_(weight)
    for weight, term in terms[1:]:
        acc.add_(term if span is None else term[span], alpha=weight)
