"""Helpers for the multi-rank test scripts (imported on every rank by tests/mpi_runner.py).

A script's tests run on ``GROUP``: the ranks of one run, a sub-communicator of ``MPI.COMM_WORLD``
(the first ``size`` ranks of the job) on which the runner started the runtime with the run's
settings. ``GROUP`` and ``PARAMS`` (the run's test parameters, read with :func:`param`) are set by
the runner before it loads the script, so a script's module-level ``N = GROUP.size`` and
``R = GROUP.rank`` are those of the run.

Expected values are computed independently of the runtime: each rank's state is gathered with
plain mpi4py on ``GROUP`` (pickled NumPy float64 arrays) and the answer is worked out in NumPy.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from mpi4py import MPI

import gossip

GROUP: MPI.Comm = MPI.COMM_WORLD  # the ranks of the current run (set by tests/mpi_runner.py)
PARAMS: dict = {}  # the current run's test parameters (set by tests/mpi_runner.py)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class Skip(Exception):
    """Raise in a test function to mark it skipped on this rank."""


def enter_run(group: MPI.Comm, params: dict) -> None:
    """Make ``group`` and ``params`` the current run's (called by the runner before a script loads)."""
    global GROUP, PARAMS
    GROUP, PARAMS = group, dict(params)


def param(name: str, default):
    """The current run's test parameter ``name`` (``device``, ``hidden``, ...), else ``default``."""
    return PARAMS.get(name, default)


def expect_error(call, *fragments: str, error: type[Exception] = ValueError) -> str:
    """Call ``call``; it must raise ``error`` with every fragment in its message (returned)."""
    try:
        call()
    except error as raised:
        text = str(raised)
        for fragment in fragments:
            assert fragment in text, f"rank {GROUP.rank}: expected {fragment!r} in the error:\n{text}"
        return text
    raise AssertionError(f"rank {GROUP.rank}: no {error.__name__} raised (expected {fragments})")


def device() -> torch.device:
    """The device tests put tensors on: the run's ``device`` parameter, else ``GOSSIP_TEST_DEVICE``,
    else cpu."""
    name = param("device", os.environ.get("GOSSIP_TEST_DEVICE", "cpu"))
    if name == "cuda":
        if not torch.cuda.is_available():
            raise Skip("no CUDA device")
        return torch.device("cuda", gossip.local_rank() % torch.cuda.device_count())
    return torch.device(name)


def rank_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor that differs on every rank, exactly representable in every dtype tested."""
    g = torch.Generator().manual_seed(1000 * seed + GROUP.rank)
    values = torch.randint(-64, 64, shape, generator=g).to(torch.float64) / 8.0
    return values.to(dtype).to(device())


def gathered(x: torch.Tensor) -> np.ndarray:
    """Every rank's tensor as rows of an (n, numel) float64 array, gathered with plain mpi4py."""
    return np.stack(GROUP.allgather(x.detach().to("cpu", torch.float64).reshape(-1).numpy()))


def assert_close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, what: str) -> None:
    """Compare with a relative tolerance suited to ``dtype``; the message names the rank."""
    got = actual.detach().to("cpu", torch.float64).reshape(-1).numpy()
    want = np.asarray(expected, dtype=np.float64).reshape(-1)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= TOLERANCE[dtype] * scale, (
        f"rank {GROUP.rank}: {what} ({dtype}) off by {err:.3g}; got {got[:4]}..., want {want[:4]}..."
    )


def take_steps(opt, model: torch.nn.Module, steps, loss_of) -> list[torch.Tensor]:
    """Take the optimizer steps ``steps`` (step indices: ``loss_of(model, k)`` picks step k's batch);
    the flat parameters after each."""
    out = []
    for k in steps:
        opt.zero_grad()
        loss_of(model, k).backward()
        opt.step()
        out.append(opt.x.clone())
    return out


def small_model(hidden: int, seed: int = 0) -> torch.nn.Module:
    """A float64 two-layer network (6 → ``hidden`` → 3), different on every rank (an optimizer that
    starts every rank equal must broadcast rank 0's values)."""
    torch.manual_seed(100 * seed + GROUP.rank)
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)).double().to(
        device())


def small_model_loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    """``small_model``'s loss at ``step`` on this rank's batch: heterogeneous data (a different mean per rank)."""
    g = torch.Generator().manual_seed(1000 * step + GROUP.rank)
    x = (torch.randn(16, 6, generator=g) + GROUP.rank).double()
    y = torch.randint(0, 3, (16,), generator=g)
    return torch.nn.functional.cross_entropy(model(x.to(device())), y.to(device()))


def gather_rows(t: torch.Tensor) -> np.ndarray:
    """Every rank's value of ``t`` (float64), stacked in rank order."""
    return np.stack(GROUP.allgather(t.detach().double().cpu().numpy().copy()))


def adamw_reference(lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch.optim.AdamW in NumPy on the (n, d) state (decoupled decay, bias-corrected moments):
    ``update(x, g, state) -> x'``."""
    def update(x, g, state):
        b1, b2 = betas
        t = state["t"] = state.get("t", 0) + 1
        x = x * (1 - lr * weight_decay)
        state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
        state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
        denom = np.sqrt(state["v"]) / np.sqrt(1 - b2 ** t) + eps
        return x - lr / (1 - b1 ** t) * state["m"] / denom
    return update
