"""Data for decentralized training: offline datasets, per-rank partitions and a per-rank batch stream.

Datasets that need no download (compute nodes are often offline):

- ``load_digits()``: scikit-learn's handwritten digits (UCI optdigits test set: 1797 images of 8x8
  pixels, 10 classes), shipped inside scikit-learn (``pip install gossip[examples]``).
- ``load_mnist1d()``: MNIST-1D (Greydanus, "Scaling Down Deep Learning", arXiv 2011.14439, 2020),
  40-feature sequences generated locally by the ``mnist1d`` package from its built-in templates
  (harder than digits; optional).
- ``synthetic_classification()``: Gaussian class clusters of any size (for scaling runs).
- ``load_python_source()``: character-level language modelling on the Python standard library's
  own ``.py`` files (every machine with Python has them), split by file into train and validation.

Each returns ``Split(x_train, y_train, x_test, y_test)`` as float32/int64 tensors, identical on
every rank for the same seed (the text: a :class:`TextSplit` of int64 byte windows).
``partition()`` splits the training indices across ranks, iid or label-skewed with Dirichlet(α)
class proportions (Hsu, Qi, Brown, arXiv 1909.06335, 2019): small α gives each rank a few dominant
classes, the heterogeneity the decentralized analyses call b².
``BatchStream`` then draws one rank's mini-batches from its shard, reshuffling every local epoch;
its batch size may change from one batch to the next. ``ScheduledBatchSampler`` does the same for a
``torch.utils.data.DataLoader``: a batch sampler whose batch t has a size fixed in advance (e.g. the
growing batches of CR-PSGD: Yu and Jin, ICML 2019), so the loader's worker processes stay alive
while the size changes.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


class Split(NamedTuple):
    """Train and test tensors: x as float32 of shape (samples, features...), y as int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        """1 + the largest label in the train or test set."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def _stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> Split:
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test.append(members[: max(1, round(test_fraction * len(members)))])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test)] = True
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    as_y = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    return Split(as_x(x[~test_mask]), as_y(y[~test_mask]), as_x(x[test_mask]), as_y(y[test_mask]))


def load_digits(test_fraction: float = 0.2, seed: int = 0, flat: bool = True) -> Split:
    """scikit-learn's digits: 1797 8x8 images scaled to [0, 1], a stratified train/test split.

    ``flat=True`` gives x of shape (samples, 64); ``flat=False`` gives (samples, 1, 8, 8) for CNNs.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("the digits dataset ships with scikit-learn: pip install 'gossip[examples]' "
                          "(or pip install scikit-learn)") from error
    bunch = sklearn_digits()
    x = bunch.data / 16.0
    if not flat:
        x = x.reshape(-1, 1, 8, 8)
    return _stratified_split(x, bunch.target, test_fraction, seed)


def load_mnist1d(samples: int = 5000, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """MNIST-1D generated offline by the ``mnist1d`` package (``make_dataset``, never its download)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from error
    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = samples, 1.0 - test_fraction, seed
    made = make_dataset(args)
    x = np.concatenate([made["x"], made["x_test"]])
    y = np.concatenate([made["y"], made["y_test"]])
    return _stratified_split(x, y, test_fraction, seed)


def synthetic_classification(samples: int = 10000, features: int = 64, classes: int = 10, separation: float = 1.0,
                             test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Gaussian clusters: class c is N(separation·μ_c, I) with μ_c a random unit-scale centre."""
    if samples < 2 * classes or features < 1 or classes < 2:
        raise ValueError(f"need samples >= 2*classes, features >= 1, classes >= 2; got {samples}, {features}, "
                         f"{classes}")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * separation
    y = rng.integers(0, classes, samples)
    x = centres[y] + rng.standard_normal((samples, features))
    return _stratified_split(x, y, test_fraction, seed)


class TextSplit(Split):
    """A :class:`Split` of token windows for next-token prediction: x and y int64 of shape
    (windows, context), y[:, t] the token after x[:, t] (y is x shifted left by one). The tokens are
    bytes, so the vocabulary is fixed: ids 0..255, none unknown."""

    __slots__ = ()

    @property
    def vocab_size(self) -> int:
        """Token ids run over 0..vocab_size-1 (256: the byte values)."""
        return 256

    @property
    def num_classes(self) -> int:
        """The classes of each next-token prediction: the vocabulary."""
        return self.vocab_size

    @property
    def context(self) -> int:
        """Tokens per window (the model's sequence length)."""
        return int(self.x_train.shape[1])


_NOT_SOURCE = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def python_source_files(validation_fraction: float = 0.1, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """The standard library's ``.py`` files, split by file: (train, validation), each in a seeded order.

    The files are those under ``sysconfig.get_paths()["stdlib"]`` outside installed packages and the
    test suites (directories named site-packages, dist-packages, test, tests, idle_test). A file
    goes to validation when the SHA-256 of ``"{seed}:{relative path}"``, read as a fraction of
    2^64, is below ``validation_fraction``: each file's side depends only on its path and the seed,
    not on which other files exist. Each side is then shuffled by ``numpy.random.default_rng(seed)``
    from its sorted order.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie in (0, 1), got {validation_fraction}")
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in _NOT_SOURCE]
        found += [Path(directory, name).relative_to(root).as_posix() for name in names if name.endswith(".py")]
    if not found:
        raise FileNotFoundError(f"no .py files under the standard library's directory {root}")
    sides: tuple[list[str], list[str]] = ([], [])
    for relative in sorted(found):
        digest = hashlib.sha256(f"{seed}:{relative}".encode()).digest()
        sides[int.from_bytes(digest[:8], "big") < validation_fraction * 2**64].append(relative)
    rng = np.random.default_rng(seed)
    train, validation = ([root / side[k] for k in rng.permutation(len(side))] for side in sides)
    return train, validation


def _read_until(files: list[Path], limit: int) -> bytes:
    """The files' bytes concatenated in order, cut at ``limit`` bytes (files past it are not read)."""
    pieces, total = [], 0
    for path in files:
        if total >= limit:
            break
        piece = path.read_bytes()[: limit - total]
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def _windows(text: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of ``context + 1`` bytes every ``context`` bytes (each byte after the first is one
    target once): x = window[:-1], y = window[1:], int64 of shape (windows, context)."""
    tokens = np.frombuffer(text, dtype=np.uint8)
    count = (len(tokens) - 1) // context
    if count < 1:
        raise ValueError(f"{len(tokens)} bytes of text make no window of {context + 1} tokens")
    windows = np.lib.stride_tricks.sliding_window_view(tokens, context + 1)[::context][:count].astype(np.int64)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return as_tensor(windows[:, :-1]), as_tensor(windows[:, 1:])


def load_python_source(context: int = 128, max_train_chars: int = 2_000_000, max_val_chars: int = 100_000,
                       validation_fraction: float = 0.1, seed: int = 0) -> TextSplit:
    """Byte-level language modelling on the standard library's source, split by file.

    The files of :func:`python_source_files` are read as bytes (UTF-8, nearly all ASCII, so a byte
    is nearly always a character) and concatenated in their seeded order, the train side up to
    ``max_train_chars`` bytes and the validation side up to ``max_val_chars`` (the last file cut
    there, later files not read), then cut into windows (:class:`TextSplit`). No file contributes
    to both sides, so the validation loss measures generalisation to unseen modules.

    The text is the same on every rank and on every machine with the same Python release and the
    same set of standard-library files; another release (its files change), or a distribution that
    ships parts of the library as separate packages (e.g. Debian's tkinter or lib2to3), gives other
    text. ``seed`` chooses the split and the order.
    """
    if context < 1 or max_train_chars < context + 1 or max_val_chars < context + 1:
        raise ValueError(f"need context >= 1 and at least context + 1 = {context + 1} characters on each side, "
                         f"got context={context}, max_train_chars={max_train_chars}, max_val_chars={max_val_chars}")
    train_files, validation_files = python_source_files(validation_fraction, seed)
    x_train, y_train = _windows(_read_until(train_files, max_train_chars), context)
    x_val, y_val = _windows(_read_until(validation_files, max_val_chars), context)
    return TextSplit(x_train, y_train, x_val, y_val)


def partition(labels: np.ndarray | torch.Tensor, parts: int, alpha: float | None = None, seed: int = 0,
              min_size: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Split sample indices into ``parts`` disjoint shards covering every sample.

    ``alpha=None`` (or inf): iid, equal sizes up to one (only ``len(labels)`` is read, so the
    (windows, context) targets of a :class:`TextSplit` do). Otherwise for each class the shares of the
    parts are drawn from Dirichlet(α, ..., α) and the class's samples cut accordingly; the draw is
    repeated until every part has at least ``min_size`` samples. Deterministic in ``seed``.
    """
    labels = np.asarray(labels)
    if alpha is not None and not np.isinf(alpha) and labels.ndim != 1:
        raise ValueError(f"a Dirichlet(alpha) split needs one class label per sample (1-D), got shape {labels.shape}")
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if parts * min_size > len(labels):
        raise ValueError(f"cannot give {parts} parts {min_size} samples each from {len(labels)} samples")
    rng = np.random.default_rng(seed)
    if alpha is None or np.isinf(alpha):
        return [np.sort(s) for s in np.array_split(rng.permutation(len(labels)), parts)]
    if alpha <= 0:
        raise ValueError(f"the Dirichlet concentration alpha must be positive, got {alpha}")
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(parts, alpha)))[:-1] * len(members)).astype(int)
            for shard, piece in zip(shards, np.split(members, cuts), strict=True):
                shard.append(piece)
        result = [np.sort(np.concatenate(s)) for s in shards]
        if min(len(s) for s in result) >= min_size:
            return result
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every one of {parts} parts "
                     f"{min_size} samples; raise alpha or lower min_size")


def _permutation(samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(samples, generator=generator)


class BatchStream:
    """One rank's endless mini-batches from its shard: reshuffled every local epoch, resumable.

    ``next()`` returns ``(x, y)`` of ``batch_size`` samples (the last batch of an epoch is taken
    whole from the next permutation, so every batch has the same size and every sample is used once
    per epoch up to the wrap). ``batch_size`` may be changed between calls. ``state_dict()`` holds
    (epoch, position), enough to continue identically after ``load_state_dict``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y must be non-empty with equal lengths, got {len(x)} and {len(y)}")
        self.x, self.y, self.seed = x, y, seed
        self.batch_size = batch_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    @property
    def batch_size(self) -> int:
        """Samples in the next batch (settable, >= 1)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"batch_size must be >= 1, got {value}")
        self._batch_size = value

    def _permutation(self, epoch: int) -> torch.Tensor:
        return _permutation(len(self.x), self.seed, epoch)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)``: ``batch_size`` rows of the shard's x and y."""
        taken, needed = [], self._batch_size
        while needed:
            piece = self._order[self.position: self.position + needed]
            taken.append(piece)
            needed -= len(piece)
            self.position += len(piece)
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        index = taken[0] if len(taken) == 1 else torch.cat(taken)
        return self.x[index], self.y[index]

    def state_dict(self) -> dict[str, int]:
        """Epoch, position, seed and batch size: what :meth:`load_state_dict` needs to continue identically."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self._batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.seed, self.batch_size = int(state["seed"]), int(state["batch_size"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


class ScheduledBatchSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` batch sampler whose t-th batch has ``batch_sizes[t]`` indices.

    Indices run through a fresh permutation of ``range(samples)`` every epoch (as
    :class:`BatchStream`: a batch that crosses an epoch's end continues in the next permutation,
    so every batch has its full size even when it is larger than the data). Pass it as
    ``DataLoader(dataset, batch_sampler=sampler, num_workers=k, persistent_workers=True)``: the
    sizes are fixed in advance, so prefetching workers never see a wrong size and are never
    re-created. ``start_step`` resumes at batch ``start_step`` with the same indices an
    uninterrupted run would draw.
    """

    def __init__(self, samples: int, batch_sizes, seed: int = 0, start_step: int = 0) -> None:
        self.batch_sizes = [int(b) for b in batch_sizes]
        if samples < 1:
            raise ValueError(f"need at least one sample, got {samples}")
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"every batch size must be >= 1, got {min(self.batch_sizes)}")
        if not 0 <= start_step <= len(self.batch_sizes):
            raise ValueError(f"start_step {start_step} is outside 0..{len(self.batch_sizes)}")
        self.samples, self.seed, self.start_step = samples, seed, start_step

    def __len__(self) -> int:
        return len(self.batch_sizes) - self.start_step

    def __iter__(self):
        skipped = sum(self.batch_sizes[:self.start_step])
        epoch, position = divmod(skipped, self.samples)
        order = _permutation(self.samples, self.seed, epoch)
        for size in self.batch_sizes[self.start_step:]:
            taken = []
            while size:
                piece = order[position: position + size]
                taken.append(piece)
                size -= len(piece)
                position += len(piece)
                if position == self.samples:
                    epoch, position = epoch + 1, 0
                    order = _permutation(self.samples, self.seed, epoch)
            yield torch.cat(taken).tolist()
