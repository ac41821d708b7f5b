"""The traffic counter (``gossip.traffic``) equals its closed form for every kind of op.

The expected counts are written out here from the documented forms (:mod:`gossip.transport._traffic`),
never read from the counter's helpers: message bytes times destinations for neighbour and
point-to-point messages (chunks of ``message_chunk_bytes`` counted as messages), a ring allreduce's
2(n − 1)·m / n, (n − 1)·m on a broadcast's root and for an allgather's block, the window's slot plus
its 8-byte counter, the parameter server's messages as the protocol sends them, and the compressed
messages' sizes from their wire formats. Degrees come from the ``topologies`` graphs themselves.
"""

import math

import numpy as np
import torch
from _common import GROUP

import gossip
import topologies
from gossip.ops.parameter_server import ParameterServer

N = GROUP.size
R = GROUP.rank


def chunk_bytes() -> int:
    return gossip.settings().message_chunk_bytes


def chunks(numel: int, itemsize: int) -> int:
    """Messages one point-to-point transfer of ``numel`` elements takes (``message_chunk_bytes`` each)."""
    return max(1, math.ceil(numel / max(1, chunk_bytes() // itemsize)))


def out_degree(graph, node: int) -> int:
    return sum(1 for d in graph.successors(node) if d != node)


def in_degree(graph, node: int) -> int:
    return sum(1 for s in graph.predecessors(node) if s != node)


def counted(op: str) -> tuple[int, int]:
    return tuple(gossip.traffic().by_op.get(op, (0, 0)))


def values(numel: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * seed + R)
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


def check(op: str, expected: tuple[int, int], what: str) -> None:
    got = counted(op)
    assert got == expected, \
        f"rank {R} of {N}: {what}: counted (bytes, messages) {got} under {op!r}, expected {expected}"


def check_only(ops: set[str], what: str) -> None:
    """Nothing was counted under any op but ``ops``."""
    others = {op: c for op, c in gossip.traffic().by_op.items() if op not in ops}
    assert not others, f"rank {R}: {what} counted under other ops too: {others}"


def test_starts_from_zero_resets_and_subtracts():
    gossip.reset_traffic()
    zero = gossip.traffic()
    assert (zero.bytes, zero.messages, dict(zero.by_op)) == (0, 0, {}), zero
    gossip.allreduce(values(10))
    first = gossip.traffic()
    gossip.allreduce(values(10))
    second = gossip.traffic()
    one = 2 * (N - 1) * 40 // N
    assert (first.bytes, first.messages) == (one, 2 * (N - 1)), first
    delta = second - first
    assert (delta.bytes, delta.messages) == (one, 2 * (N - 1)), delta
    assert dict(delta.by_op) == ({"allreduce": (one, 2 * (N - 1))} if N > 1 else {}), delta
    assert second.bytes == sum(b for b, _ in second.by_op.values())
    gossip.reset_traffic()
    assert gossip.traffic().bytes == 0


def test_neighbor_allreduce_static():
    graph = gossip.topology()
    degree = out_degree(graph, R)
    shared = gossip.uses_shared_memory()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for numel in (1000, 300_001):  # the larger one is past the default 1 MiB chunk in float32 and float64
            gossip.reset_traffic()
            gossip.neighbor_allreduce(values(numel, dtype))
            nbytes = numel * dtype.itemsize
            if shared:
                check("neighbor_allreduce (shared memory)", (nbytes * degree, degree), f"{numel} {dtype}")
            else:
                many = chunks(numel, dtype.itemsize) if nbytes > chunk_bytes() else 1
                check("neighbor_allreduce", (nbytes * degree, degree * many), f"{numel} {dtype}")
            check_only({"neighbor_allreduce", "neighbor_allreduce (shared memory)"}, "neighbor_allreduce")


def test_neighbor_allreduce_async_counts_when_it_starts():
    degree = out_degree(gossip.topology(), R)
    for numel in (1000, 300_001):
        gossip.reset_traffic()
        handle = gossip.neighbor_allreduce_async(values(numel))
        nbytes = 4 * numel
        many = chunks(numel, 4) if nbytes > chunk_bytes() else 1
        check("neighbor_allreduce", (nbytes * degree, degree * many), f"async {numel}, before wait")
        handle.wait()
        check("neighbor_allreduce", (nbytes * degree, degree * many), f"async {numel}, after wait")


def test_neighbor_allreduce_dynamic_counts_the_scales():
    if N == 1:
        return
    dst, src = (R + 1) % N, (R - 1) % N
    for numel in (999, 300_001):
        gossip.reset_traffic()
        gossip.neighbor_allreduce(values(numel, torch.float64), self_weight=0.5, src_weights={src: 0.5},
                                  dst_weights=[dst])
        nbytes = 8 * numel
        if gossip.uses_shared_memory():  # scales go through the shared row, not a message
            check("neighbor_allreduce (shared memory)", (nbytes, 1), f"dynamic {numel}")
        else:
            check("neighbor_allreduce", (nbytes + 8, chunks(numel, 8) + 1), f"dynamic {numel}")
        gossip.reset_traffic()
        gossip.neighbor_allreduce_async(values(numel), self_weight=0.5, src_weights={src: 0.5},
                                        dst_weights={dst: 1.0}).wait()
        check("neighbor_allreduce", (4 * numel + 8, chunks(numel, 4) + 1), f"dynamic async {numel}")


def test_neighbor_allgather():
    degree = out_degree(gossip.topology(), R)
    for numel in (7, 300_001):
        gossip.reset_traffic()
        gossip.neighbor_allgather(values(numel))
        nbytes = 4 * numel
        many = chunks(numel, 4) if nbytes > chunk_bytes() else 1
        check("neighbor_allgather", (nbytes * degree, degree * many), f"neighbor_allgather {numel}")


def test_allreduce_is_the_ring_model():
    for dtype, wide in ((torch.float32, 4), (torch.float64, 8), (torch.float16, 4), (torch.bfloat16, 4),
                        (torch.int64, 8)):
        numel = 1001
        gossip.reset_traffic()
        gossip.allreduce(values(numel).to(dtype), "sum")
        m = numel * wide  # half types are reduced in float32
        expected = (2 * (N - 1) * m // N, 2 * (N - 1)) if N > 1 else (0, 0)
        check("allreduce", expected, f"allreduce of {numel} {dtype}")
    gossip.reset_traffic()
    gossip.allreduce(values(N * 10))
    total = GROUP.allreduce(gossip.traffic().bytes)
    assert total == 2 * (N - 1) * N * 40, f"the ranks' allreduce bytes sum to {total}, a ring's total is " \
                                          f"{2 * (N - 1) * N * 40}"


def test_broadcast_counts_on_the_root():
    root = N - 1
    gossip.reset_traffic()
    gossip.broadcast(values(333, torch.float64), root=root)
    check("broadcast", ((N - 1) * 333 * 8, N - 1) if R == root else (0, 0), f"broadcast from {root}")
    gossip.reset_traffic()
    torch.manual_seed(R)
    model = torch.nn.Linear(5, 3)
    gossip.broadcast_parameters(model, root=0)
    nbytes = (5 * 3 + 3) * 4  # weight and bias, one fused float32 group
    check("broadcast_parameters", ((N - 1) * nbytes, N - 1) if R == 0 else (0, 0), "broadcast_parameters")


def test_allgather_counts_this_ranks_block():
    gossip.reset_traffic()
    gossip.allgather(torch.ones(R + 1, 3, dtype=torch.float64))
    check("allgather", ((N - 1) * (R + 1) * 3 * 8, N - 1), "allgather of uneven blocks")


def test_hierarchical():
    numel = 1000
    m = 4 * numel
    k, local = gossip.local_size(), gossip.local_rank()
    machines, machine = gossip.machine_size(), gossip.machine_rank()
    gossip.reset_traffic()
    gossip.hierarchical_neighbor_allreduce(values(numel))
    nbytes, messages = (2 * (k - 1) * m // k, 2 * (k - 1)) if k > 1 else (0, 0)  # the machine's allreduce
    if local == 0:
        nbytes, messages = nbytes + (k - 1) * m, messages + (k - 1)  # the leader's broadcast
        if machines > 1:
            degree = out_degree(topologies.exponential_two(machines), machine)
            nbytes, messages = nbytes + degree * m, messages + degree * chunks(numel, 4)
    check("hierarchical_neighbor_allreduce", (nbytes, messages), f"hierarchical on {machines} machines of {k}")
    check_only({"hierarchical_neighbor_allreduce"}, "hierarchical_neighbor_allreduce")


def test_window_put_accumulate_get():
    graph = gossip.topology()
    destinations, sources = out_degree(graph, R), in_degree(graph, R)
    x = values(250, torch.float64)
    window = gossip.Window(x, "traffic")
    try:
        slot = 250 * 8
        gossip.reset_traffic()
        window.put()
        check("window put", ((slot + 8) * destinations, 2 * destinations), "put")
        window.accumulate_async().wait()
        check("window accumulate", ((slot + 8) * destinations, 2 * destinations), "accumulate")
        window.get()
        check("window get", (slot * sources, sources), "get")
    finally:
        window.free()


def test_parameter_server_messages():
    if N < 2:
        return
    numel, updates, workers = 12, 7, N - 1
    parameters = torch.zeros(numel, dtype=torch.float64)
    server = ParameterServer(parameters, server=0)
    gossip.reset_traffic()
    message = numel * 8
    if server.is_server:
        applied = server.serve(lambda w, g, ite, worker: ite + 1, updates)
        # a reply (parameters, index) to every worker at the start and after every update; a 0-byte stop to each
        expected = ((workers + applied) * (message + 8), 2 * (workers + applied) + workers)
    else:
        pushes = 0
        while True:
            indices = server.pull()
            if indices is None:
                break
            server.push(torch.ones(numel, dtype=torch.float64), indices)
            pushes += 1
        expected = (pushes * (8 + message), 2 * pushes)  # (index, gradient) per push; one server: no leave notice
    check("parameter server", expected, "parameter server")
    server.free()


def test_compressed_ops():
    numel = 1000 if chunk_bytes() > 4096 else 9000  # past one chunk when message_chunk_bytes is 4096
    def int8_of(k: int) -> int:  # Int8's wire format: one byte per value, a float32 scale per block of 256
        return k + 4 * math.ceil(k / 256)

    def top_of(k: int) -> int:  # TopK(0.01): int32 index and float32 value per kept element
        return 2 * math.ceil(0.01 * k) * 4

    int8 = int8_of(numel)
    degree = out_degree(gossip.topology(), R)
    # compressed_allreduce: rank b owns block b (sizes differ by at most one element); each other rank's
    # block goes to its owner compressed (in chunks), then this rank's reduced block, compressed, to
    # the n - 1 others (one allgather)
    lengths = [numel // N + (b < numel % N) for b in range(N)]
    for compressor, wire_of in ((gossip.Int8(seed=R), int8_of), (gossip.TopK(0.01), top_of)):
        wire = wire_of(numel)
        sizes = [wire_of(k) for k in lengths]
        others = [s for b, s in enumerate(sizes) if b != R]
        gossip.reset_traffic()
        gossip.compressed_allreduce(values(numel), compressor)
        check("compressed_allreduce", (sum(others) + (N - 1) * sizes[R], sum(chunks(s, 1) for s in others) + N - 1),
              f"compressed_allreduce {compressor}")
        gossip.compressed_neighbor_allreduce(values(numel), compressor)
        many = chunks(wire, 1) if wire > chunk_bytes() else 1
        check("compressed_neighbor_allreduce", (degree * wire, degree * many),
              f"compressed_neighbor_allreduce {compressor}")
        total = gossip.traffic().bytes
        assert compressor.bytes_sent == total, f"rank {R}: the compressor counted {compressor.bytes_sent}, " \
                                               f"the runtime {total}"
    if N > 1:
        gossip.reset_traffic()
        gossip.compressed_neighbor_exchange({(R + 1) % N: values(numel)}, [(R - 1) % N], gossip.Int8(seed=R))
        check("compressed_neighbor_exchange", (int8, chunks(int8, 1)), "compressed_neighbor_exchange")


def test_sum_over_ranks_of_neighbour_bytes_is_the_edges():
    graph = gossip.topology()
    gossip.reset_traffic()
    handle = gossip.neighbor_allreduce_async(values(64))
    handle.wait()
    edges = sum(1 for s, d in graph.edges() if s != d)
    total = GROUP.allreduce(gossip.traffic().bytes)
    assert total == edges * 64 * 4, f"the ranks counted {total} bytes, the graph's {edges} edges carry {edges * 256}"
    np.testing.assert_equal(gossip.traffic().messages, out_degree(graph, R))
