"""What the convergence benchmarks share: the small MLP, accuracy, and the end-of-run measurements
of a decentralized optimizer (the averaged model's accuracy and loss, the ranks' own accuracy,
consensus distance)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gossip
from gossip.tools import metrics
from gossip.tools.data import Split


def mlp(features: int, hidden: int, classes: int) -> torch.nn.Module:
    """Two hidden ReLU layers of width ``hidden``: input (batch, features), output logits (batch, classes)."""
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction (0 to 1) of the samples ``x`` (batch, features) whose arg-max logit is the label ``y``."""
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def final_measurements(model: torch.nn.Module, opt, data: Split) -> dict:
    """Collective. Leaves every rank's model at the exact average of the ranks' models and returns
    the test accuracy and training loss of that average, the mean over ranks of their own models'
    test accuracy, and the consensus distance (1/n) Σ_i ‖x_i − x̄‖²."""
    opt.synchronize()
    own_accuracy = accuracy(model, data.x_test, data.y_test)
    mean = gossip.allreduce(opt.x.detach(), "mean")
    consensus = metrics.consensus_distance(opt.x.detach(), mean)
    opt.x.copy_(mean)
    return {"averaged_accuracy": accuracy(model, data.x_test, data.y_test),
            "train_loss": float(F.cross_entropy(model(data.x_train), data.y_train)),
            "rank_accuracy": metrics.mean_over_ranks(own_accuracy),
            "consensus_distance": consensus}
