"""The layering rules in pyproject.toml ([tool.importlinter]) hold, and they are real checks: a forbidden
import added to a copy of the package breaks them, as does a cycle through an import inside a function.
`make lint` runs the same contracts with import-linter's own command."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from helpers import REPO

importlinter = pytest.importorskip("importlinter")


CONTRACTS = (
    "Layers: commands and the loop on top, errors at the bottom",
    "Data, losses and evaluation never import checkpointing",
    "No import cycles, at any depth",
)


def check_contracts(package_parent: Path, capsys) -> dict[str, bool]:
    """{contract name: kept} for the contracts in the repository's pyproject.toml, checked by import-linter's
    own entry point on the acc_clip package found under `package_parent`."""
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()
    sys.path.insert(0, str(package_parent))
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "acc_clip"}
    for name in saved:
        del sys.modules[name]
    try:
        capsys.readouterr()
        lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True, is_debug_mode=True)
        report = capsys.readouterr().out
    finally:
        sys.path.remove(str(package_parent))
        for name in [n for n in sys.modules if n.split(".")[0] == "acc_clip"]:
            del sys.modules[name]
        sys.modules.update(saved)
    kept = {}
    for line in report.splitlines():
        for name in CONTRACTS:
            if line.startswith(name + " "):
                kept[name] = "KEPT" in line.removeprefix(name)
    assert set(kept) == set(CONTRACTS), report
    return kept


@pytest.fixture
def package_copy(tmp_path) -> Path:
    shutil.copytree(REPO / "acc_clip", tmp_path / "acc_clip", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_every_contract_holds_on_the_package(capsys):
    kept = check_contracts(REPO, capsys)
    assert all(kept.values()), kept


def test_a_forbidden_import_inside_a_function_breaks_the_layers(package_copy, capsys):
    """Evaluation may not import checkpointing, not even lazily inside a function."""
    evaluator = package_copy / "acc_clip" / "evaluation" / "retrieval.py"
    evaluator.write_text(evaluator.read_text() + "\n\ndef _load():\n    from acc_clip.checkpoint import manager\n")
    kept = check_contracts(package_copy, capsys)
    assert not kept["Data, losses and evaluation never import checkpointing"]
    assert not kept["Layers: commands and the loop on top, errors at the bottom"]


def test_a_cycle_through_a_function_level_import_breaks_the_contracts(package_copy, capsys):
    files = package_copy / "acc_clip" / "io" / "files.py"
    files.write_text(files.read_text() + "\n\ndef _cycle():\n    from acc_clip.io import sealed\n")
    assert not check_contracts(package_copy, capsys)["No import cycles, at any depth"]


def test_no_module_imports_a_module_that_imports_it_back():
    """Cycles the sibling contract cannot see: a package's __init__ and one of its own modules."""
    import grimp

    sys.path.insert(0, str(REPO))
    try:
        graph = grimp.build_graph("acc_clip", cache_dir=None)
    finally:
        sys.path.remove(str(REPO))
    cycles = [
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.find_shortest_chain(importer=imported, imported=importer) is not None
    ]
    assert cycles == []
