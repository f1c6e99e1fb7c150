"""The package's layers: imports flow one way, cli -> training and results -> selection and backends -> graph -> manifest."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_neq"

# Each top-level module or package of onnx_neq and its layer; a module may import only from lower layers
# (and from its own package). results may call training (compare runs trainings).
LAYER = {
    "errors": 0,
    "typed_json": 0,
    "model_io": 0,
    "ort_runtime": 0,
    "manifest": 0,
    "graph": 1,
    "data": 1,
    "architectures": 1,
    "selection": 2,
    "backends": 2,
    "training": 3,
    "results": 4,
    "fleet": 4,
    "export": 4,
    "cli": 5,
}
FOUNDATION_ORDER = ["errors", "typed_json", "model_io", "ort_runtime", "manifest"]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("onnx_neq."):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("onnx_neq."))


def test_every_import_goes_down_a_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        me = parts[0]
        if me == "__init__":
            continue
        assert me in LAYER, f"{me} has no layer: add it to LAYER and to ARCHITECTURE.md"
        for module in _imports(path):
            other = module.split(".")[1]
            if other == me:
                continue
            same_foundation = LAYER[me] == LAYER[other] == 0 and FOUNDATION_ORDER.index(other) < FOUNDATION_ORDER.index(me)
            if LAYER[other] >= LAYER[me] and not same_foundation:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not upward, "\n".join(upward)
