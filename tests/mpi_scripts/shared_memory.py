"""Neighbour averaging through node shared memory: zero-copy tensors, in-place results, staging growth."""

import networkx as nx
import torch
from _common import GROUP, Skip, assert_close, gathered, rank_values

import gossip
import topologies
from gossip.runtime import current

N = GROUP.size
R = GROUP.rank
ENABLED = gossip.settings().shared_memory


def test_shared_memory_is_used_exactly_when_it_can_be():
    assert current().node_memory.usable == (ENABLED and N > 1), f"rank {R}: unexpected shared-memory state"


def test_empty_tensor_and_first_call_allocation():
    """The first shared-memory call of the job is on empty tensors: staging must still exist."""
    gossip.set_topology(topologies.ring(N))
    for shape in ((0,), (2, 0), (1,)):
        x = torch.zeros(shape)
        y = gossip.neighbor_allreduce(x)
        assert y.shape == x.shape, f"rank {R}: shape {tuple(y.shape)} for input {shape}"


def test_shared_tensor_in_place_iterations():
    """x <- W x, ten times, writing the result over the shared input: equals W^10 X."""
    gossip.set_topology(topologies.exponential_two(N))
    w = topologies.mixing_matrix(topologies.exponential_two(N))
    x = gossip.shared_empty(3000, torch.float64)
    x.copy_(rank_values((3000,), torch.float64, seed=5))
    expected = gathered(x)
    location = current().node_memory.locate(x)
    assert (location is not None) == (ENABLED and N > 1), f"rank {R}: shared tensor not found in a window"
    for _ in range(10):
        result = gossip.neighbor_allreduce(x, out=x)
        assert result.data_ptr() == x.data_ptr()
        expected = w @ expected
    assert_close(x, expected[R], torch.float64, "ten in-place steps on a shared tensor")


def test_slice_of_shared_tensor_and_every_dtype():
    gossip.set_topology(topologies.ring(N))
    w = topologies.mixing_matrix(topologies.ring(N))
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        buffer = gossip.shared_empty(4096, dtype)
        buffer.copy_(rank_values((4096,), dtype, seed=7))
        part = buffer[1024:3072]
        y = gossip.neighbor_allreduce(part)
        assert_close(y, w[R] @ gathered(part), dtype, f"slice of a shared {dtype} tensor")


def test_flat_buffer_shared_model():
    torch.manual_seed(R)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    (buffer,) = gossip.FlatBuffer.for_module(model, shared=True)
    before = gathered(buffer.flat)
    buffer.flat.copy_(gossip.neighbor_allreduce(buffer.flat))
    w = topologies.mixing_matrix(gossip.topology())
    assert_close(buffer.flat, w[R] @ before, torch.float32, "shared FlatBuffer of a model")
    first = model[0].weight.detach().reshape(-1)
    assert_close(first, buffer.flat[: first.numel()], torch.float32, "parameters see the averaged buffer")


def test_staging_grows_when_ranks_need_different_sizes():
    """With no edges each rank may use its own size; the staging window must grow collectively."""
    alone = nx.DiGraph()
    alone.add_nodes_from(range(N))
    alone.add_edges_from((i, i) for i in range(N))
    gossip.set_topology(alone)
    for numel in (10, 100_000 * (R + 1), 50, 2_000_000 if R == N - 1 else 7):
        x = rank_values((numel,), torch.float32, seed=numel)
        assert torch.equal(gossip.neighbor_allreduce(x), x), f"rank {R}: identity averaging changed the tensor"
    gossip.set_topology(topologies.fully_connected(N))
    x = rank_values((300_000,), torch.float32, seed=11)
    assert_close(gossip.neighbor_allreduce(x), gathered(x).mean(axis=0), torch.float32, "after growth")


def test_dynamic_push_sum_on_shared_tensor():
    if N == 1:
        raise Skip("needs two ranks")
    x = gossip.shared_empty(500, torch.float64)
    x.copy_(rank_values((500,), torch.float64, seed=13))
    rows = gathered(x)
    dst = (R + 1) % N
    y = gossip.neighbor_allreduce(x, self_weight=0.6, src_weights={(R - 1) % N: 1.0}, dst_weights={dst: 0.4})
    assert_close(y, 0.6 * rows[R] + 0.4 * rows[(R - 1) % N], torch.float64, "push-sum step, shared tensor")

