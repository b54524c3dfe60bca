"""The package's shape: imports inside the package are at module level, so dependencies between modules are visible
at the top of each file and import cycles fail at import time, not halfway through a run. The command line is the
stated exception: it imports lazily so that ``amp --help`` starts without torch."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAZY = {"amp/cli.py", "amp/__init__.py"}  # lazy on purpose: fast --help, a light `import amp`


def _function_local_amp_imports(path: Path) -> list[str]:
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").split(".")[0] == "amp"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "amp" for a in node.names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} import amp")
    return found


def test_in_package_imports_are_at_module_level():
    files = [p for p in sorted((ROOT / "amp").rglob("*.py")) if str(p.relative_to(ROOT)) not in LAZY]
    local = [hit for path in files for hit in _function_local_amp_imports(path)]
    assert not local, "function-local imports of amp modules:\n" + "\n".join(local)
