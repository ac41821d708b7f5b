"""The chunked staging pipeline in one process (MPI_COMM_SELF, real requests): every chunk goes
out, comes back and is consumed in order, for any chunk size; buffers return to the pool. The
multi-rank runs are in tests/test_mpi.py (GOSSIP_STAGE_HOST=1) and, on a GPU, the CUDA cases."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from gossip.settings import Settings
from gossip.transport._buffers import BufferPool, mpi_buffer
from gossip.transport._staging import StagingPipeline
from gossip.transport._waiting import Watchdog


def _echo(fan_in: int):
    """A post that receives ``fan_in`` copies of each chunk from this process itself."""
    comm = MPI.COMM_SELF

    def post(send, recv, m):
        requests = [comm.Irecv(mpi_buffer(recv[k * m:(k + 1) * m]), source=0, tag=11) for k in range(fan_in)]
        return requests + [comm.Isend(mpi_buffer(send), dest=0, tag=11) for _ in range(fan_in)]
    return post


@pytest.mark.parametrize("numel,chunk_bytes", [(10, 12), (10, 40), (10, 4), (1000, 256), (7, 1 << 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_every_chunk_is_sent_received_and_consumed_in_order(numel, chunk_bytes, dtype):
    pool = BufferPool()
    pipeline = StagingPipeline(pool, Watchdog(0), chunk_bytes=chunk_bytes, stage_host=True)
    flat = torch.arange(numel, dtype=torch.float32).to(dtype)
    result = torch.full((numel,), -1.0, dtype=dtype)
    spans = []

    def consume(start, stop, received):
        m = stop - start
        spans.append((start, stop))
        result[start:stop] = 0.5 * flat[start:stop] + 0.25 * received[:m] + 0.25 * received[m:2 * m]

    pipeline.run(flat, 2, _echo(2), consume, "test")
    chunk = max(1, chunk_bytes // dtype.itemsize)
    assert spans == [(a, min(numel, a + chunk)) for a in range(0, numel, chunk)]
    assert torch.equal(result, flat)
    pooled = sum(len(free) for free in pool._free.values())
    pipeline.run(flat, 2, _echo(2), consume, "test")  # the second run reuses the buffers
    assert sum(len(free) for free in pool._free.values()) == pooled


def test_no_receivers_and_an_empty_tensor():
    pipeline = StagingPipeline(BufferPool(), Watchdog(0), chunk_bytes=8, stage_host=True)
    seen = []
    pipeline.run(torch.ones(5), 0, lambda send, recv, m: [], lambda a, b, received: seen.append((a, b, received)),
                 "test")
    assert seen == [(0, 2, None), (2, 4, None), (4, 5, None)]
    seen.clear()
    pipeline.run(torch.ones(0), 1, _echo(1), lambda a, b, received: seen.append((a, b)), "test")
    assert seen == []


def test_settings_come_from_the_environment_once_and_init_keywords_win(monkeypatch):
    monkeypatch.setenv("GOSSIP_STAGING_CHUNK_BYTES", "1024")
    monkeypatch.setenv("GOSSIP_STAGE_HOST", "1")
    monkeypatch.setenv("GOSSIP_OP_TIMEOUT", "2.5")
    monkeypatch.setenv("GOSSIP_CUDA_AWARE", "0")
    settings = Settings.resolve()
    assert (settings.staging_chunk_bytes, settings.stage_host, settings.op_timeout, settings.cuda_aware) == \
        (1024, True, 2.5, False)
    assert Settings.resolve(stage_host=False, op_timeout=7).stage_host is False
    assert Settings.resolve(op_timeout=7).op_timeout == 7.0
    assert "op_timeout=2.5" in settings.describe()
    monkeypatch.setenv("GOSSIP_STAGING_CHUNK_BYTES", "0")
    with pytest.raises(ValueError, match="GOSSIP_STAGING_CHUNK_BYTES must be >= 1"):
        Settings.resolve()
    monkeypatch.setenv("GOSSIP_STAGING_CHUNK_BYTES", "4096")
    monkeypatch.setenv("GOSSIP_STAGE_HOST", "yes")
    with pytest.raises(ValueError, match="GOSSIP_STAGE_HOST must be 0 or 1"):
        Settings.resolve()
    monkeypatch.setenv("GOSSIP_STAGE_HOST", "0")
    with pytest.raises(ValueError, match="op_timeout must be positive"):
        Settings.resolve(op_timeout=-1)
    with pytest.raises(TypeError, match="unknown setting"):
        Settings.resolve(chekc=False)
    monkeypatch.setenv("GOSSIP_CUDA_AWARE", "maybe")
    with pytest.raises(ValueError, match="GOSSIP_CUDA_AWARE must be 0 or 1"):
        Settings.resolve()


def test_cuda_awareness_is_asked_of_the_loaded_mpi_library():
    from gossip import transport

    libraries = transport._loaded_mpi_libraries()  # mpi4py loaded it privately: found through the process's maps
    assert any("libmpi" in path for path in libraries), libraries
    assert transport.detect_cuda_aware() is transport._query_library_cuda_support()
