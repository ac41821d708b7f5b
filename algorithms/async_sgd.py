"""Asynchronous SGD with a parameter server: ASGD, naive ASGDm, OrMo and OrMo-DA over MPI.

Shi, Yang, Li, "Ordered Momentum for Asynchronous SGD", NeurIPS 2024 (OrMo, and ASGD and naive
ASGDm as its baselines). The server holds w and its iteration count t; a worker that holds the
parameters of iteration ite sends

    g = ∇F(w^{ite}; ξ) + wd·w^{ite}

and the server, the moment it arrives, applies w ← rule(w, g, ite) (ASGD: w ← w − η g; the
momentum rules in :mod:`algorithms.server_rules`) and replies to that worker alone with (w, t + 1).

One rank (``server``, default 0) holds the model and applies gradients in arrival order with a
rule of :mod:`algorithms.server_rules`; every other rank is a worker that computes a gradient at
the parameters it last received and exchanges it for the newest ones, never waiting for other
workers (:class:`gossip.ops.parameter_server.ParameterServer`). With n ranks there are K = n − 1
workers. ``server=[0, 1]`` shards the model over several server ranks (K = n − #servers): each
applies the rule to its contiguous shard, with its own iteration count. Use::

    opt = algorithms.create("ormo", model.parameters(), lr=0.05, momentum=0.9)
    if opt.is_server:
        opt.serve(updates=T)                      # returns after T gradients
    else:
        while not opt.stopped:
            opt.zero_grad(); loss(model(x), y).backward(); opt.step()

In fault-tolerant mode (``gossip.init(fault_tolerant=True)`` under ``gossiprun --fault-tolerant``)
a dead worker does not stop the training: the server stops expecting it, serves the others to
the end, and its rule goes on with the live workers' K (``rule.set_workers``: OrMo's groups and
OrMo-DA's step use it); ``serve(on_failure=...)`` is told. Whatever the dead worker still had in
flight is dropped, and its data is no longer seen. A dead server ends the training: ``step()``
raises :class:`gossip.RankFailure` naming it on every worker
(:mod:`gossip.ops.parameter_server`). At the end every live rank calls ``close()``, an agreement
of the survivors; if a rank failed (``opt.server.had_failures``, the same on all of them),
:func:`gossip.recover` on every survivor makes collectives and ``gossip.shutdown`` work again. A
recovery closes the parameter server: the optimizer cannot step after it.

Weight decay is added to the worker's gradient. The learning rate is read from
``param_groups[0]["lr"]`` at every update on the server (so LR schedulers there take effect).
``opt.rule.staleness`` on the server holds t − ite for every update.
"""

from __future__ import annotations

from algorithms.base import DecentralizedOptimizer, check_rates
from algorithms.server_rules import ASGD, NaiveASGDm, OrMo, OrMoDA
from gossip.ops.parameter_server import ParameterServer
from gossip.plan.schedule import NoCommunication

RULES = {"asgd": ASGD, "asgdm": NaiveASGDm, "ormo": OrMo, "ormo-da": OrMoDA}


class AsynchronousSGD(DecentralizedOptimizer):
    """Parameter-server asynchronous SGD; ``rule`` is ``asgd``, ``asgdm``, ``ormo`` or ``ormo-da``."""

    usable_as_base = False  # the server rank does not step

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, rule: str = "ormo",
                 server: int | list[int] = 0) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown server rule {rule!r}; one of {', '.join(RULES)}")
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
        self.rule_name = rule
        self.ite: list[int] | None = None  # the iteration index (per server) of the parameters a worker holds

    @property
    def is_server(self) -> bool:
        return self.server.is_server

    @property
    def stopped(self) -> bool:
        return self.server.stopped

    def describe(self) -> str:
        servers = self.server.servers
        where = f"rank {servers[0]}" if len(servers) == 1 else f"ranks {servers} (the model sharded)"
        return (f"{self.rule_name} on a parameter server at {where}: each of {len(self.server.workers)} workers sends "
                "its gradient after every step and waits only for its own reply, the newest model")

    def close(self) -> None:
        """Collective: free the parameter server's communicator (after :meth:`serve` has returned on
        the server and every worker has stopped). Idempotent. In fault-tolerant mode every live rank
        calls it, also a worker whose step raised :class:`gossip.RankFailure`: it is an agreement of
        the survivors, after which ``self.server.had_failures`` says on each of them alike whether a
        rank failed (then :func:`gossip.recover`, on every survivor, makes collectives work again)."""
        super().close()
        self.server.free()

    def _recover_state(self, leader: int) -> None:
        """After :func:`gossip.recover` (which closed the parameter server) the optimizer cannot step."""
        self.unusable = (f"{self.rule_name} cannot continue after gossip.recover(): the recovery closed its parameter "
                         "server; create the optimizer again on the survivors")

    def serve(self, updates: int, on_update=None, on_failure=None) -> int:
        """Server: apply ``updates`` gradients in arrival order, then stop every worker.
        ``on_update(w, g, ite, worker)``, if given, is called before each update (e.g. to record);
        ``on_failure(worker, applied)`` when a worker is found dead after ``applied`` updates
        (fault-tolerant mode), once the rule has been told the number of live workers."""

        def update(w, g, ite, worker):
            if on_update is not None:
                on_update(w, g, ite, worker)
            self.rule.lr = self.param_groups[0]["lr"]
            return self.rule.apply(w, g, ite)  # w, g: this server's shard

        def failed(worker, applied):
            self.rule.set_workers(max(1, len(self.server.workers) - len(self.server.failed)))
            if on_failure is not None:
                on_failure(worker, applied)

        return self.server.serve(update, updates, on_failure=failed)

    def _step(self) -> None:
        if self.is_server:
            raise RuntimeError("the server rank serves (opt.serve(updates)); it does not step")
        if self.stopped:
            raise RuntimeError("the parameter server has stopped; check opt.stopped before stepping")
        if self.ite is None:  # the first exchange: (w⁰, 0), equal to the broadcast start
            self.ite = self.server.pull()
        self.server.push(self.gradient(), self.ite)
        self.ite = self.server.pull()
