"""Imports point down: components never import the CLI, recipes, registries, the trainer, accelerate or rich."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rewardtune"
COMPONENTS = ["algorithms", "rewards", "backbones", "nets", "metrics", "data", "score_sde"]
FORBIDDEN = {
    "rewardtune.cli", "rewardtune.api", "rewardtune.recipe", "rewardtune.build", "rewardtune.registry",
    "rewardtune.trainer", "accelerate", "rich", "typer",
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


TOP_LEVEL_BELOW_TRAINER = ["evaluation.py", "image_evaluation.py", "optim.py", "agreement.py", "modes.py", "types.py", "errors.py", "imports.py",
                           "tables.py", "checkpoint.py", "sampling.py", "precision.py", "f_divergences.py"]
ANOMALY_API_LEVEL = ["model.py"]  # anomaly/model.py loads a run (api.load_run); the rest of anomaly/ is a component
BELOW_TRAINER = [p for c in COMPONENTS for p in sorted((PACKAGE / c).glob("*.py"))] + [
    PACKAGE / name for name in TOP_LEVEL_BELOW_TRAINER
] + [p for p in sorted((PACKAGE / "anomaly").glob("*.py")) if p.name not in ANOMALY_API_LEVEL]


@pytest.mark.parametrize("path", BELOW_TRAINER, ids=str)
def test_components_import_only_downwards(path: Path):
    bad = {m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_only_the_cli_prints():
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        printing = [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "print"]
        assert not printing, f"{path.relative_to(PACKAGE)} calls print()"
