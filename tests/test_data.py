"""gossip.tools.data: offline datasets, partitions across ranks and the per-rank batch stream (no MPI)."""

import numpy as np
import pytest
import torch

from gossip.tools.data import BatchStream, load_digits, partition, synthetic_classification


def _labels(classes=10, per_class=50):
    return np.repeat(np.arange(classes), per_class)


@pytest.mark.parametrize("alpha", [None, 100.0, 0.5, 0.05])
@pytest.mark.parametrize("parts", [1, 3, 8])
def test_partition_is_disjoint_cover(alpha, parts):
    labels = _labels()
    shards = partition(labels, parts, alpha, seed=1)
    assert len(shards) == parts
    joined = np.concatenate(shards)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(s) >= 1 for s in shards)


def test_partition_is_deterministic_in_seed():
    labels = _labels()
    a, b, c = (partition(labels, 8, 0.3, seed=s) for s in (4, 4, 5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_partition_sizes_differ_by_at_most_one():
    sizes = [len(s) for s in partition(_labels(), 7)]
    assert max(sizes) - min(sizes) <= 1


def _dominant_share(shards, labels):
    """Mean over shards of the fraction of the shard taken by its most common class."""
    return np.mean([np.bincount(labels[s]).max() / len(s) for s in shards])


def test_small_alpha_skews_labels_more():
    labels = _labels(per_class=200)
    skew = [_dominant_share(partition(labels, 8, alpha, seed=0, min_size=10), labels) for alpha in (0.05, 1.0, 1000.0)]
    assert skew[0] > 0.6 > skew[1] > skew[2]
    assert skew[2] < 0.2  # near the uniform 0.1


def test_partition_bad_input():
    with pytest.raises(ValueError, match="alpha must be positive"):
        partition(_labels(), 4, alpha=0.0)
    with pytest.raises(ValueError, match="cannot give 600 parts"):
        partition(_labels(), 600)
    with pytest.raises(ValueError, match="raise alpha or lower min_size"):
        partition(_labels(), 8, alpha=0.01, min_size=60, max_tries=3)


def test_batch_stream_covers_each_epoch_and_resumes():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(10)
    stream = BatchStream(x, y, batch_size=4, seed=3)
    first = torch.cat([stream.next()[1] for _ in range(5)])  # 20 samples: exactly two epochs
    assert stream.epoch == 2 and stream.position == 0
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    stream.batch_size = 3
    stream.next()
    saved = stream.state_dict()
    expected = [stream.next()[1] for _ in range(4)]
    resumed = BatchStream(x, y, batch_size=1, seed=0)
    resumed.load_state_dict(saved)
    assert all(torch.equal(a, resumed.next()[1]) for a in expected)
    with pytest.raises(ValueError, match="batch_size"):
        stream.batch_size = 0


def test_batch_stream_larger_than_shard_wraps():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    xb, yb = BatchStream(x, y, batch_size=7).next()
    assert xb.shape == (7, 2) and sorted(yb.tolist()[:3]) == [0, 1, 2]


def test_digits_split_is_stratified_and_scaled():
    data = load_digits()
    assert data.x_train.shape[1] == 64 and data.x_train.dtype == torch.float32
    assert len(data.x_train) + len(data.x_test) == 1797
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert data.num_classes == 10
    test_share = np.bincount(data.y_test.numpy()) / np.bincount(np.concatenate([data.y_train, data.y_test]))
    assert np.all(np.abs(test_share - 0.2) < 0.02)
    assert load_digits(flat=False).x_test.shape[1:] == (1, 8, 8)
    assert torch.equal(load_digits().x_test, data.x_test)


def test_synthetic_classification_shapes():
    data = synthetic_classification(samples=500, features=12, classes=5, seed=2)
    assert data.x_train.shape[1] == 12 and len(data.x_train) + len(data.x_test) == 500
    assert data.num_classes == 5
    with pytest.raises(ValueError, match="classes"):
        synthetic_classification(samples=5, classes=10)
