"""Compatibility layers: other libraries' APIs on top of :mod:`gossip` and :mod:`algorithms`.

* :mod:`gossip.compat.bluefog`: BlueFog's ``bluefog.torch`` API (Ying et al., "BlueFog: Make
  decentralized algorithms practical for optimization and deep learning", arXiv:2111.04287, 2021),
  so that a BlueFog script runs by changing its import to ``import gossip.compat.bluefog as bf``;
  ``gossip.compat.bluefog.topology_util`` stands for ``bluefog.common.topology_util``.

Nothing in :mod:`gossip` imports this package: it sits above :mod:`algorithms`, like an example.
"""
