"""MPI transport settings gossip needs, applied before MPI starts.

Open MPI's TCP transport sends a message above its eager limit (64 KiB by default) by rendezvous:
the receiver must answer before the data flows. When two ranks exchange with each other over one
TCP connection, that answer can queue behind the data already flowing the other way, so the two
directions take turns and a pair exchange runs at half the link rate. Gossip sends large
messages as chunks of ``GOSSIP_MESSAGE_CHUNK_BYTES`` (1 MiB by default, see
:mod:`gossip.transport`); raising the eager limit just above one chunk lets every chunk stream
without a handshake, at line rate in both directions.

:func:`apply_defaults` sets ``OMPI_MCA_btl_tcp_eager_limit`` in this process's environment
unless the user set it, which Open MPI reads when MPI starts: ``import gossip`` calls it before
importing mpi4py's ``MPI`` (which starts MPI), and ``gossiprun`` puts the same value in the job's
environment, so it also holds for a program that imports ``mpi4py.MPI`` first. Other MPIs ignore
the variable.
"""

from __future__ import annotations

import os

DEFAULT_CHUNK_BYTES = 1 << 20
_ENV_CHUNK = "GOSSIP_MESSAGE_CHUNK_BYTES"
# Room for Open MPI's match header on top of a chunk's payload.
_HEADER_ROOM = 1024


def message_chunk_bytes() -> int:
    """Bytes per chunk of a large point-to-point message (``GOSSIP_MESSAGE_CHUNK_BYTES``)."""
    value = os.environ.get(_ENV_CHUNK)
    if value is None:
        return DEFAULT_CHUNK_BYTES
    try:
        chunk = int(value)
    except ValueError:
        raise ValueError(f"{_ENV_CHUNK} must be a number of bytes, got {value!r}") from None
    if chunk < 64:
        raise ValueError(f"{_ENV_CHUNK} must be at least 64 bytes, got {chunk}")
    return chunk


def defaults() -> dict[str, str]:
    """The MCA settings gossip wants (the user's own settings win)."""
    return {"OMPI_MCA_btl_tcp_eager_limit": str(message_chunk_bytes() + _HEADER_ROOM)}


def apply_defaults(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put :func:`defaults` into ``env`` (default: this process's environment) where unset."""
    target = os.environ if env is None else env
    for name, value in defaults().items():
        target.setdefault(name, value)
    return target
