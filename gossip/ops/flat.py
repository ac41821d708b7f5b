"""Fused flat buffers: many tensors laid out as views into one contiguous tensor.

Gossiping a whole model then costs one MPI call on ``FlatBuffer.flat`` with no packing copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from gossip.runtime import shared_empty


def group_by_dtype_and_device(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Split ``tensors`` into lists of equal dtype and device, keeping their order."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


class FlatBuffer:
    """One contiguous 1-D tensor ``flat`` holding ``tensors`` back to back.

    With ``bind=True`` (default) each tensor's storage is re-pointed (``t.data = view``) to its
    slice of ``flat``, so writing ``flat`` writes the tensors and vice versa: an optimizer can
    update parameters individually and gossip them as one message. All tensors must share dtype
    and device (use :meth:`for_module` or :func:`group_by_dtype_and_device` otherwise).

    With ``shared=True`` (collective; CPU tensors) ``flat`` comes from :func:`shared_empty`, so
    gossiping it on one machine is zero-copy.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], *, bind: bool = True, shared: bool = False) -> None:
        tensors = list(tensors)
        if not tensors:
            raise ValueError("FlatBuffer needs at least one tensor")
        dtype, device = tensors[0].dtype, tensors[0].device
        for k, t in enumerate(tensors):
            if t.dtype != dtype or t.device != device:
                raise ValueError(
                    f"FlatBuffer tensors must share dtype and device: tensor 0 is {dtype} on {device}, "
                    f"tensor {k} is {t.dtype} on {t.device}"
                )
        self.shapes = [t.shape for t in tensors]
        self.offsets = [0]
        for t in tensors:
            self.offsets.append(self.offsets[-1] + t.numel())
        if shared and device.type != "cpu":
            raise ValueError(f"FlatBuffer(shared=True) holds CPU tensors, got tensors on {device}")
        if shared:
            self.flat = shared_empty(self.offsets[-1], dtype)
        else:
            self.flat = torch.empty(self.offsets[-1], dtype=dtype, device=device)
        spans = zip(self.offsets[:-1], self.offsets[1:], self.shapes, strict=True)
        self.views = [self.flat[a:b].view(shape) for a, b, shape in spans]
        with torch.no_grad():
            for view, t in zip(self.views, tensors, strict=True):
                view.copy_(t)
        if bind:
            for view, t in zip(self.views, tensors, strict=True):
                t.data = view

    @classmethod
    def for_module(cls, module: torch.nn.Module, *, bind: bool = True, shared: bool = False) -> list[FlatBuffer]:
        """One FlatBuffer per (dtype, device) group of ``module``'s parameters, in order."""
        params = [p for p in module.parameters()]
        return [cls(group, bind=bind, shared=shared) for group in group_by_dtype_and_device(params)]

    def __len__(self) -> int:
        return len(self.views)

    def copy_from(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (same shapes, in order) into the buffer, e.g. gradients to fuse."""
        if len(tensors) != len(self.views):
            raise ValueError(f"expected {len(self.views)} tensors, got {len(tensors)}")
        for k, (view, t) in enumerate(zip(self.views, tensors, strict=True)):
            if t.shape != view.shape:
                raise ValueError(f"tensor {k} has shape {tuple(t.shape)}, expected {tuple(view.shape)}")
        with torch.no_grad():
            for view, t in zip(self.views, tensors, strict=True):
                view.copy_(t)
