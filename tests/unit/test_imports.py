"""Every relative import in the package resolves to a module that exists, including the
ones inside functions (lazy imports run only on the path that needs them: a wrong one would
surface only there, for example after a module moved into a package)."""

import ast
import importlib.util
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_every_relative_import_resolves():
    bad = []
    for path in sorted((SRC / "resilient_ep").rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        package = ".".join(parts if parts[-1] == "__init__" else parts[:-1])
        package = package.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names = [base] if node.module else []
            names += [f"{base}.{a.name}" for a in node.names if not node.module]
            for name in names:
                try:
                    found = importlib.util.find_spec(name) is not None
                except ModuleNotFoundError:
                    found = False
                if not found and not (node.module is None and _attr(base, node)):
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}")
    assert not bad, "\n".join(bad)


def _attr(base, node) -> bool:
    """``from . import name`` where name is an attribute of the package, not a module."""
    import importlib

    mod = importlib.import_module(base)
    return all(hasattr(mod, a.name) for a in node.names)
