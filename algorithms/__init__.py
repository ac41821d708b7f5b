"""Decentralized optimizers in the ``torch.optim`` style, built on :mod:`gossip`.

The synchronous gossip family, periodic averaging and asynchronous methods arrive with their own
issues; this package is where they live (see ``../shared/ALGORITHMS.md`` for the equations).
"""

__all__: list[str] = []
