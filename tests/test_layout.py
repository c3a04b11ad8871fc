"""Imports flow one way: flows -> tasks -> lens, warehouse; lens has no Prefect/DuckDB; warehouse no torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "loralens"

FORBIDDEN = {
    "lens": ("prefect", "duckdb", "loralens.warehouse", "loralens.tasks", "loralens.flows"),
    "warehouse": ("torch", "prefect", "transformers", "deepspeed", "peft", "loralens.lens", "loralens.tasks",
                  "loralens.flows"),
    "tasks": ("loralens.flows",),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules in loralens/{package}"
    bad = [
        f"{f.relative_to(ROOT)} imports {m}"
        for f in files
        for m in imported_modules(f)
        if any(m == x or m.startswith(x + ".") for x in FORBIDDEN[package])
    ]
    assert not bad, bad


# Inside `lens/`, subpackages form layers: each may import only those listed (and itself).
LENS_LAYERS = {
    "runtime": set(),
    "heads": {"runtime"},
    "lenses": {"runtime", "heads"},
    "training": {"runtime", "heads", "lenses"},
    "evaluation": {"runtime", "heads", "lenses"},
    "memory": {"runtime", "heads", "lenses", "training"},
}


def test_lens_subpackages_are_layered():
    lens = ROOT / "lens"
    assert {p.name for p in lens.iterdir() if (p / "__init__.py").exists()} == set(LENS_LAYERS)
    bad = []
    for layer, allowed in LENS_LAYERS.items():
        for f in sorted((lens / layer).rglob("*.py")):
            for m in imported_modules(f):
                parts = m.split(".")
                if parts[:2] == ["loralens", "lens"] and len(parts) > 2 and parts[2] not in allowed | {layer}:
                    bad.append(f"{f.relative_to(ROOT)} imports {m}")
    assert not bad, bad
