"""gossip.probe() on the running job: the same finite, non-negative model on every rank, the job's
layout, and predictions that grow with the message size."""

import math

from _common import WORLD, expect_error

import gossip

N = WORLD.size


def test_probe_measures_the_links():
    model = gossip.probe(repeats=6)
    assert model.size == N and model.ranks_per_machine == max(WORLD.allgather(gossip.local_size()))
    assert WORLD.allgather(model) == [model] * N  # every rank got rank 0's measurements
    for link in (model.intra, model.inter):
        for value in (link.latency, link.inverse_bandwidth, link.reduce):
            assert math.isfinite(value) and value >= 0, model
    if N > 1:
        assert model.intra.latency + model.intra.inverse_bandwidth * 4e6 > 0  # a 4 MB message takes time
        small, large = model.predict(1e3), model.predict(1e8)
        assert all(large[plan] >= small[plan] for plan in small)
    expect_error(lambda: gossip.probe(small=10, large=5), "0 < small < large")
