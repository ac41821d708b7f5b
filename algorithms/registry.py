"""The algorithms by name: one :class:`AlgorithmSpec` per registry name is the one source of truth.

An entry names its class, the keywords it fixes (``dsgd`` is ``DSGD`` with ``form="atc"``), a one-line
summary, the paper and the kind of communication. What it accepts is read from the class's
constructor (:attr:`AlgorithmSpec.hyper_parameters`), so :func:`create`, the training script's
options and checks, and the README's table (:func:`markdown_table`) cannot drift from the code.

Outer loops (kind ``"outer"``: SlowMo, BMUF) wrap a base optimizer *instance*;
``create("slowmo", params, base="dsgd", **hyper)`` builds the base here and hands it over. DiLoCo
(kind ``"outer-optimizer"``) builds its own inner and outer ``torch.optim`` optimizers from
``inner=`` and ``outer=`` (names or classes) and averages on ``topology`` (None: exactly).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from algorithms.adpsgd import AsynchronousGossipSGD
from algorithms.async_sgd import AsynchronousSGD
from algorithms.awc_dmsgd import AWCDmSGD
from algorithms.choco_sgd import ChocoSGD
from algorithms.cr_psgd import CRPSGD, CRPSGDCatalyst
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
from algorithms.sgp import SGP
from algorithms.slowmo import BMUF, MAVG, SlowMo
from algorithms.wrapper import GossipWrapperByName

KINDS = {
    "gossip": "neighbour averaging every step (a static graph or a time-varying family)",
    "global": "an allreduce every step: every rank holds the same model",
    "periodic": "local steps, an exact average every few steps",
    "outer": "wraps a base optimizer; an exact average and an outer momentum step every few steps",
    "growing-batch": "an allreduce every step, with batches growing within a sample budget",
    "server": "a parameter server: workers exchange gradients for models, never waiting for each other",
    "asynchronous-gossip": "one-sided pushes to neighbours, never waiting",
    "outer-optimizer": "any torch.optim optimizer for local steps; every few steps an outer optimizer steps on the "
                       "averaged pseudo-gradient (an exact average, or gossip on a topology)",
    "wrapper": "any torch.optim optimizer, with neighbour averaging of the model (after or overlapped with its step), "
               "an allreduce of models or gradients, or one-sided pushes",
}
REQUIRED = inspect.Parameter.empty  # the default of a hyper-parameter that has none (lr, budget)
DEFAULT_BASE = "local-sgd"  # what an outer loop runs between its averages unless told otherwise
# Communication keywords: passed as None to an algorithm that takes none, they mean its own default
# and are dropped (so one call can build any algorithm); any other value is refused.
_COMMUNICATION = ("topology", "global_avg_every")


@dataclass(frozen=True, eq=False)  # one object per name: compared and hashed by identity
class AlgorithmSpec:
    """One registry entry. Written: ``name``, ``cls``, ``fixed``, ``summary``, ``paper``, ``kind``
    (a key of :data:`KINDS`). Derived from ``cls``'s constructor: everything else."""

    name: str
    cls: type
    summary: str  # one line: what it is
    paper: str  # authors, year, venue
    kind: str
    fixed: dict[str, Any] = field(default_factory=dict)  # keywords this entry fixes, e.g. form="atc"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        unknown = set(self.fixed) - set(_constructor_keywords(self.cls))
        if unknown:
            raise ValueError(f"{self.name}: {self.cls.__name__} has no keyword(s) {sorted(unknown)} to fix")

    @property
    def hyper_parameters(self) -> dict[str, Any]:
        """Name -> default (:data:`REQUIRED` when there is none) of every keyword ``create`` passes to
        the constructor: its parameters minus ``params`` and the fixed ones. For an outer loop,
        ``base`` is the registry name of the base optimizer (default ``"local-sgd"``); keywords it
        does not list go to the base."""
        keywords = {k: v for k, v in _constructor_keywords(self.cls).items() if k not in self.fixed}
        return {"base": DEFAULT_BASE, **keywords} if self.needs_base else keywords

    def accepts(self, name: str) -> bool:
        """Whether ``name`` is one of :attr:`hyper_parameters` (for an outer loop: its own, not its base's)."""
        return name in self.hyper_parameters

    @property
    def takes_topology(self) -> bool:
        """Whether it gossips over a topology (a graph, a time-varying family, "hierarchical", ...)."""
        return self.accepts("topology")

    @property
    def needs_base(self) -> bool:
        """Whether it wraps a base optimizer (an outer loop)."""
        return self.kind == "outer"

    @property
    def usable_as_base(self) -> bool:
        """Whether an outer loop may run it between its averages (a single-level, synchronous optimizer)."""
        return bool(self.cls.usable_as_base)


def _constructor_keywords(cls: type) -> dict[str, Any]:
    """Name -> default of the constructor's parameters after ``self`` and the first positional one
    (``params``, or an outer loop's base optimizer)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]
    variadic = [p.name for p in parameters if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if variadic:
        raise TypeError(f"{cls.__name__}.__init__ takes *{variadic[0]}: name every hyper-parameter")
    return {p.name: p.default for p in parameters}


_SPECS = (
    AlgorithmSpec("dsgd", DSGD, "decentralized SGD, adapt-then-combine: a gradient step, then gossip the model",
                  "Lian, Zhang, Zhang, Hsieh, Zhang, Liu, 2017, NeurIPS", "gossip",
                  fixed={"form": "atc", "overlap": False}),
    AlgorithmSpec("dsgd-awc", DSGD, "decentralized SGD, adapt-while-combine: gossip of x^k overlaps forward "
                  "and backward", "Lian, Zhang, Zhang, Hsieh, Zhang, Liu, 2017, NeurIPS", "gossip",
                  fixed={"form": "awc"}),
    AlgorithmSpec("dmsgd", DmSGD, "decentralized SGD with local heavy-ball momentum, adapt-then-combine",
                  "Yuan, Chen, Huang, Zhang, Pan, Xu, Yin, 2021, ICCV (its DmSGD baseline)", "gossip"),
    AlgorithmSpec("decentlam", DecentLaM, "decentralized momentum SGD without the momentum-induced bias",
                  "Yuan, Chen, Huang, Zhang, Pan, Xu, Yin, 2021, ICCV", "gossip"),
    AlgorithmSpec("awc-dmsgd", AWCDmSGD, "decentralized momentum SGD, adapt-while-combine (gossip overlapped); "
                  "share_momentum gossips the momentum too", "Balu, Jiang, Tan, Hegde, Lee, Sarkar, 2021, ICASSP "
                  "(as compared in Yuan et al., 2021, ICCV)", "gossip"),
    AlgorithmSpec("da-dmsgd", DADmSGD, "decentralized momentum SGD gossiping the model and the momentum",
                  "Yu, Jin, Yang, 2019, ICML", "gossip"),
    AlgorithmSpec("qg-dmsgd", QGDmSGD, "decentralized SGD with quasi-global momentum (heavy ball or Nesterov)",
                  "Lin, Karimireddy, Stich, Jaggi, 2021, ICML", "gossip"),
    AlgorithmSpec("d2", D2, "D²: decentralized SGD free of the data-heterogeneity bias (static symmetric W)",
                  "Tang, Lian, Yan, Zhang, Liu, 2018, ICML", "gossip"),
    AlgorithmSpec("gradient-tracking", GradientTracking, "gradient tracking (DIGing): each rank tracks the "
                  "average gradient", "Nedić, Olshevsky, Shi, 2017, SIAM J. Optim.", "gossip"),
    AlgorithmSpec("sgp", SGP, "stochastic gradient push: push-sum gossip SGD for directed graphs",
                  "Assran, Loizou, Ballas, Rabbat, 2019, ICML", "gossip"),
    AlgorithmSpec("choco-sgd", ChocoSGD, "CHOCO-SGD: compressed gossip; neighbours exchange compressed "
                  "differences against public copies of the models (error feedback)",
                  "Koloskova, Stich, Jaggi, 2019, ICML", "gossip"),
    AlgorithmSpec("pmsgd", PmSGD, "parallel momentum SGD over an allreduce of gradients (what DDP does); "
                  "optional LARS", "the allreduce baseline; LARS: You, Gitman, Ginsburg, 2017, arXiv:1708.03888",
                  "global"),
    AlgorithmSpec("local-sgd", LocalSGD, "local SGD / K-step averaging, with post-local SGD's warm-up",
                  "Zhou, Cong, 2018, IJCAI; Stich, 2019, ICLR; Lin, Stich, Patel, Jaggi, 2020, ICLR", "periodic"),
    AlgorithmSpec("mavg", MAVG, "model averaging with a meta momentum step over plain local SGD",
                  "Cong, Liu, 2020, MLHPC workshop at SC", "periodic"),
    AlgorithmSpec("slowmo", SlowMo, "slow momentum: an outer momentum step on the exact average over any base",
                  "Wang, Tantia, Ballas, Rabbat, 2020, ICLR", "outer"),
    AlgorithmSpec("bmuf", BMUF, "blockwise model-update filtering: block momentum on the exact average",
                  "Chen, Huo, 2016, ICASSP", "outer"),
    AlgorithmSpec("diloco", DiLoCo, "DiLoCo: inner AdamW (any torch.optim) steps, an outer Nesterov step on the "
                  "averaged pseudo-gradient every period steps", "Douillard, Feng, Rusu, Chhaparia, Donchev, Kuncoro, "
                  "Ranzato, Szlam, Shen, 2023, arXiv:2311.08105", "outer-optimizer"),
    AlgorithmSpec("streaming-diloco", StreamingDiLoCo, "streaming DiLoCo: fragments synced at staggered steps, "
                  "each average overlapped with delay inner steps and mixed into the local fragment",
                  "Douillard, Donchev, Rush, Kale, Charles, Garrett et al., 2025, arXiv:2501.18512",
                  "outer-optimizer"),
    AlgorithmSpec("cr-psgd", CRPSGD, "parallel SGD with exponentially growing batches",
                  "Yu, Jin, 2019, ICML", "growing-batch"),
    AlgorithmSpec("cr-psgd-catalyst", CRPSGDCatalyst, "CR-PSGD in proximal rounds (general non-convex)",
                  "Yu, Jin, 2019, ICML", "growing-batch"),
    AlgorithmSpec("asgd", AsynchronousSGD, "asynchronous SGD through a parameter server",
                  "the classic asynchronous baseline, as stated by Shi, Yang, Li, 2024, NeurIPS", "server",
                  fixed={"rule": "asgd", "momentum": 0.0}),
    AlgorithmSpec("asgdm", AsynchronousSGD, "asynchronous SGD with naive momentum on the server",
                  "the naive baseline of Shi, Yang, Li, 2024, NeurIPS", "server", fixed={"rule": "asgdm"}),
    AlgorithmSpec("ormo", AsynchronousSGD, "asynchronous SGD with ordered momentum",
                  "Shi, Yang, Li, 2024, NeurIPS", "server", fixed={"rule": "ormo"}),
    AlgorithmSpec("ormo-da", AsynchronousSGD, "ordered momentum with a delay-adaptive step",
                  "Shi, Yang, Li, 2024, NeurIPS", "server", fixed={"rule": "ormo-da"}),
    AlgorithmSpec("gossip-wrapper", GossipWrapperByName, "any torch.optim optimizer (inner: AdamW, Adam, SGD, ...) "
                  "with gossip: neighbour averaging adapt-then-combine or adapt-while-combine, hierarchical, "
                  "parameter or gradient allreduce, one-sided window pushes, every K steps",
                  "Chen, Sayed, 2012, IEEE Trans. Signal Process. (ATC); Ying, Yuan, Hu, Chen, Yin, 2021, "
                  "arXiv:2111.04287 (BlueFog's optimizers)", "wrapper"),
    AlgorithmSpec("adpsgd", AsynchronousGossipSGD, "asynchronous decentralized SGD on one-sided MPI windows",
                  "Lian, Zhang, Zhang, Liu, 2018, ICML", "asynchronous-gossip"),
)
_REGISTRY: dict[str, AlgorithmSpec] = {s.name: s for s in _SPECS}


def available() -> list[str]:
    """The registered algorithm names, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> AlgorithmSpec:
    """The entry called ``name``; ValueError naming the available ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def specs() -> list[AlgorithmSpec]:
    """Every entry, sorted by name."""
    return [_REGISTRY[name] for name in available()]


def _checked(entry: AlgorithmSpec, hyper: dict[str, Any], outer: AlgorithmSpec | None = None) -> dict[str, Any]:
    """``hyper`` without communication keywords set to None that ``entry`` does not take; ValueError
    for a topology given to an algorithm that does not gossip, TypeError for any other unknown keyword."""
    accepted = entry.hyper_parameters
    within = f" (the base of {outer.name})" if outer is not None else ""
    kept = {}
    for key, value in hyper.items():
        if key in accepted:
            kept[key] = value
        elif key in _COMMUNICATION and value is None:
            continue
        elif key in _COMMUNICATION:
            does = "does not gossip" if key == "topology" else "takes no periodic global average"
            raise ValueError(f"{entry.name}{within} {does} ({entry.summary}): drop `{key}`")
        else:
            also = f"; {outer.name} itself accepts: {', '.join(outer.hyper_parameters)}" if outer is not None else ""
            raise TypeError(f"{entry.name}{within} got an unknown hyper-parameter {key!r}; it accepts: "
                            f"{', '.join(accepted)}{also}")
    return kept


def create(name: str, params, **hyper):
    """Build the optimizer called ``name`` over ``params`` (an iterable of tensors or parameter groups).

    ``hyper`` are the keywords of :attr:`AlgorithmSpec.hyper_parameters`; common ones: ``lr``,
    ``momentum``, ``weight_decay``, ``nesterov``, ``topology`` (a ``networkx`` graph, a
    ``topologies`` time-varying family, ``"hierarchical"``, a schedule, or None for the runtime's
    topology), ``global_avg_every`` (H: Gossip-PGA). ``topology=None`` and ``global_avg_every=None``
    are ignored by algorithms that take neither. An unknown keyword raises TypeError naming the
    algorithm and what it accepts.

    An outer loop (``slowmo``, ``bmuf``) runs ``base`` (a registry name, default ``"local-sgd"``):
    the keywords the outer loop accepts go to it, every other one to the base, which is built first
    (a base that averages by itself, ``local-sgd``, gets ``period=None``: the outer loop averages).
    """
    entry = spec(name)
    if not entry.needs_base:
        return entry.cls(params, **entry.fixed, **_checked(entry, hyper))
    base_name = hyper.pop("base", DEFAULT_BASE)
    base_entry = spec(base_name)
    if not base_entry.usable_as_base:
        raise ValueError(f"the base optimizer of {name} must be a single-level algorithm (gossip, global or periodic "
                         f"averaging), not {base_name!r} ({base_entry.kind})")
    outer_hyper = {k: v for k, v in hyper.items() if entry.accepts(k)}
    base_hyper = _checked(base_entry, {k: v for k, v in hyper.items() if k not in outer_hyper},
                          outer=entry)
    if base_entry.accepts("period"):
        base_hyper["period"] = None  # the outer loop does the averaging
    base = base_entry.cls(params, **base_entry.fixed, **base_hyper)
    try:
        return entry.cls(base, **entry.fixed, **outer_hyper)
    except Exception:
        base.close()
        raise


def _default(value: Any) -> str:
    return "required" if value is REQUIRED else repr(value)


def markdown_table() -> str:
    """The README's algorithm table: name, what it is, paper, kind, hyper-parameters with defaults."""
    rows = ["| name | what it is | paper | kind | hyper-parameters (defaults) |", "|---|---|---|---|---|"]
    for entry in specs():
        keywords = ", ".join(f"`{k}={_default(v)}`" if v is not REQUIRED else f"`{k}`"
                             for k, v in entry.hyper_parameters.items())
        if entry.needs_base:
            keywords += "; any other keyword goes to the base"
        rows.append(f"| `{entry.name}` | {entry.summary} | {entry.paper} | {entry.kind} | {keywords} |")
    return "\n".join(rows) + "\n"
