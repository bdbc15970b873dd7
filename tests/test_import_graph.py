"""The package's import graph, read from the source (ast): no cycle, no arrow running back up.

Every ``import`` statement counts, also those inside functions (a lazy import is still an
arrow). Layers, bottom up: model introspection (``mir_lightning/models/``) imports nothing of
the package outside itself; the engine and everything else below the trainer adapters never
imports ``mir_lightning/adapters/``; only the old-path aliases (``callback.py``,
``early_stopping.py``, ``integrations/hf_trainer.py``) point at the adapters, and nothing
imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mir_lightning"
ROOT = "mir_lightning"
# sys.modules aliases of moved modules: the only package modules allowed to import adapters
ALIASES = {"mir_lightning.callback", "mir_lightning.early_stopping", "mir_lightning.integrations.hf_trainer",
           "mir_lightning.integrations.transformers", "mir_lightning.integrations.llava"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The package module ``name`` refers to (its longest existing prefix), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Package modules that ``module`` imports anywhere in its body (function-level included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return imports_in(path.read_text(), module, package)


def imports_in(source: str, module: str, package: str) -> set[str]:
    """Package modules imported anywhere in ``source`` (the text of ``module``, in ``package``)."""
    found: set[str] = set()
    tree = ast.parse(source)
    typing_only = {id(child) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                   for stmt in node.body for child in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports are for annotations, never run
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycle() -> list[str] | None:
    """One import cycle among the package modules (the package root excluded: every module
    lives in it, and it loads the heavy ones lazily by name), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node] - {ROOT}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and node != ROOT:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_sees_every_form_of_import() -> None:
    source = """
import mir_lightning.metric
from mir_lightning import functional, MIRPlateau
from . import transformers
def later():
    from mir_lightning.adapters.lightning import MIRCallback
class Lazy:
    def method(self):
        import mir_lightning.probe as probe
"""
    assert imports_in(source, "mir_lightning.models.llava", "mir_lightning.models") == {
        "mir_lightning.metric", "mir_lightning.functional", ROOT, "mir_lightning.models.transformers",
        "mir_lightning.adapters.lightning", "mir_lightning.probe"}
    assert "mir_lightning.publish" in GRAPH["mir_lightning.adapters.lightning"]


def test_no_import_cycle() -> None:
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_model_introspection_imports_nothing_above_it() -> None:
    for module, targets in GRAPH.items():
        if module.startswith(f"{ROOT}.models"):
            upward = {t for t in targets if not t.startswith(f"{ROOT}.models")}
            assert not upward, f"{module} imports {sorted(upward)}"


def test_only_aliases_import_the_adapters() -> None:
    for module, targets in GRAPH.items():
        if module.startswith(f"{ROOT}.adapters") or module in ALIASES:
            continue
        adapters = {t for t in targets if t.startswith(f"{ROOT}.adapters")}
        assert not adapters, f"{module} (below the adapters) imports {sorted(adapters)}"


def test_adapters_do_not_import_each_other() -> None:
    # each adapter stands on the core (publish, probe, plateau); none needs another
    for module, targets in GRAPH.items():
        if module.startswith(f"{ROOT}.adapters."):
            others = {t for t in targets if t.startswith(f"{ROOT}.adapters") and t != module}
            assert not others, f"{module} imports {sorted(others)}"
