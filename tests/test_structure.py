"""The package's shape: no import cycles (function-level imports included), every module importable on its
own, and the model maths (RoPE, RMSNorm, MoE routing) in seekling/model/ only."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "seekling"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The seekling modules `name` imports anywhere in its file (top level or inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .base import x / from ..tokenizer import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def test_no_import_cycles():
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them: drop edges into parents
    graph = {n: {t for t in deps if not n.startswith(t + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process where no other seekling module is loaded yet."""
    code = (
        "import importlib, sys\n"
        "names = sys.argv[1:]\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m == 'seekling' or m.startswith('seekling.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(n)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *MODULES], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


MATHS = {  # a pattern that only an implementation of that piece of maths would contain
    "RMSNorm": r"F\.rms_norm|\.rsqrt\(|torch\.rsqrt|vector_norm",
    "RoPE": r"rotate_half|view_as_complex|inv_freq\b.*\*|\.cos\(\)|\.sin\(\)",
    "routing": r"\.sigmoid\(\)|\.topk\(.*\bbias\b",
}


def test_model_maths_lives_in_the_model_package():
    assert not (PACKAGE / "engine" / "runner.py").exists() and not (PACKAGE / "engine" / "graph.py").exists()
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("seekling.model"):
            continue
        text = path.read_text()
        offenders += [f"{name}: {what}" for what, pattern in MATHS.items() if re.search(pattern, text)]
    assert not offenders, offenders
