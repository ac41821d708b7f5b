"""The transport's per-call route decision and the ops' shared prologue, in one process.

A real runtime on ``MPI.COMM_SELF`` (one rank): every route the settings allow without a GPU is
decided and then taken by a real op, whose result is checked. Shared memory needs several ranks
and the staged CUDA routes a GPU: those run under mpirun in tests/test_mpi.py (and its CUDA cases).
"""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

import gossip
from gossip.ops import _prologue as prologue
from gossip.runtime import current
from gossip.transport import Route, RouteKind

STAGING_CHUNK = 64  # bytes


@pytest.fixture
def runtime(request):
    """A one-rank runtime; ``settings`` (indirect parameter) are its ``gossip.init`` keywords."""
    settings = {"abort_on_error": False, "shared_memory": True, "check": True, **getattr(request, "param", {})}
    gossip.init(MPI.COMM_SELF, **settings)
    try:
        yield current()
    finally:
        gossip.shutdown()


def settings(**values):
    """Run the test on a runtime with these settings."""
    return pytest.mark.parametrize("runtime", [values], indirect=True, ids=[""])


def test_cpu_tensors_go_to_mpi_in_their_own_memory(runtime):
    x = torch.arange(10, dtype=torch.float32)
    transport = runtime.transport
    assert not runtime.node_memory.usable  # one rank: nobody to share memory with
    blocking = transport.route(x, pipeline=True, shared_memory=True)
    assert blocking == Route(RouteKind.MPI, blocking=True)
    assert not blocking.staged and blocking.chunk_elements is None and blocking.location is None
    assert transport.route(x, blocking=False) == Route(RouteKind.MPI, blocking=False)
    assert transport.route(x, host_memory=True) == Route(RouteKind.MPI)
    assert transport.outgoing(x) is x and transport.receiving(x) is x  # never copied


@settings(message_chunk_bytes=1024)
def test_a_large_point_to_point_message_goes_in_chunks(runtime):
    transport = runtime.transport
    assert not transport.route(torch.zeros(256)).message_chunks  # 1024 bytes: one chunk
    assert transport.route(torch.zeros(257)).message_chunks
    assert transport.route(torch.zeros(257, dtype=torch.float16)).message_chunks is False
    assert transport.route(torch.zeros(257, dtype=torch.float16), dtype=torch.float32).message_chunks
    assert transport.chunk_spans(600, 4) == [(0, 256), (256, 512), (512, 600)]


@settings(stage_host=True, staging_chunk_bytes=STAGING_CHUNK)
def test_stage_host_sends_blocking_ops_through_the_pipeline(runtime):
    transport = runtime.transport
    x = torch.arange(40, dtype=torch.float64)
    route = transport.route(x, pipeline=True, shared_memory=True)
    assert route == Route(RouteKind.PIPELINED, blocking=True, chunk_elements=STAGING_CHUNK // 8)
    assert route.staged
    # the chunk counts the elements as they travel: half types travel as float32 in allreduce
    half = transport.route(x.half(), pipeline=True, dtype=torch.float32)
    assert half.chunk_elements == STAGING_CHUNK // 4
    # only blocking ops that consume chunk by chunk take the pipeline
    assert transport.route(x, blocking=False, pipeline=True).kind is RouteKind.MPI
    assert transport.route(x).kind is RouteKind.MPI
    assert transport.route(x, host_memory=True).kind is RouteKind.MPI


def test_what_the_two_ends_must_agree_on():
    mpi, staged = Route(RouteKind.MPI, blocking=False), Route(RouteKind.STAGED, blocking=False, message_chunks=True)
    assert mpi.agreement() == staged.agreement()  # where each end keeps its bytes is its own business
    assert Route(RouteKind.MPI, blocking=True).agreement() != mpi.agreement()
    piped = Route(RouteKind.PIPELINED, chunk_elements=8)
    assert piped.agreement() != Route(RouteKind.MPI).agreement()
    assert piped.agreement() != Route(RouteKind.PIPELINED, chunk_elements=16).agreement()
    in_place = Route(RouteKind.SHARED_MEMORY, location=(0, 4096))
    assert in_place.agreement() != Route(RouteKind.SHARED_MEMORY).agreement()
    assert [r.protocol(point_to_point=False) for r in (in_place, piped, mpi)] == [3, 1, 2]
    assert mpi.protocol(point_to_point=True) == Route(RouteKind.MPI).protocol(point_to_point=True) == 0
    assert in_place.describe() == "shared memory, in place at window 0 byte 4096"
    assert piped.describe() == "MPI, blocking, staged in chunks of 8 elements"
    assert staged.describe() == "MPI, non-blocking"


@pytest.mark.parametrize("stage_host", [False, True], ids=["whole", "pipelined"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_ops_take_the_route_and_stay_correct(stage_host, dtype):
    # debug_buffers: every buffer given back to the pool is poisoned, so a result given back by mistake shows
    gossip.init(MPI.COMM_SELF, abort_on_error=False, stage_host=stage_host, staging_chunk_bytes=STAGING_CHUNK,
                debug_buffers=True)
    try:
        x = (torch.arange(50, dtype=torch.float64) / 4).to(dtype).reshape(5, 10)
        assert torch.equal(gossip.neighbor_allreduce(x), x)  # one rank: its own value, weight 1
        assert torch.equal(gossip.neighbor_allreduce(x, self_weight=1.0, src_weights={}, dst_weights={}), x)
        assert torch.equal(gossip.neighbor_allreduce_async(x).wait(), x)
        assert torch.equal(gossip.allreduce(x, "sum"), x) and torch.equal(gossip.allreduce(x.t()), x.t())
        assert torch.equal(gossip.broadcast(x), x)
        assert torch.equal(gossip.allgather(x), x)
        assert gossip.neighbor_allgather(x).shape == (0, 10)  # no in-neighbours: nothing concatenated
        assert torch.equal(gossip.hierarchical_neighbor_allreduce(x), x)
        pool = current().pool
        pooled = sum(len(free) for free in pool._free.values())
        gossip.allreduce(x)  # steady state: every buffer comes back to the pool
        assert sum(len(free) for free in pool._free.values()) == pooled
    finally:
        gossip.shutdown()


def test_the_output_buffer(runtime):
    x = torch.arange(6, dtype=torch.float32)
    out = torch.empty(6)
    assert prologue.pick_output(out, x) is out
    assert prologue.pick_output(out, x, avoid=out[3:]) is not out  # overlaps memory still being read
    assert prologue.pick_output(torch.empty(6, dtype=torch.float64), x).dtype == torch.float32
    assert prologue.pick_output(torch.empty(12)[::2], x).is_contiguous()
    assert gossip.neighbor_allreduce(x, out=out) is out and torch.equal(out, x)
    assert gossip.allreduce(x.half(), out=out.half()).dtype == torch.float16  # reduced in float32, delivered
    widened = prologue.widen(x.bfloat16())
    assert widened.dtype == torch.float32 and prologue.widen(x) is x
    with pytest.raises(gossip.InputMismatchError, match="out has shape"):
        gossip.neighbor_allreduce(x, out=torch.empty(5))


def test_bad_arguments_name_the_rank(runtime):
    with pytest.raises(gossip.InputMismatchError, match="rank 0: neighbor_allreduce takes a torch.Tensor"):
        gossip.neighbor_allreduce([1.0, 2.0])
    with pytest.raises(gossip.InputMismatchError, match="rank 0: neighbor_allgather takes a torch.Tensor"):
        gossip.neighbor_allgather(3)
    with pytest.raises(gossip.InputMismatchError, match="allreduce does not support dtype torch.bool"):
        gossip.allreduce(torch.ones(2, dtype=torch.bool))
    gossip.set_check(False)  # without the cross-rank check the local problem is raised at once
    with pytest.raises(TypeError, match="rank 0: neighbor_allreduce supports float32/float64/float16/bfloat16"):
        gossip.neighbor_allreduce(torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="rank 0: broadcast root 3 is out of range for 1 ranks"):
        gossip.broadcast(torch.ones(2), root=3)
    with pytest.raises(ValueError, match="rank 0: hierarchical_neighbor_allreduce takes a float tensor"):
        gossip.hierarchical_neighbor_allreduce(torch.ones(2, dtype=torch.int64))


def test_a_buffer_received_in_place_is_never_given_back(runtime):
    transport, pool = runtime.transport, runtime.pool
    result = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    buf = transport.receiving(result.view(-1))  # MPI reaches CPU memory: the result itself
    assert buf.data_ptr() == result.data_ptr()
    transport.received(buf, result.view(-1))  # another view of the same memory
    assert not any(b.data_ptr() == result.data_ptr() for free in pool._free.values() for b in free)


def test_host_memory_routes_copy_nothing_for_cpu_tensors(runtime):
    transport = runtime.transport
    x = torch.arange(8, dtype=torch.float64)
    assert transport.on_host(x).data_ptr() == x.data_ptr()
    strided = torch.arange(16, dtype=torch.float64)[::2]
    assert torch.equal(transport.on_host(strided), strided) and transport.on_host(strided).is_contiguous()
    assert not transport.host_buffer(8, torch.float64, torch.device("cpu")).is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@settings(cuda_aware=False, staging_chunk_bytes=STAGING_CHUNK)
def test_cuda_tensors_without_a_cuda_aware_mpi_are_staged(runtime):
    transport = runtime.transport
    x = torch.arange(40, dtype=torch.float32, device="cuda")
    assert transport.route(x, pipeline=True).kind is RouteKind.PIPELINED
    assert transport.route(x).kind is RouteKind.STAGED
    assert transport.route(x, blocking=False, pipeline=True).kind is RouteKind.STAGED
    assert transport.route(x, host_memory=True).kind is RouteKind.STAGED
    staged = transport.outgoing(x)
    assert staged.device.type == "cpu" and staged.is_pinned() and torch.equal(staged, x.cpu())
    transport.done_with(staged, x)
    assert torch.equal(gossip.allreduce(x), x) and torch.equal(gossip.neighbor_allreduce(x), x)
    assert torch.equal(gossip.broadcast(x), x) and torch.equal(gossip.allgather(x), x)
