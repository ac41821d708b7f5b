"""The package's shape, checked from the source (no imports run): layers only import downwards,
``gossip``'s subpackages form no import circle, and shipped text carries no development notes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("topologies", "gossip", "algorithms")

# What each part may import from this project (itself always).
ALLOWED = {
    "topologies": set(),
    "gossip.errors": set(),
    "gossip.transport": {"gossip.errors"},
    "gossip.settings": {"gossip.transport"},
    "gossip.runtime": {"gossip.errors", "gossip.settings", "gossip.transport", "topologies"},
    "gossip.ops": {"gossip.errors", "gossip.runtime", "gossip.transport", "topologies"},
    "gossip.plan": {"gossip.errors", "gossip.runtime", "gossip.transport", "gossip.ops", "topologies"},
    "gossip.tools": {"gossip.errors", "gossip.runtime", "gossip.transport", "gossip.ops", "gossip.plan", "topologies"},
    "gossip": {"gossip.errors", "gossip.settings", "gossip.runtime", "gossip.transport", "gossip.ops", "gossip.plan",
               "gossip.tools"},
    "algorithms": {"gossip", "gossip.errors", "gossip.settings", "gossip.runtime", "gossip.transport", "gossip.ops",
                   "gossip.plan", "gossip.tools", "topologies"},
    # above algorithms, like an example: BlueFog's API over the runtime and the optimizer wrapper
    "gossip.compat": {"gossip", "gossip.errors", "gossip.settings", "gossip.runtime", "gossip.transport", "gossip.ops",
                      "gossip.plan", "gossip.tools", "topologies", "algorithms"},
}


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _project_imports(path: Path) -> set[str]:
    """Modules of this project that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            if base.split(".")[0] in PACKAGES:  # "from a.b import c": the module a.b.c if there is one, else a.b
                found |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _part(module: str) -> str:
    """The layer a module belongs to (the most specific key of :data:`ALLOWED`)."""
    candidates = [key for key in ALLOWED if module == key or module.startswith(key + ".")]
    return max(candidates, key=len)


def test_every_import_points_down_the_layers():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        mine = _part(name)
        for imported in _project_imports(path):
            if imported not in modules:  # a name imported from a module, not a module
                continue
            theirs = _part(imported)
            if theirs != mine and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} imports {imported} ({mine} may import only {sorted(ALLOWED[mine])})")
    assert not wrong, "\n".join(wrong)


def test_nothing_below_imports_the_compat_layer():
    """``gossip.compat`` sits above ``algorithms``: no other module of the three packages imports it
    (``gossip/__init__.py`` included: users import ``gossip.compat.bluefog`` themselves)."""
    modules = _modules()
    wrong = [f"{name} imports {imported}" for name, path in modules.items() if _part(name) != "gossip.compat"
             for imported in _project_imports(path) if imported == "gossip.compat" or
             imported.startswith("gossip.compat.")]
    assert not wrong, "\n".join(wrong)


def test_the_gossip_package_has_no_import_circle():
    modules = _modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        if name.startswith("gossip.") and not name.endswith("__init__"):
            for imported in _project_imports(path):
                if imported in modules and imported.startswith("gossip.") and imported != name \
                        and not name.startswith(imported + "."):  # a subpackage's own __init__ is its parent
                    graph.add_edge(name, imported)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles: {cycles[:5]}"


SHIPPED = [*(REPO / p for p in ("README.md", "setup.cfg", "pyproject.toml")),
           *(p for d in ("gossip", "algorithms", "topologies", "benchmarks", "mpirun_examples")
             for p in (REPO / d).rglob("*") if p.suffix in (".py", ".md", ".sh", ".sbatch"))]
NOTES = re.compile(r"\bseeds?\s+\d{3}\b|\[confirm\]|could not be read|\.\./shared|ALGORITHMS\.md", re.IGNORECASE)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_text_cites_papers_not_development_notes(path: Path):
    hits = [f"{path.relative_to(REPO)}:{k}: {line.strip()}" for k, line in enumerate(path.read_text().splitlines(), 1)
            if NOTES.search(line)]
    assert not hits, "\n".join(hits)


def test_gossip_sets_the_mpi_transport_defaults_before_mpi_starts(tmp_path):
    """``import gossip`` raises Open MPI's TCP eager limit (gossip.transport.mpi_settings) before
    anything imports mpi4py's MPI, which starts MPI and reads it: record the variable at that import."""
    import os
    import subprocess
    import sys

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.abc, os, sys\n"
        "class Spy(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'mpi4py.MPI' and 'seen' not in os.environ:\n"
        "            os.environ['seen'] = os.environ.get('OMPI_MCA_btl_tcp_eager_limit', 'unset')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Spy())\n"
        "import gossip\n"
        "print(os.environ['seen'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMPI_MCA_btl_tcp_eager_limit", "seen")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    from gossip.transport.mpi_settings import defaults

    assert done.stdout.split() == [defaults()["OMPI_MCA_btl_tcp_eager_limit"]], done.stdout
