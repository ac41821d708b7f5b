"""``algorithms.create(name, params, **hyper)``: every optimizer by its registry name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from algorithms.adpsgd import AsynchronousGossipSGD
from algorithms.async_sgd import AsynchronousSGD
from algorithms.awc_dmsgd import AWCDmSGD
from algorithms.cr_psgd import CRPSGD, CRPSGDCatalyst
from algorithms.d2 import D2
from algorithms.da_dmsgd import DADmSGD
from algorithms.decentlam import DecentLaM
from algorithms.dmsgd import DmSGD
from algorithms.dsgd import DSGD
from algorithms.gradient_tracking import GradientTracking
from algorithms.local_sgd import LocalSGD
from algorithms.pmsgd import PmSGD
from algorithms.qg_dmsgd import QGDmSGD
from algorithms.sgp import SGP
from algorithms.slowmo import BMUF, MAVG, SlowMo

_REGISTRY: dict[str, Callable] = {
    "dsgd": partial(DSGD, form="atc"),
    "dsgd-awc": partial(DSGD, form="awc"),
    "dmsgd": DmSGD,
    "decentlam": DecentLaM,
    "pmsgd": PmSGD,
    "awc-dmsgd": AWCDmSGD,
    "da-dmsgd": DADmSGD,
    "qg-dmsgd": QGDmSGD,
    "d2": D2,
    "gradient-tracking": GradientTracking,
    "sgp": SGP,
    "local-sgd": LocalSGD,
    "mavg": MAVG,
    "bmuf": BMUF,
    "slowmo": SlowMo,
    "cr-psgd": CRPSGD,
    "cr-psgd-catalyst": CRPSGDCatalyst,
    "asgd": partial(AsynchronousSGD, rule="asgd"),
    "asgdm": partial(AsynchronousSGD, rule="asgdm"),
    "ormo": partial(AsynchronousSGD, rule="ormo"),
    "ormo-da": partial(AsynchronousSGD, rule="ormo-da"),
    "adpsgd": AsynchronousGossipSGD,
}
# not usable as another algorithm's base
OUTER = ("mavg", "bmuf", "slowmo", "cr-psgd", "cr-psgd-catalyst", "asgd", "asgdm", "ormo", "ormo-da", "adpsgd")


def available() -> list[str]:
    """The registered algorithm names."""
    return sorted(_REGISTRY)


def create(name: str, params, **hyper):
    """Build the optimizer called ``name`` over ``params`` with hyper-parameters ``hyper``.

    Common names: ``lr``, ``momentum``, ``weight_decay``, ``nesterov``, ``global_avg_every`` (H),
    ``topology`` (a static graph, a time-varying family, or None for the runtime's topology).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name](params, **hyper)
