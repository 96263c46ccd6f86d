"""The CLI's layout: one module per command in one table, the library below it never importing
it, and one reading of --model / --shapes for every command that takes them."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from bitnet_compile import cli, models
from bitnet_compile.errors import UserError

PACKAGE = Path(cli.__file__).resolve().parent.parent


@pytest.mark.parametrize("module", list(dict.fromkeys(cli.COMMANDS.values())), ids=lambda m: m.__name__)
def test_every_command_module_adds_exactly_its_commands(module):
    assert callable(module.run)
    sub = argparse.ArgumentParser().add_subparsers()
    module.add(sub)
    assert sorted(sub.choices) == sorted(name for name, m in cli.COMMANDS.items() if m is module)


def _imported(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (``from X import y`` counts X and X.y)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_the_library_does_not_import_the_cli():
    """The CLI sits on top: a module below it (tuning's, say) importing it makes an import cycle."""
    assert cli.__name__ in _imported(PACKAGE / "__main__.py")  # the one importer, and a check that _imported sees it
    below = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "cli" and p.name != "__main__.py"]
    assert PACKAGE / "tuning" / "command.py" in below
    offenders = [str(p.relative_to(PACKAGE)) for p in below if any(n.split(".")[:2] == ["bitnet_compile", "cli"] for n in _imported(p))]
    assert not offenders


def test_request_for_shapes_has_no_output_layer():
    request = models.resolve_request(None, "64x128, 33x20")
    assert (request.name, request.label, request.output_layer) == (None, "shapes 64x128, 33x20", None)
    assert [(lin.n, lin.k) for lin in request.linears] == [(64, 128), (33, 20)]


def test_request_for_a_model_has_its_output_layer():
    request = models.resolve_request("2b-4t")
    assert request.name == request.label == "microsoft/bitnet-b1.58-2B-4T"
    assert request.output_layer == (128256, 2560) and len(request.linears) == 4


def test_request_shapes_win_over_a_default_model():
    assert models.resolve_request("2b-4t", "8x8").output_layer is None
    with pytest.raises(UserError, match="--model"):
        models.resolve_request(None, None)
