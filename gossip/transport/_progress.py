"""A thread that drives MPI's progress engine while nonblocking operations are in flight.

MPI moves a nonblocking message only inside MPI calls (Open MPI's TCP and shared-memory
transports have no progress thread of their own): between ``neighbor_allreduce_async`` and
``wait()`` a large message advances no further than the kernel's socket buffers while the caller
computes, so the overlap of the adapt-while-combine optimizers is partial on a network. With
``GOSSIP_PROGRESS_THREAD=1`` (and MPI initialised with ``MPI_THREAD_MULTIPLE``, mpi4py's
default), this thread calls ``MPI_Iprobe`` on a private communicator, where nothing is ever sent,
every ``interval`` seconds while an op is in flight; each call runs the progress engine, which
advances every pending transfer. It sleeps on an event when nothing is in flight, and holds the
GIL only for the call itself (torch releases it while computing). Once a rank of the communicator
has failed (fault-tolerant mode), ``MPI_Iprobe`` on it reports the failure instead; the thread then
drives progress through ``MPI_COMM_SELF`` and leaves the failure to the waits that report it.
"""

from __future__ import annotations

import threading
import time

from mpi4py import MPI

from gossip.transport._in_flight import InFlight


class ProgressThread:
    """Polls MPI progress while ``in_flight`` has live operations; ``stop()`` ends it."""

    def __init__(self, comm: MPI.Comm, in_flight: InFlight, interval: float = 2e-4) -> None:
        if MPI.Query_thread() != MPI.THREAD_MULTIPLE:
            raise RuntimeError("GOSSIP_PROGRESS_THREAD=1 needs MPI initialised with MPI_THREAD_MULTIPLE "
                               f"(this MPI provides level {MPI.Query_thread()})")
        self._comm = comm.Dup()  # private: no message ever arrives here, so Iprobe only drives progress
        self._in_flight = in_flight
        self._interval = interval
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="gossip-mpi-progress", daemon=True)
        in_flight.on_start = self._wake = threading.Event()
        self._thread.start()

    def _run(self) -> None:
        probe = self._comm
        while not self._stop:
            if self._in_flight.active > 0:
                try:
                    probe.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG)
                except MPI.Exception:  # a failed rank (fault-tolerant mode): progress without it
                    probe = MPI.COMM_SELF
                time.sleep(self._interval)
            else:
                self._wake.wait(0.1)
                self._wake.clear()

    def stop(self, free: bool = True) -> None:
        """End the thread; ``free``: release its communicator (not after a failure, when it may
        hold a failed rank: it is then kept)."""
        self._stop = True
        self._wake.set()
        self._thread.join()
        if free:
            self._comm.Free()
