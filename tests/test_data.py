"""gossip.tools.data: offline datasets, partitions across ranks and the per-rank batch stream (no MPI)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.tools.data import (
    BatchStream,
    Split,
    TextSplit,
    load_digits,
    load_python_source,
    partition,
    python_source_files,
    synthetic_classification,
)


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


# --- the Python standard library as text ------------------------------------------------------------

def _text(x: torch.Tensor, y: torch.Tensor) -> bytes:
    """The bytes the windows were cut from: each window's x, then the last window's last target."""
    return bytes(x.reshape(-1).tolist() + [int(y[-1, -1])])


def test_python_source_is_split_by_file():
    train, validation = python_source_files()
    assert train and validation and not set(train) & set(validation)
    assert len(set(train)) == len(train) and len(set(validation)) == len(validation)
    assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.15
    assert all(p.suffix == ".py" for p in train + validation)
    assert not any({"site-packages", "test", "tests"} & set(p.parts) for p in train + validation)
    # a file's side depends only on its path and the seed: a larger fraction only moves files to validation
    wider_train, wider_validation = python_source_files(validation_fraction=0.3)
    assert set(validation) < set(wider_validation) and set(wider_train) < set(train)
    assert set(train + validation) == set(wider_train + wider_validation)
    assert set(python_source_files(seed=1)[1]) != set(validation)


def test_python_source_windows_come_from_their_side_of_the_split():
    data = load_python_source(context=32, max_train_chars=50_000, max_val_chars=20_000)
    train, validation = python_source_files()
    for (x, y), files, cap in (((data.x_train, data.y_train), train, 50_000),
                               ((data.x_test, data.y_test), validation, 20_000)):
        whole = b"".join(p.read_bytes() for p in files[:200])  # more than the cap
        assert len(x) == (cap - 1) // 32
        assert _text(x, y) == whole[: len(x) * 32 + 1]


def test_python_source_windows_are_shifted_by_one_and_bytes():
    data = load_python_source(context=16, max_train_chars=10_000, max_val_chars=5_000)
    assert isinstance(data, TextSplit) and isinstance(data, Split)
    assert data.vocab_size == data.num_classes == 256 and data.context == 16
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == 16
        assert int(x.min()) >= 0 and int(x.max()) < 256 and int(y.min()) >= 0 and int(y.max()) < 256
        assert torch.equal(x[:, 1:], y[:, :-1])  # y[t] is the token after x[t]
        assert torch.equal(y[:-1, -1], x[1:, 0])  # consecutive windows continue the text
    assert int((data.x_train == ord("\n")).sum()) > 100  # text, not noise


def test_python_source_is_deterministic_and_seeded():
    a, b = (load_python_source(context=32, max_train_chars=20_000) for _ in range(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    c = load_python_source(context=32, max_train_chars=20_000, seed=1)
    assert not torch.equal(a.x_train, c.x_train)


def test_python_source_reads_only_up_to_its_caps(monkeypatch):
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real(self))
    load_python_source(context=8, max_train_chars=100, max_val_chars=100)
    assert 2 <= len(reads) <= 4  # the first file or two of each side, not the library


def test_python_source_with_partition_and_batch_stream():
    data = load_python_source(context=8, max_train_chars=4_000, max_val_chars=1_000)
    shards = partition(data.y_train, 3)  # iid: only the number of windows matters
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(len(data.y_train)))
    x, y = BatchStream(data.x_train[shards[1]], data.y_train[shards[1]], batch_size=5).next()
    assert x.shape == y.shape == (5, 8) and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="one class label per sample"):
        partition(data.y_train, 3, alpha=0.5)
    with pytest.raises(ValueError, match="context"):
        load_python_source(context=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        python_source_files(validation_fraction=1.0)
