"""Decentralized optimizers in the ``torch.optim`` style, built on :mod:`gossip`.

Each optimizer fuses the parameters into one flat buffer and executes, every step, the
communication plan its schedule gives (:mod:`gossip.plan.schedule`). ``create(name, params, **hyper)``
builds one by name; ``available()`` lists the names; ``spec(name)`` and ``specs()`` describe each
entry (class, paper, kind, hyper-parameters read from the constructor). Each module's docstring
states its update equation and cites its paper.
"""

from algorithms.adpsgd import AsynchronousGossipSGD
from algorithms.async_sgd import AsynchronousSGD
from algorithms.awc_dmsgd import AWCDmSGD
from algorithms.base import DecentralizedOptimizer
from algorithms.choco_sgd import ChocoSGD
from algorithms.cr_psgd import CRPSGD, CRPSGDCatalyst, growing_batch_sizes
from algorithms.d2 import D2
from algorithms.da_dmsgd import DADmSGD
from algorithms.decentlam import DecentLaM
from algorithms.diloco import DiLoCo, StreamingDiLoCo
from algorithms.dmsgd import DmSGD
from algorithms.dsgd import DSGD
from algorithms.gradient_tracking import GradientTracking
from algorithms.local_sgd import LocalSGD
from algorithms.pmsgd import PmSGD
from algorithms.qg_dmsgd import QGDmSGD
from algorithms.registry import AlgorithmSpec, available, create, markdown_table, spec, specs
from algorithms.sgp import SGP
from algorithms.slowmo import BMUF, MAVG, OuterMomentum, SlowMo
from algorithms.wrapper import GossipWrapper, GossipWrapperByName

__all__ = ["AWCDmSGD", "AlgorithmSpec", "AsynchronousGossipSGD", "AsynchronousSGD", "BMUF", "CRPSGD", "ChocoSGD",
           "CRPSGDCatalyst", "D2", "DADmSGD", "DSGD", "DecentLaM", "DecentralizedOptimizer", "DiLoCo", "DmSGD",
           "GossipWrapper", "GossipWrapperByName", "GradientTracking", "LocalSGD", "MAVG", "OuterMomentum", "PmSGD",
           "QGDmSGD", "SGP", "SlowMo", "StreamingDiLoCo", "available", "create", "growing_batch_sizes",
           "markdown_table", "spec", "specs"]
