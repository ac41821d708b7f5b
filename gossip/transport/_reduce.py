"""The weighted sum ``out = sum_k w_k * t_k`` in one pass over memory.

The terms are flat tensors of ``out``'s length, possibly in different places (received buffers,
neighbours' shared-memory segments, the input itself). On CPU the sum is built chunk by chunk, so
the accumulator stays in cache while every term is added: each term is read once and ``out``
written once, as a fused kernel would. Half-precision terms are accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gossip.transport._buffers import LOW_PRECISION

# Bytes of one term's chunk: large enough that per-chunk Python dispatch is negligible (~1 us per
# 512 KiB), small enough that the accumulator chunk stays in L2 between terms.
_CHUNK_BYTES = 1 << 19

Term = tuple[float, torch.Tensor]


def weighted_sum(terms: Sequence[Term], out: torch.Tensor) -> torch.Tensor:
    """Write ``sum_k w_k * t_k`` for ``terms = [(w_k, t_k), ...]`` into flat ``out`` and return it.

    Every ``t_k`` is flat, of ``out``'s length, dtype and device. Requires at least one term.
    """
    if not terms:
        raise ValueError("weighted_sum needs at least one term")
    n = out.numel()
    wide = out.dtype in LOW_PRECISION
    if out.is_cuda:
        acc = torch.empty(n, dtype=torch.float32, device=out.device) if wide else out
        _accumulate(terms, 0, n, acc)
        if wide:
            out.copy_(acc)
        return out
    chunk = max(1, _CHUNK_BYTES // (4 if wide else out.element_size()))
    if n <= chunk and not wide:  # one chunk: no slicing
        _accumulate(terms, 0, n, out)
        return out
    scratch = torch.empty(min(n, chunk), dtype=torch.float32) if wide else None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        if scratch is None:
            _accumulate(terms, start, stop, out[start:stop])
        else:
            acc = scratch[: stop - start]
            _accumulate(terms, start, stop, acc)
            out[start:stop].copy_(acc)
    return out


def _accumulate(terms: Sequence[Term], start: int, stop: int, acc: torch.Tensor) -> None:
    """``acc = sum_k w_k * t_k[start:stop]``; ``acc`` may be wider than the terms (float32)."""
    whole = start == 0 and stop == acc.numel() == terms[0][1].numel()
    first_weight, first = terms[0]
    first = first if whole else first[start:stop]
    if acc.dtype == first.dtype:
        torch.mul(first, first_weight, out=acc)
    else:  # widen before scaling, so the product is not rounded to half precision
        acc.copy_(first).mul_(first_weight)
    for weight, term in terms[1:]:
        if weight != 0.0:
            acc.add_(term if whole else term[start:stop], alpha=weight)
