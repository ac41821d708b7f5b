"""mpirun_examples/language_model.py: the character-level transformer on the standard library's source
(one process, no MPI): causal, seeded, the loss at initialisation, and learning that uses the context."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.tools.data import load_python_source

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mpirun_examples"))
from language_model import CharTransformer, bits_per_character, lm_loss, validation_loss  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def text():
    return load_python_source(context=64, max_train_chars=300_000, max_val_chars=50_000)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the tokens' empirical distribution: no predictor that ignores the context
    does better on these tokens."""
    p = np.bincount(tokens.reshape(-1).numpy(), minlength=256) / tokens.numel()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_model_is_causal():
    model = CharTransformer(256, 32, width=32, layers=2, heads=4, seed=0).eval()
    x = torch.randint(256, (3, 32), generator=torch.Generator().manual_seed(1))
    before = model(x)
    assert before.shape == (3, 32, 256)
    for t in (0, 7, 31):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % 256
        after = model(changed)
        assert torch.allclose(after[:, :t], before[:, :t], rtol=0, atol=1e-6), f"position < {t} saw token {t}"
        assert (after[:, t:] - before[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-4  # and reaches every later one


def test_initial_loss_is_about_log_vocabulary(text):
    model = CharTransformer(text.vocab_size, text.context, seed=0)
    loss = validation_loss(model, text.x_test, text.y_test)
    assert abs(loss - math.log(256)) < 0.1
    assert bits_per_character(loss) == pytest.approx(loss / math.log(2))
    assert bits_per_character(math.log(2)) == pytest.approx(1.0)


def test_seeded_initialisation_and_deterministic_training(text, one_thread):
    def train(seed: int, steps: int = 15) -> tuple[dict, list[float]]:
        model = CharTransformer(256, 64, width=32, layers=1, heads=2, dropout=0.1, seed=seed)
        opt, losses = torch.optim.AdamW(model.parameters(), lr=1e-3), []
        torch.manual_seed(0)  # dropout's masks
        for k in range(steps):
            loss = lm_loss(model, text.x_train[8 * k: 8 * k + 8], text.y_train[8 * k: 8 * k + 8])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return model.state_dict(), losses

    first, again, other = (CharTransformer(256, 64, width=32, layers=1, heads=2, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(first.token.weight, other.token.weight)
    assert first.head.weight.data_ptr() != first.token.weight.data_ptr()  # untied
    (state_a, losses_a), (state_b, losses_b) = train(5), train(5)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_validation_loss_batches_and_mode(text):
    model = CharTransformer(256, 64, width=32, layers=1, heads=2, dropout=0.5, seed=0)
    x, y = text.x_test[:50], text.y_test[:50]
    whole = validation_loss(model, x, y, batch=50)
    assert model.training  # restored
    assert validation_loss(model, x, y, batch=7) == pytest.approx(whole, rel=1e-5)
    with torch.no_grad():
        assert float(lm_loss(model.eval(), x, y)) == pytest.approx(whole, rel=1e-5)


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of heads"):
        CharTransformer(256, 16, width=30, heads=4)
    with pytest.raises(ValueError, match="longer than the context"):
        CharTransformer(256, 16, width=32)(torch.zeros(1, 17, dtype=torch.int64))


def test_training_uses_the_context(text, one_thread):
    """300 AdamW steps of 16 windows bring the validation loss at least 0.5 nats below the unigram
    entropy of the validation text, which bounds every predictor that ignores the context."""
    model = CharTransformer(text.vocab_size, text.context, width=64, layers=2, heads=4, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for _ in range(300):
        batch = torch.randint(len(text.x_train), (16,), generator=generator)
        loss = lm_loss(model, text.x_train[batch], text.y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - began
    unigram, validation = _unigram_entropy(text.y_test), validation_loss(model, text.x_test, text.y_test)
    print(f"300 steps in {seconds:.1f} s; validation {validation:.3f} nats ({bits_per_character(validation):.2f} "
          f"bits/char), unigram entropy {unigram:.3f}")
    assert validation < unigram - 0.5
