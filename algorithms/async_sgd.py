"""Asynchronous SGD with a parameter server (seed 001): ASGD, naive ASGDm, OrMo and OrMo-DA over MPI.

One rank (``server``, default 0) holds the model and applies gradients in arrival order with a
rule of :mod:`algorithms.server_rules`; every other rank is a worker that computes a gradient at
the parameters it last received and exchanges it for the newest ones, never waiting for other
workers (:class:`gossip.parameter_server.ParameterServer`). With n ranks there are K = n − 1
workers. ``server=[0, 1]`` shards the model over several server ranks (K = n − #servers): each
applies the rule to its contiguous shard, with its own iteration count. Use::

    opt = algorithms.create("ormo", model.parameters(), lr=0.05, momentum=0.9)
    if opt.is_server:
        opt.serve(updates=T)                      # returns after T gradients
    else:
        while not opt.stopped:
            opt.zero_grad(); loss(model(x), y).backward(); opt.step()

Weight decay is added to the worker's gradient. The learning rate is read from
``param_groups[0]["lr"]`` at every update on the server (so LR schedulers there take effect).
``opt.rule.staleness`` on the server holds t − ite for every update.
"""

from __future__ import annotations

from algorithms.base import DecentralizedOptimizer, check_rates
from algorithms.server_rules import ASGD, NaiveASGDm, OrMo, OrMoDA
from gossip.parameter_server import ParameterServer
from gossip.schedule import NoCommunication

RULES = {"asgd": ASGD, "asgdm": NaiveASGDm, "ormo": OrMo, "ormo-da": OrMoDA}


class AsynchronousSGD(DecentralizedOptimizer):
    """Parameter-server asynchronous SGD; ``rule`` is ``asgd``, ``asgdm``, ``ormo`` or ``ormo-da``."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, rule: str = "ormo",
                 server: int | list[int] = 0, topology=None) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown server rule {rule!r}; one of {', '.join(RULES)}")
        if topology not in (None, "none"):
            raise ValueError(f"{rule} runs through a parameter server and takes no gossip topology")
        check_rates(lr, momentum if rule != "asgd" else 0.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         schedule=NoCommunication())
        self.server = ParameterServer(self.x, server)
        workers = len(self.server.workers)
        if rule == "asgd":
            self.rule = ASGD(lr)
        elif rule == "asgdm":
            self.rule = NaiveASGDm(lr, momentum)
        else:
            self.rule = RULES[rule](lr, momentum, workers=workers)
        self.ite: list[int] | None = None  # the iteration index (per server) of the parameters a worker holds

    @property
    def is_server(self) -> bool:
        return self.server.is_server

    @property
    def stopped(self) -> bool:
        return self.server.stopped

    def serve(self, updates: int, on_update=None) -> int:
        """Server: apply ``updates`` gradients in arrival order, then stop every worker.
        ``on_update(w, g, ite, worker)``, if given, is called before each update (e.g. to record)."""

        def update(w, g, ite, worker):
            if on_update is not None:
                on_update(w, g, ite, worker)
            self.rule.lr = self.param_groups[0]["lr"]
            return self.rule.apply(w, g, ite)  # w, g: this server's shard

        return self.server.serve(update, updates)

    def _step(self) -> None:
        if self.is_server:
            raise RuntimeError("the server rank serves (opt.serve(updates)); it does not step")
        if self.stopped:
            raise RuntimeError("the parameter server has stopped; check opt.stopped before stepping")
        if self.ite is None:  # the first exchange: (w⁰, 0), equal to the broadcast start
            self.ite = self.server.pull()
        self.server.push(self.gradient(), self.ite)
        self.ite = self.server.pull()
