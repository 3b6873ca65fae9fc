"""The package's layering: the library never imports its CLI, models never import deploy, and no import cycles."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import anomalib_robust

PACKAGE = Path(anomalib_robust.__file__).parent


IMPORTS = ("import anomalib_robust.models", "import anomalib_robust.callbacks, anomalib_robust.defenses")


@pytest.fixture(scope="module")
def imported_modules() -> dict[str, set[str]]:
    """The ``anomalib_robust`` modules in ``sys.modules`` after each statement of :data:`IMPORTS`, run in turn in a
    fresh interpreter (one interpreter: importing anomalib takes most of the time)."""
    report = "print(' '.join(name for name in sys.modules if name.startswith('anomalib_robust')))"
    script = "\n".join(["import sys", *(f"{statement}\n{report}" for statement in IMPORTS)])
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return {statement: set(line.split()) for statement, line in zip(IMPORTS, result.stdout.splitlines(), strict=True)}


def test_callbacks_and_defenses_do_not_import_the_cli(imported_modules: dict[str, set[str]]) -> None:
    modules = imported_modules["import anomalib_robust.callbacks, anomalib_robust.defenses"]
    assert "anomalib_robust.defenses" in modules
    assert "anomalib_robust.cli" not in modules


def test_models_do_not_import_deploy(imported_modules: dict[str, set[str]]) -> None:
    modules = imported_modules["import anomalib_robust.models"]
    assert "anomalib_robust.models.adv_rad.lightning_model" in modules
    assert not {name for name in modules if name.startswith("anomalib_robust.deploy")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Names that ``module`` imports when it runs: every import except those under ``if TYPE_CHECKING:``."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            source = ".".join(part for part in (base, node.module) if part)
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)  # ``from package import module``
        pending.extend(ast.iter_child_nodes(node))
    return names


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        imports = _runtime_imports(ast.parse(path.read_text()), module, path.name == "__init__.py")
        graph[module] = {name for name in imports if name in paths and name != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For each module that imports itself through other modules, the shortest such chain of imports."""
    cycles = []
    for start in sorted(graph):
        chains = {target: [start, target] for target in sorted(graph[start])}
        pending = list(chains)
        while pending:
            current = pending.pop(0)
            if current == start:
                cycles.append(chains[start])
                break
            for target in sorted(graph.get(current, ())):
                if target not in chains:
                    chains[target] = [*chains[current], target]
                    pending.append(target)
    return cycles


def test_cycle_check_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"]]


@pytest.mark.parametrize("module", ["anomalib_robust.models.adv_rad.lightning_model", "anomalib_robust.deploy.adv_rad"])
def test_import_graph_sees_the_package(module: str) -> None:
    graph = _import_graph()
    assert module in graph
    assert "anomalib_robust.models.adv_rad.export" in graph[module]


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    assert _cycles(_import_graph()) == []
