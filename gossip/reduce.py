"""The weighted sum ``out = self_weight * x + sum_k weights[k] * received[k]`` in one pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gossip.tensors import LOW_PRECISION

# Half-precision inputs are widened to float32 this many elements at a time, so the scratch
# stays in cache and no full-size float32 copy is ever made.
_WIDEN_CHUNK = 1 << 16


def weighted_sum(
    x: torch.Tensor,
    received: torch.Tensor | None,
    self_weight: float,
    weights: Sequence[float],
    out: torch.Tensor,
) -> torch.Tensor:
    """Write ``self_weight * x + sum_k weights[k] * received[k]`` into ``out`` and return it.

    ``x`` and ``out`` are flat (N,); ``received`` is (len(weights), N), contiguous, or None when
    there are no weights. float32/float64 use one ``addmv`` (a single pass over the received
    values); float16/bfloat16 accumulate in float32, chunk by chunk.
    """
    if received is None or len(weights) == 0:
        return torch.mul(x, self_weight, out=out)
    if x.dtype in LOW_PRECISION:
        return _weighted_sum_widened(x, received, self_weight, weights, out)
    w = torch.tensor(weights, dtype=x.dtype).to(x.device, non_blocking=True)
    return torch.addmv(x, received.t(), w, beta=self_weight, alpha=1.0, out=out)


def _weighted_sum_widened(
    x: torch.Tensor, received: torch.Tensor, self_weight: float, weights: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    n = x.numel()
    if x.is_cuda:  # device memory is plentiful and one widened pass is fastest there
        w = torch.tensor(weights, dtype=torch.float32).to(x.device, non_blocking=True)
        acc = torch.addmv(x.float(), received.float().t(), w, beta=self_weight)
        return out.copy_(acc)
    w = torch.tensor(weights, dtype=torch.float32)
    chunk = min(n, _WIDEN_CHUNK)
    acc = torch.empty(chunk, dtype=torch.float32)
    wide_x = torch.empty(chunk, dtype=torch.float32)
    wide_recv = torch.empty(received.shape[0], chunk, dtype=torch.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        length = stop - start
        wide_x[:length].copy_(x[start:stop])
        wide_recv[:, :length].copy_(received[:, start:stop])
        torch.addmv(wide_x[:length], wide_recv[:, :length].t(), w, beta=self_weight, out=acc[:length])
        out[start:stop].copy_(acc[:length])
    return out
