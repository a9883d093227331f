"""The package's layering, checked from its source: no import cycles, and the core never imports the tools above it.

Imports are read with `ast` from every module under src/medusa, at module level and inside functions alike: an
import deferred into a function body still ties the two modules together (it only hides the cycle from Python).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "medusa"
TOOL_PACKAGES = ("commands", "serve", "bench", "treeopt", "training")


def module_name(path: Path) -> str:
    parts = ("medusa", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Every medusa module `name` imports anywhere in its source, resolved to the modules that exist."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from medusa.pkg import module` names a module; `from medusa.mod import name` names the module.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None. Package __init__ edges count like any other."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def is_core(name: str) -> bool:
    """A core module is a file directly in src/medusa, or the package itself; the cli is the entry point above all."""
    return name == "medusa" or (PACKAGE_ROOT / f"{name.removeprefix('medusa.')}.py").is_file() and name != "medusa.cli"


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_imports_no_tool_package():
    tools = tuple(f"medusa.{package}" for package in TOOL_PACKAGES)
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if is_core(name)
        for target in targets
        if target.startswith(tools)
    )
    assert not wrong, "the core imports a tool package: " + "; ".join(wrong)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The walker must count an import inside a function, else a deferred import would hide a cycle."""
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from medusa.interop import x\n    import medusa.heads\n")
    known = {"medusa.interop", "medusa.heads", "medusa.mod"}
    assert imported_modules("medusa.mod", source, known) == {"medusa.interop", "medusa.heads"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert is_core("medusa.model") and is_core("medusa")
    assert not is_core("medusa.cli") and not is_core("medusa.serve") and not is_core("medusa.serve.app")


def test_test_modules_import_no_other_test_module():
    """Shared test code lives in tests/helpers and fixtures in conftest.py files, so each test module stands alone."""
    tests = Path(__file__).resolve().parent
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            wrong += [
                f"{path.relative_to(tests)} imports {name}"
                for name in names
                if name.split(".")[0].startswith("test_") or name.split(".")[0] == "conftest"
            ]
    assert not wrong, "; ".join(wrong)
