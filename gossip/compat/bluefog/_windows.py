"""BlueFog's one-sided ``win_*`` family on :class:`gossip.Window`, windows known by name.

A window is created on the static topology in force (:func:`gossip.compat.bluefog.set_topology`),
whose weights are the defaults of :func:`win_update`: uniform ``1/(indegree + 1)`` unless the
topology was set with ``is_weighted=True``. The fold is

    x ← self_weight · x + Σ_j neighbor_weights[j] · b_j,

b_j the buffer in-neighbour j last wrote (put, accumulate) or this rank fetched (get). With the
associated p turned on when a window is created (:func:`turn_on_win_ops_with_associated_p`) the
window carries push-sum's weight p through every op (Kempe, Dobra and Gehrke, "Gossip-based
computation of aggregate information", FOCS 2003), read with :func:`win_associated_p`.

``win_get`` reads a neighbour's current tensor, as BlueFog does, for contiguous CPU tensors (their
memory is exposed through a second MPI window); for others it reads the copy the neighbour last
published (at creation and at each :func:`win_update`). ``require_mutex`` takes the mutex of the
window being touched for that call (the target's for put/accumulate/get, this rank's for update).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

import gossip

_windows: dict[str, gossip.Window] = {}
_handles: dict[int, object] = {}
_numbers = itertools.count(1)
_with_p = {"on": False}  # BlueFog's global switch, read when a window is created


def _window(name: str) -> gossip.Window:
    win = _windows.get(name)
    if win is None:
        raise ValueError(f"rank {gossip.rank()}: {name!r} is not found in the registered window objects "
                         f"({sorted(_windows)})")
    return win


def win_create(tensor: torch.Tensor, name: str, zero_init: bool = False) -> bool:
    """Collective: create the window ``name`` for ``tensor`` (float32/float64) on the static
    topology; the neighbour buffers start as copies of ``tensor``, or zero with ``zero_init``.
    Returns True; every rank must create the same windows in the same order."""
    exposed = tensor.device.type == "cpu" and tensor.is_contiguous()
    _windows[name] = gossip.Window(tensor, name, push_sum=_with_p["on"], zero_init=zero_init,
                                   expose_tensor=exposed, zero_init_p=True)  # BlueFog's buffers' p start at 0
    return True


def win_free(name: str | None = None) -> bool:
    """Collective: free the window ``name``, or every window when None. Returns True."""
    names = sorted(_windows) if name is None else [name]
    for each in names:
        _window(each).free()
        del _windows[each]
    return True


def get_current_created_window_names() -> list[str]:
    """The names of the windows created here and not yet freed."""
    return sorted(_windows)


def win_update(name: str, self_weight: float | None = None, neighbor_weights: Mapping[int, float] | None = None,
               reset: bool = False, clone: bool = False, require_mutex: bool = False) -> torch.Tensor:
    """Fold the buffers into the window's tensor (module docstring) and return it; defaults: the
    topology's weights. ``reset``: then zero the buffers read. ``clone``: return the result as a new
    tensor and leave the window's tensor as it was (the published copy is updated all the same).
    ``require_mutex``: hold this rank's mutex throughout."""
    if (self_weight is None) != (neighbor_weights is None):
        raise ValueError("Arguments self_weight and neighbor_weights have to be presented at the same time")
    win = _window(name)
    weights = None if neighbor_weights is None else {int(r): float(w) for r, w in neighbor_weights.items()}
    kept = win.tensor.detach().clone() if clone else None
    result = win.update(None if self_weight is None else float(self_weight), weights, reset=reset,
                        mutex=require_mutex)
    if kept is None:
        return result
    folded = result.detach().clone()
    with torch.no_grad():
        win.tensor.copy_(kept)
    return folded


def win_update_then_collect(name: str, require_mutex: bool = True) -> torch.Tensor:
    """``win_update(name, 1.0, {j: 1.0 for every in-neighbour j}, reset=True)``: add every buffer to
    the tensor and zero the buffers (a sum, as push-sum's collect step needs)."""
    win = _window(name)
    return win_update(name, 1.0, dict.fromkeys(win.sources, 1.0), reset=True, require_mutex=require_mutex)


class _WinHandle:
    def __init__(self, handle, after=None) -> None:
        self.handle, self.after = handle, after

    def done(self) -> bool:
        return self.handle is None or self.handle.done()

    def wait(self) -> bool:
        if self.handle is not None:
            self.handle.wait()
        return True


def _register(op) -> int:
    number = next(_numbers)
    _handles[number] = op
    return number


def _write(kind: str, tensor: torch.Tensor, name: str, self_weight, dst_weights, require_mutex: bool) -> int:
    win = _window(name)
    if dst_weights is not None and not isinstance(dst_weights, Mapping):
        raise ValueError("Argument dst_weights has to be a dictionary {rank: weight}")
    weights = None if dst_weights is None else {int(r): float(w) for r, w in dst_weights.items()}
    start = win.put_async if kind == "put" else win.accumulate_async
    return _register(_WinHandle(start(tensor, weights, self_weight=None if self_weight is None else
                                      float(self_weight), mutex=require_mutex)))


def win_put_nonblocking(tensor: torch.Tensor, name: str, self_weight: float | None = None,
                        dst_weights: Mapping[int, float] | None = None, require_mutex: bool = False) -> int:
    """Start writing ``dst_weights[d] · tensor`` into this rank's buffer at each out-neighbour d
    (default: all, weight 1), replacing it; then ``tensor ← self_weight · tensor`` (default 1).
    ``tensor`` must not change until :func:`win_wait`. Returns a handle."""
    return _write("put", tensor, name, self_weight, dst_weights, require_mutex)


def win_put(tensor: torch.Tensor, name: str, self_weight: float | None = None,
            dst_weights: Mapping[int, float] | None = None, require_mutex: bool = False) -> bool:
    """:func:`win_put_nonblocking` and :func:`win_wait`: complete at the destinations on return."""
    return win_wait(win_put_nonblocking(tensor, name, self_weight, dst_weights, require_mutex))


def win_accumulate_nonblocking(tensor: torch.Tensor, name: str, self_weight: float | None = None,
                               dst_weights: Mapping[int, float] | None = None, require_mutex: bool = False) -> int:
    """As :func:`win_put_nonblocking`, but add into the buffers (``MPI_Accumulate`` with ``MPI_SUM``)."""
    return _write("accumulate", tensor, name, self_weight, dst_weights, require_mutex)


def win_accumulate(tensor: torch.Tensor, name: str, self_weight: float | None = None,
                   dst_weights: Mapping[int, float] | None = None, require_mutex: bool = False) -> bool:
    """:func:`win_accumulate_nonblocking` and :func:`win_wait`."""
    return win_wait(win_accumulate_nonblocking(tensor, name, self_weight, dst_weights, require_mutex))


def win_get_nonblocking(name: str, src_weights: Mapping[int, float] | None = None,
                        require_mutex: bool = False) -> int:
    """Fetch ``src_weights[j] ·`` in-neighbour j's tensor (default: all, weight 1) into this rank's
    buffer for j. Completes before it returns; returns a handle for :func:`win_wait`."""
    win = _window(name)
    weights = None if src_weights is None else {int(r): float(w) for r, w in src_weights.items()}
    win.get(weights, current=win.expose_tensor, mutex=require_mutex)
    return _register(_WinHandle(None))


def win_get(name: str, src_weights: Mapping[int, float] | None = None, require_mutex: bool = False) -> bool:
    """:func:`win_get_nonblocking` and :func:`win_wait`."""
    return win_wait(win_get_nonblocking(name, src_weights, require_mutex))


def win_poll(handle: int) -> bool:
    """True if the window op behind ``handle`` has completed."""
    op = _handles.get(handle)
    if op is None:
        raise ValueError(f"rank {gossip.rank()}: unknown window handle {handle!r}")
    return op.done()


def win_wait(handle: int) -> bool:
    """Wait until the window op behind ``handle`` has completed at its targets; True. An unknown
    handle (already waited on) returns False, as BlueFog's does with a warning."""
    op = _handles.pop(handle, None)
    if op is None:
        return False
    return op.wait()


def get_win_version(name: str) -> dict[int, int]:
    """For each in-neighbour, how many writes (put, accumulate, get) reached its buffer since the
    last :func:`win_update` (0: read already)."""
    return _window(name).versions()


@contextmanager
def win_lock(name: str) -> Iterator[None]:
    """BlueFog opens an RMA access epoch here; windows here hold one for their whole life, so this
    only checks that ``name`` exists."""
    _window(name)
    yield


@contextmanager
def win_mutex(name: str, for_self: bool = False, ranks: list[int] | None = None) -> Iterator[None]:
    """Hold the mutexes of the window ``name`` at ``ranks`` (default: the out-neighbours), or this
    rank's own with ``for_self``, for the enclosed code (:meth:`gossip.Window.hold_mutex`): taken in
    rank order, so two ranks asking for overlapping sets never deadlock, and calls with
    ``require_mutex`` inside use the hold."""
    win = _window(name)
    with win.hold_mutex([win.rank] if for_self else ranks):
        yield


def win_associated_p(name: str) -> float:
    """The push-sum weight p of this rank's tensor in window ``name`` (1 at creation; 1 always for a
    window created while the associated p was off)."""
    win = _window(name)
    return win.associated_p() if win.push_sum else 1.0


def turn_on_win_ops_with_associated_p() -> None:
    """Windows created from now on carry the push-sum weight p through every op."""
    _with_p["on"] = True


def turn_off_win_ops_with_associated_p() -> None:
    """Windows created from now on carry no p (:func:`win_associated_p` reads 1)."""
    _with_p["on"] = False
