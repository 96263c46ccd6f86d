"""The structure the code must keep: no import cycles (function-level imports included), the
layer contracts of pyproject.toml (lint-imports), and a plain compile that never imports the
tuner."""

from __future__ import annotations

import shutil
import subprocess
import sys

import grimp
import pytest
from conftest import REPO

PACKAGES = ("bitnet_compile", "bitnet_runtime")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)


def test_no_import_cycles():
    assert import_cycles(_graph()) == []


def test_a_reintroduced_cycle_is_found():
    """The check itself can fail: the old cycle schedule_db -> records -> schedule_db."""
    graph = _graph()
    graph.add_import(importer="bitnet_compile.records", imported="bitnet_compile.schedule_db")
    assert ["bitnet_compile.records", "bitnet_compile.schedule_db"] in import_cycles(graph)


def test_layer_contracts_hold():
    lint = shutil.which("lint-imports") or str(REPO / ".venv" / "bin" / "lint-imports")
    done = subprocess.run([lint], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("family", ["lut", "dot2"])
def test_a_plain_compile_never_imports_the_tuner(tmp_path, family):
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from bitnet_compile import artifact\n"
        "from bitnet_compile.families import FAMILIES\n"
        "from bitnet_compile.models import Linear\n"
        "from bitnet_compile.target import parse_target\n"
        "target = parse_target('x86-avx512-vnni' if FAMILIES[sys.argv[2]].name == 'dot2' else 'x86-avx2')\n"
        "artifact.build(target, [Linear('a', 64, 96)], Path(sys.argv[1]), FAMILIES[sys.argv[2]])\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('bitnet_compile.tuning') or m == 'optuna')\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "art"), family], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "art" / "manifest.json").is_file()


def test_the_tree_is_ruff_clean():
    """pyproject.toml's ruff configuration holds for the whole tree: lint and format."""
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([ruff, *args], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
