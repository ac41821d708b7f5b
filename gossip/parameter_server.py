"""An asynchronous parameter server over MPI point-to-point: one server rank, every other rank a worker.

Workers never wait for each other. A worker sends (gradient, iteration index) and blocks only for
its own reply, (parameters, new index); the server takes gradients in arrival order from whichever
worker is ready (``MPI_ANY_SOURCE``), applies each with an update function and replies to that
worker at once. After ``updates`` gradients the server answers each worker's next message with a
stop, so every worker ends after exactly one more exchange and no message is left unmatched.

Messages go whole, on a communicator of their own (a duplicate of the runtime's), with fixed
tags; the server's receive buffer is allocated once. CUDA tensors are staged through host memory.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from mpi4py import MPI

from gossip import context, waiting
from gossip.tensors import mpi_datatype

TAG_INDEX, TAG_GRADIENT, TAG_PARAMETERS, TAG_STOP = 301, 302, 303, 304


def _host(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().reshape(-1)
    return (flat.to("cpu") if flat.is_cuda else flat).contiguous().numpy()


class ParameterServer:
    """Collective construction on every rank; ``server`` (default 0) serves, the others work.

    ``parameters`` is a flat float tensor: on the server, w⁰ and then the live model; on a worker,
    where each reply's parameters are written.
    """

    def __init__(self, parameters: torch.Tensor, server: int = 0) -> None:
        runtime = context.current()
        if not 0 <= server < runtime.size:
            raise ValueError(f"server rank {server} is out of range for a job of {runtime.size} ranks")
        if runtime.size < 2:
            raise ValueError("a parameter server needs at least 2 ranks (1 server and 1 worker)")
        if parameters.dim() != 1 or not parameters.dtype.is_floating_point:
            raise ValueError(f"parameters must be a flat floating-point tensor, got {tuple(parameters.shape)} "
                             f"{parameters.dtype}")
        self.comm = runtime.comm.Dup()
        self.server, self.rank = server, runtime.rank
        self.workers = [r for r in range(runtime.size) if r != server]
        self.parameters = parameters
        self._datatype = mpi_datatype(parameters.dtype)
        self._index = np.zeros(1, dtype=np.int64)
        self._received = np.empty(parameters.numel(), dtype=_host(parameters[:1]).dtype)
        self.stopped = False

    @property
    def is_server(self) -> bool:
        return self.rank == self.server

    # --- server ----------------------------------------------------------------------------------

    def serve(self, update: Callable[[torch.Tensor, torch.Tensor, int, int], int], updates: int) -> int:
        """Send w⁰ to every worker, then apply ``updates`` gradients as they arrive:
        ``update(parameters, gradient, ite, worker)`` changes the parameters in place and returns
        the new iteration index sent back with them. Returns the number applied."""
        if not self.is_server:
            raise RuntimeError(f"rank {self.rank} is a worker; only rank {self.server} serves")
        for worker in self.workers:
            self._reply(worker, 0)
        applied, stopped = 0, 0
        gradient = torch.from_numpy(self._received)
        status = MPI.Status()
        while stopped < len(self.workers):
            # waits as long as the workers compute: no op timeout on the server's receive
            self.comm.Recv([self._index, MPI.INT64_T], source=MPI.ANY_SOURCE, tag=TAG_INDEX, status=status)
            worker, ite = status.Get_source(), int(self._index[0])
            self.comm.Recv([self._received, self._datatype], source=worker, tag=TAG_GRADIENT)
            if applied < updates:
                index = update(self.parameters, gradient.to(self.parameters.device), ite, worker)
                applied += 1
                self._reply(worker, index)
            else:
                self.comm.Send([np.zeros(0, dtype=np.int64), MPI.INT64_T], dest=worker, tag=TAG_STOP)
                stopped += 1
        return applied

    def _reply(self, worker: int, index: int) -> None:
        self.comm.Send([_host(self.parameters), self._datatype], dest=worker, tag=TAG_PARAMETERS)
        self.comm.Send([np.array([index], dtype=np.int64), MPI.INT64_T], dest=worker, tag=TAG_INDEX)

    # --- worker ----------------------------------------------------------------------------------

    def pull(self) -> int | None:
        """Receive the server's reply: parameters written into ``parameters``; returns their
        iteration index, or None when the server has stopped (``stopped`` becomes True)."""
        status = MPI.Status()
        self.comm.Probe(source=self.server, tag=MPI.ANY_TAG, status=status)
        if status.Get_tag() == TAG_STOP:
            self.comm.Recv([np.zeros(0, dtype=np.int64), MPI.INT64_T], source=self.server, tag=TAG_STOP)
            self.stopped = True
            return None
        request = self.comm.Irecv([self._received, self._datatype], source=self.server, tag=TAG_PARAMETERS)
        waiting.wait([request], "parameter server: receive parameters", [self.server], self._received.nbytes)
        self.comm.Recv([self._index, MPI.INT64_T], source=self.server, tag=TAG_INDEX)
        with torch.no_grad():
            self.parameters.copy_(torch.from_numpy(self._received))
        return int(self._index[0])

    def push(self, gradient: torch.Tensor, ite: int) -> None:
        """Send a gradient computed at iteration index ``ite`` to the server."""
        if self.is_server:
            raise RuntimeError("the server does not push gradients")
        if gradient.numel() != self.parameters.numel():
            raise ValueError(f"rank {self.rank}: gradient has {gradient.numel()} elements, the parameters "
                             f"{self.parameters.numel()}")
        self.comm.Send([np.array([ite], dtype=np.int64), MPI.INT64_T], dest=self.server, tag=TAG_INDEX)
        self.comm.Send([_host(gradient), self._datatype], dest=self.server, tag=TAG_GRADIENT)

    def free(self) -> None:
        self.comm.Free()
