"""An asynchronous parameter server over MPI point-to-point: server ranks hold the model, every other rank works.

Workers never wait for each other. A worker sends (gradient, iteration index) and blocks only for
its own reply, (parameters, new index); a server takes gradients in arrival order from whichever
worker is ready (``MPI_ANY_SOURCE``), applies each with an update function and replies to that
worker at once.

With several server ranks the flat model is split into contiguous shards, one per server: a
worker sends each server its shard of the gradient with that server's iteration index and gets
back that shard of the parameters; each server counts its own iterations and applies its own
update rule to its shard, with no communication between servers.

Stopping: after ``updates`` gradients a server answers each worker's next message with a stop. A
worker that gets a stop from any server stops, and tells every server that still answered it with
parameters that it is leaving; a server ends when each worker has been stopped by it or has left
it. So every worker ends after exactly one more exchange and no message is left unmatched.

Messages go whole, on a communicator of their own (a duplicate of the runtime's), with fixed
tags; receive buffers are allocated once. Messages leave from and arrive in host memory (the
transport's host-memory route): CUDA tensors are staged through pinned host buffers.

This is the asynchronous parameter-server scheme of Dean et al., "Large scale distributed deep
networks" (NeurIPS 2012), and Li et al., "Scaling distributed machine learning with the parameter
server" (OSDI 2014); workers compute on parameters that may be stale by the updates other
workers made in between.

In fault-tolerant mode an MPI error of a failed rank raises :class:`gossip.RankFailure` from
:meth:`ParameterServer.serve`, :meth:`ParameterServer.pull` and :meth:`ParameterServer.push`;
:func:`gossip.recover` closes the server without its collective free (:meth:`ParameterServer.abandon`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI

from gossip import runtime
from gossip.transport import Transport
from gossip.transport._buffers import mpi_datatype

TAG_INDEX, TAG_GRADIENT, TAG_PARAMETERS, TAG_STOP = 301, 302, 303, 304
LEAVING = -1  # the index a worker sends to a server to say it leaves


def _failures_raised(method):
    """Fault-tolerant mode: an MPI error of a failed rank inside ``method`` raises :class:`gossip.RankFailure`."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.comm == MPI.COMM_NULL:
            raise RuntimeError(f"rank {self.rank}: this parameter server was closed (freed, or by gossip.recover())")
        with self._watchdog.guard(f"parameter server {method.__name__}"):
            return method(self, *args, **kwargs)
    return call


class ParameterServer:
    """Collective construction on every rank; ``server`` (a rank, default 0, or a list of ranks
    that shard the model) serves, the others work.

    ``parameters`` is a flat float tensor: on a server, w⁰ and then the live model (its shard of
    it); on a worker, where each reply's parameters are written.
    """

    def __init__(self, parameters: torch.Tensor, server: int | Sequence[int] = 0) -> None:
        rt = runtime.current()
        servers = [server] if isinstance(server, int | np.integer) else list(server)
        if not servers or len(set(servers)) != len(servers):
            raise ValueError(f"rank {rt.rank}: servers must be distinct ranks, got {server!r}")
        outside = [s for s in servers if not 0 <= s < rt.size]
        if outside:
            raise ValueError(f"rank {rt.rank}: server rank(s) {outside} out of range for a job of {rt.size} ranks")
        if rt.size - len(servers) < 1:
            raise ValueError(f"rank {rt.rank}: a parameter server needs at least 2 ranks ({len(servers)} server(s) "
                             f"and 1 worker), the job has {rt.size}")
        if parameters.dim() != 1 or not parameters.dtype.is_floating_point:
            raise ValueError(f"rank {rt.rank}: parameters must be a flat floating-point tensor, got "
                             f"{tuple(parameters.shape)} {parameters.dtype}")
        if parameters.numel() < len(servers):
            raise ValueError(f"rank {rt.rank}: {parameters.numel()} parameters cannot be sharded over "
                             f"{len(servers)} servers")
        self.comm = rt.comm.Dup()
        self._watchdog = rt.watchdog
        self._runtime = rt
        rt.own(self)  # freed at shutdown unless freed before
        self.servers, self.rank = servers, rt.rank
        self.server = servers[0]
        self.workers = [r for r in range(rt.size) if r not in servers]
        self.parameters = parameters
        bounds = np.linspace(0, parameters.numel(), len(servers) + 1).round().astype(int)
        self.shards = {s: slice(int(a), int(b)) for s, a, b in zip(servers, bounds[:-1], bounds[1:], strict=True)}
        self._datatype = mpi_datatype(parameters.dtype)
        self._index = np.zeros(1, dtype=np.int64)
        # Host buffers allocated once (pinned for CUDA parameters): what arrives, and what a CUDA
        # tensor is staged through before it is sent.
        numel = self.shard.stop - self.shard.start if self.is_server else parameters.numel()
        transport = rt.transport
        route = transport.route(parameters, host_memory=True)  # messages go whole, from host memory
        self._receive_buffer = transport.host_buffer(numel, parameters.dtype, parameters.device)
        self._received = self._receive_buffer.numpy()
        self._staging = transport.host_buffer(numel, parameters.dtype, parameters.device) if route.staged else None
        self.stopped = False

    @property
    def is_server(self) -> bool:
        return self.rank in self.shards

    @property
    def shard(self) -> slice:
        """This server's part of the flat parameters."""
        return self.shards[self.rank]

    # --- server ----------------------------------------------------------------------------------

    @_failures_raised
    def serve(self, update: Callable[[torch.Tensor, torch.Tensor, int, int], int], updates: int) -> int:
        """Send w⁰ (this server's shard) to every worker, then apply ``updates`` gradients as they
        arrive: ``update(parameters, gradient, ite, worker)`` changes the shard's parameters in place
        and returns the new iteration index sent back with them. Returns the number applied."""
        if not self.is_server:
            raise RuntimeError(f"rank {self.rank} is a worker; ranks {self.servers} serve")
        shard = self.parameters[self.shard]
        for worker in self.workers:
            self._reply(worker, shard, 0)
        applied, finished = 0, 0
        gradient = torch.from_numpy(self._received)
        if shard.is_cuda:  # one device buffer for every arriving gradient
            on_device = torch.empty_like(shard)
        status = MPI.Status()
        while finished < len(self.workers):
            # waits as long as the workers compute: no op timeout on the server's receive
            self.comm.Recv([self._index, MPI.INT64_T], source=MPI.ANY_SOURCE, tag=TAG_INDEX, status=status)
            worker, ite = status.Get_source(), int(self._index[0])
            if ite == LEAVING:  # another server stopped this worker
                finished += 1
                continue
            self.comm.Recv([self._received, self._datatype], source=worker, tag=TAG_GRADIENT)
            if applied < updates:
                index = update(shard, on_device.copy_(gradient) if shard.is_cuda else gradient, ite, worker)
                applied += 1
                self._reply(worker, shard, index)
            else:
                self.comm.Send([np.zeros(0, dtype=np.int64), MPI.INT64_T], dest=worker, tag=TAG_STOP)
                finished += 1
        return applied

    def _host(self, t: torch.Tensor) -> np.ndarray:
        """``t``'s values in host memory: a view of a CPU tensor, or a CUDA tensor's copy in the
        pinned staging buffer (valid until the next call)."""
        return Transport.on_host(t.detach().reshape(-1), self._staging).numpy()

    def _reply(self, worker: int, shard: torch.Tensor, index: int) -> None:
        self.comm.Send([self._host(shard), self._datatype], dest=worker, tag=TAG_PARAMETERS)
        self.comm.Send([np.array([index], dtype=np.int64), MPI.INT64_T], dest=worker, tag=TAG_INDEX)

    # --- worker ----------------------------------------------------------------------------------

    @_failures_raised
    def pull(self) -> list[int] | None:
        """Receive every server's reply: parameters written into ``parameters``; returns their
        iteration indices (one per server, in ``servers`` order), or None when a server has
        stopped (``stopped`` becomes True)."""
        indices, answered = [], []
        status = MPI.Status()
        for server in self.servers:
            self._watchdog.probe(self.comm, server, MPI.ANY_TAG, status, "parameter server: wait for the reply")
            if status.Get_tag() == TAG_STOP:
                self.comm.Recv([np.zeros(0, dtype=np.int64), MPI.INT64_T], source=server, tag=TAG_STOP)
                self.stopped = True
                continue
            into = self._received[self.shards[server]]
            request = self.comm.Irecv([into, self._datatype], source=server, tag=TAG_PARAMETERS)
            self._watchdog.wait([request], "parameter server: receive parameters", [server], into.nbytes)
            self.comm.Recv([self._index, MPI.INT64_T], source=server, tag=TAG_INDEX)
            indices.append(int(self._index[0]))
            answered.append(server)
        if self.stopped:
            for server in answered:  # they expect another message from us: say we leave
                self.comm.Send([np.array([LEAVING], dtype=np.int64), MPI.INT64_T], dest=server, tag=TAG_INDEX)
            return None
        with torch.no_grad():
            self.parameters.copy_(torch.from_numpy(self._received))
        return indices

    @_failures_raised
    def push(self, gradient: torch.Tensor, indices: Sequence[int]) -> None:
        """Send each server its shard of a gradient computed at the parameters of its iteration
        index (``indices``, as :meth:`pull` returned them)."""
        if self.is_server:
            raise RuntimeError("a server does not push gradients")
        if gradient.numel() != self.parameters.numel():
            raise ValueError(f"rank {self.rank}: gradient has {gradient.numel()} elements, the parameters "
                             f"{self.parameters.numel()}")
        if len(indices) != len(self.servers):
            raise ValueError(f"rank {self.rank}: {len(indices)} iteration indices for {len(self.servers)} servers")
        host = self._host(gradient)
        for server, ite in zip(self.servers, indices, strict=True):
            self.comm.Send([np.array([ite], dtype=np.int64), MPI.INT64_T], dest=server, tag=TAG_INDEX)
            self.comm.Send([host[self.shards[server]], self._datatype], dest=server, tag=TAG_GRADIENT)

    def abandon(self, reason: str) -> None:
        """Close the server without the collective free, after a rank failure (``reason``); its
        communicator is kept until the process ends."""
        self._kept, self.comm = self.comm, MPI.COMM_NULL
        self.stopped = True

    def free(self) -> None:
        """Collective: release the server's communicator (``gossip.shutdown`` does it otherwise)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self._runtime.disown(self)
