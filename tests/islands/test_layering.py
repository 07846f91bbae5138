"""The process runtime stands on the core alone: no module of `koinon.islands` imports the
simulation runner (`koinon.experiment`); the config dataclasses come from `koinon.config`."""

import ast
from pathlib import Path

import koinon.islands

ISLANDS = Path(koinon.islands.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_islands_module_imports_the_experiment_runner():
    files = sorted(ISLANDS.glob("*.py"))
    assert {f.name for f in files} >= {"worker.py", "torchrun.py", "dist.py", "engine.py"}
    offenders = {f.name: sorted(m for m in imported_modules(f) if m.startswith("koinon.experiment"))
                 for f in files}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
