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
parameters that it is leaving; a server ends when each worker has been stopped by it, has left it
or has died. So every worker ends after exactly one more exchange and no message is left unmatched.

Messages go whole, on a communicator of their own (a duplicate of the runtime's), with fixed
tags; receive buffers are allocated once. Messages leave from and arrive in host memory (the
transport's host-memory route): CUDA tensors are staged through pinned host buffers.

This is the asynchronous parameter-server scheme of Dean et al., "Large scale distributed deep
networks" (NeurIPS 2012), and Li et al., "Scaling distributed machine learning with the parameter
server" (OSDI 2014); workers compute on parameters that may be stale by the updates other
workers made in between.

**Fault-tolerant mode** (the ``fault_tolerant`` setting, in a job started with ``gossiprun
--fault-tolerant``: Open MPI's ULFM, Bland, Bouteiller, Herault, Bosilca and Dongarra,
"Post-failure recovery of MPI communication capability: design and rationale", IJHPCA 27(3),
2013). Every exchange polls instead of blocking, and a dead rank is handled by its role:

* A dead **worker** is not an error. ULFM makes the server's receive from ``MPI_ANY_SOURCE`` fail
  with ``MPI_ERR_PROC_FAILED`` until the failure is acknowledged (``MPI_Comm_ack_failed``), and
  ``MPI_Comm_get_failed`` names the dead rank; the server acknowledges it, stops expecting that
  worker (what it still had in flight is dropped; the requests are kept, never freed, until the
  process ends, as :mod:`gossip.transport._waiting` explains), keeps serving the others, and ends
  when every *live* worker has been stopped or has left. ``on_failure(worker, applied)`` tells the
  caller; :attr:`ParameterServer.failed` lists the dead workers. The other workers never notice.
* A dead **server** ends training, since the model (or its shard) is gone: :meth:`pull` and
  :meth:`push` raise :class:`gossip.RankFailure` on every worker, naming the server ranks
  (``ranks``), and :meth:`serve` raises it on the other servers of a sharded model, as soon as
  MPI reports the failure (under 0.1 s on one machine; should it never do so, the wait raises
  :class:`gossip.OpTimeoutError` after the op timeout).

Nothing is revoked and nothing shrinks: the workers never wait for one another, so the survivors
need no collective to go on. Stops and leave notices are synchronous sends (``MPI_Ssend``), and
:meth:`ParameterServer.free` is an agreement of the live ranks (``MPI_Comm_agree``) that says on
every survivor alike whether a rank failed (:attr:`ParameterServer.had_failures`): after it no
exchange is pending anywhere, and the survivors may call :func:`gossip.recover` together to use
collectives again (the runtime's other communicators still include the dead rank, so without it
``gossip.shutdown`` raises :class:`gossip.RankFailure`, having let go of everything).
:func:`gossip.recover` closes a server still open without its collective free
(:meth:`ParameterServer.abandon`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import numpy as np
import torch
from mpi4py import MPI

from gossip import runtime
from gossip.errors import OpTimeoutError, RankFailure
from gossip.transport import Transport
from gossip.transport._buffers import mpi_datatype
from gossip.transport._failures import FailureDetector, drive_progress, is_failure
from gossip.transport._trace import MAIN, op_args

TAG_INDEX, TAG_GRADIENT, TAG_PARAMETERS, TAG_STOP = 301, 302, 303, 304
LEAVING = -1  # the index a worker sends to a server to say it leaves
_NOTHING = np.zeros(0, dtype=np.int64)  # the body of a stop
# A rank that finds the communicator revoked waits this long for the failure itself to reach it, to
# name the failed server.
_NAMING_GRACE_S = 1.0


class _WorkersLost(Exception):
    """Fault-tolerant mode, on a server: the workers ``ranks`` died (handled inside :meth:`ParameterServer.serve`)."""

    def __init__(self, ranks: Sequence[int]) -> None:
        super().__init__(ranks)
        self.ranks = list(ranks)


def _failures_raised(method):
    """Refuse a closed server; in fault-tolerant mode, a stray MPI error of a failed rank inside
    ``method`` raises :class:`gossip.RankFailure` (the exchanges themselves raise it naming the
    dead server)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.comm == MPI.COMM_NULL:
            raise RuntimeError(f"rank {self.rank}: this parameter server was closed (freed, or by gossip.recover())")
        if self._detector is None:
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        except MPI.Exception as error:
            if not is_failure(error):
                raise
            failed = self._detector.failed()
            raise RankFailure(f"rank {self.rank}: parameter server {method.__name__}: ranks {failed} of "
                              f"{self.comm.size} failed ({error.Get_error_string()})", tuple(failed)) from error
    return call


class ParameterServer:
    """Collective construction on every rank; ``server`` (a rank, default 0, or a list of ranks
    that shard the model) serves, the others work.

    ``parameters`` is a flat float tensor: on a server, w⁰ and then the live model (its shard of
    it); on a worker, where each reply's parameters are written. In fault-tolerant mode a server
    goes on without dead workers and a worker raises :class:`gossip.RankFailure` when a server
    dies (module docstring).
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
        with rt.watchdog.guard("parameter server: duplicate the communicator"):
            self.comm = rt.comm.Dup()
        self._watchdog = rt.watchdog
        self._runtime = rt
        # fault-tolerant mode: which ranks of this communicator failed (nothing is ever revoked here)
        self._detector = FailureDetector(self.comm) if rt.failures is not None else None
        rt.own(self)  # freed at shutdown unless freed before
        self.servers, self.rank = servers, rt.rank
        self.server = servers[0]
        self.workers = [r for r in range(rt.size) if r not in servers]
        self.failed: list[int] = []  # on a server: the workers it found dead, in that order (fault-tolerant mode)
        self.last_heard: dict[int, int] = {}  # on a server: worker -> the update its latest gradient arrived at
        self.had_failures = False  # set by free() in fault-tolerant mode: whether a rank of the server failed
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
    def serve(self, update: Callable[[torch.Tensor, torch.Tensor, int, int], int], updates: int,
              on_failure: Callable[[int, int], object] | None = None) -> int:
        """Send w⁰ (this server's shard) to every worker, then apply ``updates`` gradients as they
        arrive: ``update(parameters, gradient, ite, worker)`` changes the shard's parameters in place
        and returns the new iteration index sent back with them. Returns the number applied.

        Fault-tolerant mode: ``on_failure(worker, applied)`` is called when the server finds the
        worker ``worker`` dead, after ``applied`` updates, and stops expecting it (module docstring;
        ``last_heard[worker]``: the update its last gradient arrived at); a dead server of a sharded
        model raises :class:`gossip.RankFailure`."""
        if not self.is_server:
            raise RuntimeError(f"rank {self.rank} is a worker; ranks {self.servers} serve")
        shard = self.parameters[self.shard]
        live = list(self.workers)  # the workers still to stop: not stopped, not left, not dead
        applied = 0

        def lost(ranks: Sequence[int]) -> None:
            for worker in ranks:
                if worker in live:
                    live.remove(worker)
                    self.failed.append(worker)
                    if on_failure is not None:
                        on_failure(worker, applied)

        for worker in self.workers:
            try:
                self._reply(worker, shard, 0)
            except _WorkersLost as error:
                lost(error.ranks)
        gradient = torch.from_numpy(self._received)
        if shard.is_cuda:  # one device buffer for every arriving gradient
            on_device = torch.empty_like(shard)
        while live:
            try:
                worker, ite = self._next_index(live)
                if ite == LEAVING:  # another server stopped this worker
                    live.remove(worker)
                    continue
                self._receive(self._received, worker, TAG_GRADIENT, "parameter server: receive a gradient")
                self.last_heard[worker] = applied
                if applied < updates:
                    index = update(shard, on_device.copy_(gradient) if shard.is_cuda else gradient, ite, worker)
                    applied += 1
                    self._reply(worker, shard, index)
                else:
                    self._send(_NOTHING, worker, TAG_STOP, "parameter server: stop a worker", synchronous=True)
                    live.remove(worker)
            except _WorkersLost as error:
                lost(error.ranks)
        return applied

    def _next_index(self, live: Sequence[int]) -> tuple[int, int]:
        """(worker, index) of the next index message, from any worker: blocking, with no op timeout
        (the server waits as long as the workers compute). Fault-tolerant mode: polls, acknowledges
        failures (so that the ``MPI_ANY_SOURCE`` probe works again), drops the messages of workers
        no longer ``live`` and raises :class:`_WorkersLost` for live ones found dead."""
        status = MPI.Status()
        if self._detector is None:
            self.comm.Recv([self._index, MPI.INT64_T], source=MPI.ANY_SOURCE, tag=TAG_INDEX, status=status)
            return status.Get_source(), int(self._index[0])
        while True:
            self._check(live, "parameter server: wait for a gradient")
            try:  # a matched probe takes the message off the queue (MPI-4.1 §3.8.2), so it is read once
                message = self.comm.Improbe(MPI.ANY_SOURCE, TAG_INDEX, status)
            except MPI.Exception as error:
                if not is_failure(error) or error.Get_error_class() == MPI.ERR_REVOKED:
                    raise
                self.comm.Ack_failed()  # MPI_ERR_PROC_FAILED until acknowledged
                continue
            if message is not None:
                message.Recv([self._index, MPI.INT64_T])
                worker = status.Get_source()
                if worker in live:
                    return worker, int(self._index[0])
                continue  # from a worker already found dead: dropped
            os.sched_yield()

    def _host(self, t: torch.Tensor) -> np.ndarray:
        """``t``'s values in host memory: a view of a CPU tensor, or a CUDA tensor's copy in the
        pinned staging buffer (valid until the next call)."""
        return Transport.on_host(t.detach().reshape(-1), self._staging).numpy()

    def _reply(self, worker: int, shard: torch.Tensor, index: int) -> None:
        self._send(self._host(shard), worker, TAG_PARAMETERS, "parameter server: send parameters")
        self._send(np.array([index], dtype=np.int64), worker, TAG_INDEX, "parameter server: send the index")

    # --- worker ----------------------------------------------------------------------------------

    @_failures_raised
    def pull(self) -> list[int] | None:
        """Receive every server's reply: parameters written into ``parameters``; returns their
        iteration indices (one per server, in ``servers`` order), or None when a server has
        stopped (``stopped`` becomes True). Fault-tolerant mode: a dead server raises
        :class:`gossip.RankFailure` naming it."""
        indices, answered = [], []
        status = MPI.Status()
        for server in self.servers:
            self._probe(server, status)
            if status.Get_tag() == TAG_STOP:
                self._receive(_NOTHING, server, TAG_STOP, "parameter server: receive the stop")
                self.stopped = True
                continue
            into = self._received[self.shards[server]]
            self._receive(into, server, TAG_PARAMETERS, "parameter server: receive parameters")
            self._receive(self._index, server, TAG_INDEX, "parameter server: receive the index")
            indices.append(int(self._index[0]))
            answered.append(server)
        if self.stopped:
            for server in answered:  # they expect another message from us: say we leave
                self._send(np.array([LEAVING], dtype=np.int64), server, TAG_INDEX, "parameter server: leave",
                           synchronous=True)
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
            self._send(np.array([ite], dtype=np.int64), server, TAG_INDEX, "parameter server: send the index")
            self._send(host[self.shards[server]], server, TAG_GRADIENT, "parameter server: send a gradient")

    # --- point to point, blocking or (fault-tolerant mode) polled ----------------------------------

    def _buffer(self, data: np.ndarray) -> list:
        return [data, MPI.INT64_T if data.dtype == np.int64 else self._datatype]

    def _send(self, data: np.ndarray, dest: int, tag: int, what: str, synchronous: bool = False) -> None:
        """Send ``data`` to ``dest`` (``synchronous``: complete once ``dest`` has matched it)."""
        self._runtime.traffic.add("parameter server", data.nbytes, 1)
        if self._detector is None:
            (self.comm.Ssend if synchronous else self.comm.Send)(self._buffer(data), dest=dest, tag=tag)
            return
        request = (self.comm.Issend if synchronous else self.comm.Isend)(self._buffer(data), dest=dest, tag=tag)
        self._complete(request, dest, what, data.nbytes)

    def _receive(self, into: np.ndarray, source: int, tag: int, what: str) -> None:
        """Receive into ``into`` from ``source``; under the op timeout (the message is on its way)."""
        request = self.comm.Irecv(self._buffer(into), source=source, tag=tag)
        if self._detector is None:
            self._watchdog.wait([request], what, [source], into.nbytes)
        else:
            self._complete(request, source, what, into.nbytes)

    def _probe(self, server: int, status: MPI.Status) -> None:
        """Wait for the next message from ``server`` (under the op timeout), its envelope in ``status``."""
        what = "parameter server: wait for the reply"
        if self._detector is None:
            self._watchdog.probe(self.comm, server, MPI.ANY_TAG, status, what)
            return
        self._poll(lambda: self.comm.Iprobe(source=server, tag=MPI.ANY_TAG, status=status), server, what, None)

    def _complete(self, request: MPI.Request, peer: int, what: str, nbytes: int) -> None:
        """Fault-tolerant mode: poll ``request`` (exchanged with ``peer``) to completion without
        freeing it; if ``peer`` or a server dies first, it is kept, never freed (module docstring)."""
        try:
            self._poll(request.Get_status, peer, what, nbytes)
            try:
                request.Wait()  # complete, and no failure of the peer known: frees it
            except MPI.Exception as error:
                if not is_failure(error):
                    raise
                self._failed(peer, what, error)
        except (_WorkersLost, RankFailure, OpTimeoutError):
            self._watchdog.abandoned.append(request)
            raise

    def _poll(self, test: Callable[[], bool], peer: int, what: str, nbytes: int | None) -> None:
        """Call ``test()`` until it is True, checking for failures (:meth:`_check`) and the op timeout;
        the time counts as waiting."""
        begin = time.perf_counter()
        timeout = self._watchdog.timeout
        while True:
            try:
                done = test()
            except MPI.Exception as error:
                if not is_failure(error):
                    raise
                self._failed(peer, what, error)
            self._check([peer], what)
            if done:
                break
            if timeout is not None and time.perf_counter() - begin > timeout:
                raise OpTimeoutError(f"rank {self.rank}: {what} of {nbytes} bytes has waited more than {timeout:g} s "
                                     f"for rank {peer} (GOSSIP_OP_TIMEOUT): it is far behind or stuck")
            os.sched_yield()
        end = time.perf_counter()
        self._watchdog.waited += end - begin
        if self._watchdog.recorder is not None:
            self._watchdog.recorder.add(f"wait {what}", "communication", begin, end, MAIN, op_args([peer], nbytes))

    def _check(self, peers: Sequence[int], what: str, cause: MPI.Exception | None = None) -> None:
        """Fault-tolerant mode: raise :class:`gossip.RankFailure` if a server died or the communicator
        was revoked (``gossip.recover`` on another rank), :class:`_WorkersLost` if one of ``peers`` died."""
        revoked = self.comm.Is_revoked()
        if not self._detector.broken() and not revoked:
            return
        failed = self._detector.failed()
        servers = [s for s in self.servers if s in failed and s != self.rank]
        deadline = time.monotonic() + _NAMING_GRACE_S
        while revoked and not servers and time.monotonic() < deadline:  # the failure itself may follow
            drive_progress()
            time.sleep(0.001)
            failed = self._detector.failed()
            servers = [s for s in self.servers if s in failed and s != self.rank]
        if servers or revoked:
            raise self._server_failure(servers, what, cause)
        dead = [p for p in peers if p in failed]
        if dead:
            raise _WorkersLost(dead)

    def _failed(self, peer: int, what: str, cause: MPI.Exception) -> NoReturn:
        """The exchange with ``peer`` ended in a failure error (``cause``): raise as :meth:`_check` does,
        naming ``peer`` if MPI does not list it as failed yet."""
        self._check([peer], what, cause)
        if peer in self.servers:
            raise self._server_failure([peer], what, cause) from cause
        raise _WorkersLost([peer]) from cause

    def _server_failure(self, servers: Sequence[int], what: str, cause: MPI.Exception | None) -> RankFailure:
        if servers:
            who = f"rank {servers[0]}" if len(servers) == 1 else f"ranks {', '.join(map(str, servers))}"
            named = f"the parameter server ({who} of {self.comm.size}) failed; the model it held is lost"
        else:
            named = "the parameter server's communicator was revoked (gossip.recover() on another rank)"
        if cause is not None:
            named += f" ({cause.Get_error_string()})"
        return RankFailure(f"rank {self.rank}: {what}: {named}", tuple(servers))

    # --- lifecycle -------------------------------------------------------------------------------

    def abandon(self, reason: str) -> None:
        """Close the server without the collective free, after a rank failure (``reason``); its
        communicator is kept until the process ends."""
        self._kept, self.comm = self.comm, MPI.COMM_NULL
        self.stopped = True

    def free(self) -> None:
        """Collective: release the server's communicator (``gossip.shutdown`` does it otherwise).

        In fault-tolerant mode every live rank calls it once its exchanges are over (``serve``
        returned, or ``pull`` returned None or raised): an agreement of the live ranks
        (``MPI_Comm_agree``, which completes despite failures), after which :attr:`had_failures`
        says, the same on every survivor, whether a rank of the server had failed (then the
        communicator is kept until the process ends). No exchange is pending on any survivor
        after it, so they may call :func:`gossip.recover` together to use collectives again."""
        if self.comm == MPI.COMM_NULL:
            return
        if self._detector is not None:
            self.had_failures = self._agree_done()
            if self.had_failures:
                self.abandon("a rank of the parameter server failed")
                self._runtime.disown(self)
                return
        self.comm.Free()
        self._runtime.disown(self)

    def _agree_done(self) -> bool:
        """Fault-tolerant mode: agree with every live rank that the exchanges are over; True if a rank
        failed. An agreement that a failure interrupted raises ``MPI_ERR_PROC_FAILED`` on every
        survivor alike; each acknowledges the failure and they agree again (ULFM's agreement, Herault
        et al., "Practical scalable consensus for pseudo-synchronous distributed systems", SC 2015)."""
        flag = np.array([0 if self._detector.broken() else 1], dtype=np.intc)
        interrupted, begin, timeout = False, time.perf_counter(), self._watchdog.timeout
        while True:
            request = self.comm.Iagree(flag)
            try:
                while not request.Test():
                    if timeout is not None and time.perf_counter() - begin > timeout:
                        self._watchdog.abandoned.append(request)
                        raise OpTimeoutError(f"rank {self.rank}: closing the parameter server waited more than "
                                             f"{timeout:g} s for the other ranks (GOSSIP_OP_TIMEOUT): every live "
                                             "rank must close it")
                    os.sched_yield()
                return interrupted or not flag[0]
            except MPI.Exception as error:
                if not is_failure(error):
                    raise
                self._watchdog.abandoned.append(request)
                self.comm.Ack_failed()
                interrupted, flag[0] = True, 0
