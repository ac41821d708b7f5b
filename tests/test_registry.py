"""The registry on one rank: each entry's hyper-parameters are its constructor's, ``create`` refuses
what an algorithm does not take, the README table lists every algorithm, an outer loop over a base
instance is what ``create`` builds, and every optimizer describes and closes itself."""

from __future__ import annotations

import inspect

import pytest
import torch
from mpi4py import MPI

import algorithms
import gossip
import topologies
from algorithms.registry import KINDS, REQUIRED

NEEDS_TWO_RANKS = {"asgd", "asgdm", "ormo", "ormo-da"}  # a parameter server and at least one worker
REQUIRED_VALUES = {"lr": 0.1, "budget": 200}


@pytest.fixture
def one_rank():
    gossip.init(MPI.COMM_SELF)
    yield
    gossip.shutdown()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
    return torch.nn.functional.cross_entropy(model(x), y)


def _steps(opt, model, steps) -> list[torch.Tensor]:
    out = []
    for k in steps:
        opt.zero_grad()
        _loss(model, k).backward()
        opt.step()
        out.append(opt.x.clone())
    return out


def _required(entry) -> dict:
    return {k: REQUIRED_VALUES[k] for k, v in entry.hyper_parameters.items() if v is REQUIRED}


def test_hyper_parameters_are_the_constructors_keywords():
    assert [s.name for s in algorithms.specs()] == algorithms.available() == sorted(algorithms.available())
    for entry in algorithms.specs():
        signature = list(inspect.signature(entry.cls.__init__).parameters.values())
        assert signature[0].name == "self"
        assert signature[1].name == ("base" if entry.needs_base else "params"), entry.name
        expected = {p.name: p.default for p in signature[2:] if p.name not in entry.fixed}
        if entry.needs_base:
            expected = {"base": "local-sgd", **expected}
        assert entry.hyper_parameters == expected, entry.name
        assert set(entry.fixed) <= {p.name for p in signature}, entry.name
        assert entry.kind in KINDS and entry.summary and entry.paper, entry.name
        assert entry.takes_topology == entry.accepts("topology") == (entry.kind in ("gossip", "asynchronous-gossip",
                                                                                          "outer-optimizer", "wrapper"))
        assert entry.needs_base == (entry.kind == "outer")
        assert entry is algorithms.spec(entry.name)
    assert algorithms.spec("dsgd").fixed["form"] == "atc" and algorithms.spec("dsgd-awc").fixed == {"form": "awc"}
    assert not algorithms.spec("asgd").accepts("momentum") and algorithms.spec("ormo").accepts("momentum")
    with pytest.raises(ValueError, match="unknown algorithm 'nope'; available: adpsgd, asgd"):
        algorithms.spec("nope")


def test_every_keyword_listed_is_accepted_and_the_fixed_ones_are_applied(one_rank):
    for entry in algorithms.specs():
        if entry.name in NEEDS_TWO_RANKS:
            continue
        hyper = {k: v for k, v in entry.hyper_parameters.items() if v is not REQUIRED}
        hyper.update(_required(entry) if not entry.needs_base else {"lr": 0.1})
        opt = algorithms.create(entry.name, _model().parameters(), **hyper)
        for key, value in entry.fixed.items():
            assert getattr(opt, key) == value, (entry.name, key)
        text = opt.describe()
        assert isinstance(text, str) and text and "\n" not in text, (entry.name, text)
        opt.synchronize()
        opt.close()
        opt.close()  # idempotent


def test_create_refuses_unknown_keywords_clearly(one_rank):
    for entry in algorithms.specs():
        if entry.name in NEEDS_TWO_RANKS:
            continue
        base = {"lr": 0.1} if entry.needs_base else _required(entry)
        with pytest.raises(TypeError) as raised:
            algorithms.create(entry.name, _model().parameters(), **base, bogus_keyword=1)
        text = str(raised.value)
        assert entry.name in text and "'bogus_keyword'" in text and "accepts" in text, text
        if not entry.takes_topology and not entry.needs_base:
            with pytest.raises(ValueError, match="does not gossip"):
                algorithms.create(entry.name, _model().parameters(), **base, topology=topologies.ring(1))
            algorithms.create(entry.name, _model().parameters(), **base, topology=None, global_avg_every=None).close()
    with pytest.raises(TypeError, match=r"dmsgd \(the base of slowmo\) got an unknown hyper-parameter 'slow_lrr'"):
        algorithms.create("slowmo", _model().parameters(), base="dmsgd", lr=0.1, slow_lrr=1.0)
    with pytest.raises(ValueError, match="single-level"):
        algorithms.create("bmuf", _model().parameters(), base="mavg", lr=0.1)
    with pytest.raises(ValueError, match="single-level"):
        algorithms.SlowMo(algorithms.create("mavg", _model().parameters(), lr=0.1))


def test_markdown_table_lists_every_algorithm():
    table = algorithms.markdown_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == algorithms.available()
    for entry, row in zip(algorithms.specs(), rows, strict=True):
        assert entry.paper in row and entry.kind in row
        for key in entry.hyper_parameters:
            assert f"`{key}" in row, (entry.name, key)
    assert "`momentum=0.9`" in rows[algorithms.available().index("dmsgd")]


def test_the_readme_table_is_the_registry_s():
    """The README's table is pasted from ``markdown_table()``: it must not drift from the registry."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert algorithms.markdown_table().strip() in readme, \
        'paste python -c "import algorithms; print(algorithms.markdown_table())" into README.md'


@pytest.mark.parametrize(("outer", "base", "hyper"), [
    ("slowmo", "local-sgd", {"period": 3, "slow_lr": 1.5, "slow_momentum": 0.5}),
    ("slowmo", "dmsgd", {"period": 2, "slow_momentum": 0.4, "base_buffers": "average"}),
    ("bmuf", "dsgd-awc", {"period": 3, "slow_momentum": 0.6, "block_nesterov": True, "base_buffers": "reset"}),
])
def test_an_outer_loop_over_a_base_instance_is_what_create_builds(one_rank, outer, base, hyper):
    base_hyper = {"lr": 0.05, **({"momentum": 0.9} if base == "dmsgd" else {})}
    model = _model(1)
    built = algorithms.create(outer, model.parameters(), base=base, **base_hyper, **hyper)
    expected = _steps(built, model, range(7))
    base_entry = algorithms.spec(base)
    model = _model(1)
    inner = base_entry.cls(model.parameters(), **base_entry.fixed, **base_hyper,
                           **({"period": None} if base_entry.accepts("period") else {}))
    by_hand = algorithms.spec(outer).cls(inner, **hyper)
    assert type(by_hand) is type(built) and by_hand.base is inner
    for k, (a, b) in enumerate(zip(_steps(by_hand, model, range(7)), expected, strict=True)):
        assert torch.equal(a, b), f"{outer} over {base}: step {k} differs"
    by_hand.close()
    built.close()


def test_outer_loop_state_round_trips_bitwise(one_rank):
    hyper = {"base": "dmsgd", "lr": 0.05, "momentum": 0.9, "period": 3, "slow_momentum": 0.5}
    model = _model(2)
    opt = algorithms.create("slowmo", model.parameters(), **hyper)
    _steps(opt, model, range(4))  # mid-round
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    continued = _steps(opt, model, range(4, 9))
    fresh_model = _model(3)
    fresh = algorithms.create("slowmo", fresh_model.parameters(), **hyper)
    fresh_model.load_state_dict(saved_model)
    fresh.load_state_dict(saved)
    for k, (a, b) in enumerate(zip(_steps(fresh, fresh_model, range(4, 9)), continued, strict=True)):
        assert torch.equal(a, b), f"resumed step {4 + k} differs"


def test_describe_says_what_is_communicated_and_when(one_rank):
    def describe(name, **hyper):
        opt = algorithms.create(name, _model().parameters(), lr=0.1, **hyper)
        text = opt.describe()
        opt.close()
        return text

    assert describe("local-sgd", period=4) == "the model: an exact average every 4 steps, nothing in between"
    assert describe("pmsgd") == "the gradient: an allreduce every step"
    assert "every 3 steps" in describe("dmsgd", global_avg_every=3)
    assert "overlapped" in describe("dsgd-awc") and "overlapped" not in describe("dsgd")
    assert "twice the model's bytes" in describe("da-dmsgd")
    slowmo = describe("slowmo", period=5)
    assert "every 5 steps" in slowmo and "nothing in between" in slowmo
    assert "neighbour averaging" in describe("slowmo", base="dsgd", period=5)
