"""The layout the README's architecture section promises, checked on the code itself: entry scripts are
imported by nothing, the import graph has no cycle (package __init__ files and importlib calls count),
and functions stay short and take few parameters."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("pipeline", "model", "train", "benchmarks")
MAX_PARAMETERS = 7
# Signatures fixed by what calls them, not by us: a Triton kernel's arguments are its launch arguments, a
# numba kernel's are plain arrays and scalars (no dataclass crosses into nopython code), and their
# launchers pass those through one to one; the plain-torch patch op is called exactly as they are (one
# PatchOp contract, so the fused ops are tested against it bit for bit with the same arguments).
PARAMETER_EXCEPTIONS = {
    "pipeline/patches.py:patchify_and_mask": "the patch op's reference: the fused kernels' launchers' contract",
    "pipeline/fused_patches.py:_patchify_kernel": "Triton kernel: tensors, strides and constexprs",
    "pipeline/fused_patches.py:patchify_numba": "numba kernel over plain arrays",
    "pipeline/fused_patches.py:patchify_triton": "the Triton kernel's launcher, argument for argument",
    "pipeline/ffcv_loader.py:_patch_sample": "numba kernel run inside FFCV's compiled pipeline",
}


# importlib calls whose module name is computed and is never one of ours.
OTHERS_DYNAMIC_IMPORTS = {
    "pipeline.cifar_pickle": "numpy's modules, by the name a CIFAR pickle gives",
    "benchmarks.gpu_prepare": "the optional loader packages (ffcv, nvidia.dali), to report their versions",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def constants(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "string" assignments (an importlib call may name its module through one)."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found |= {target.id: node.value.value for target in node.targets if isinstance(target, ast.Name)}
    return found


def imported_names(tree: ast.Module, known: dict[str, Path]) -> Iterator[str]:
    """Every module of ours that `tree` imports: import statements anywhere (functions included),
    `from package import module`, and importlib.import_module / __import__ calls with a known name."""
    strings = constants(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known
            ]
            yield from submodules
            if len(submodules) < len(node.names):  # a name the package itself defines (or re-exports)
                yield node.module
        elif isinstance(node, ast.Call) and node.args:
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__"):
                argument = node.args[0]
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    yield argument.value
                elif isinstance(argument, ast.Name) and argument.id in strings:
                    yield strings[argument.id]
                else:
                    yield f"<dynamic import at line {node.lineno}>"


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports, each with its parent packages (whose __init__ runs first)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        # The packages above the module itself are already being initialised when it runs: importing a
        # sibling adds no edge to them. Every other package on a target's path runs its __init__ first.
        ancestors = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        if path.name == "__init__.py":
            ancestors.add(name)
        for target in imported_names(ast.parse(path.read_text()), known):
            parts = target.split(".")
            path_to_target = {".".join(parts[:k]) for k in range(1, len(parts) + 1)}
            ours = known.keys() | ({target} if target.startswith("<") else set())
            edges |= (path_to_target - (ancestors - {target})) & ours
        graph[name] = edges - {name}
    return graph


def entry_scripts() -> set[str]:
    """Modules run as programs: those with an `if __name__ == "__main__":` block."""
    return {name for name, path in modules().items() if 'if __name__ == "__main__":' in path.read_text()}


def test_no_entry_script_is_imported() -> None:
    graph, entries = import_graph(), entry_scripts()
    found = sorted(f"{importer} imports {target}" for importer, edges in graph.items() for target in edges & entries)
    assert not found, found


# The floors, lowest first: a module may import its own floor and those below, never one above. The
# programs (entry scripts) and the benchmarks stand on everything.
FLOORS = (
    ("pipeline", "model"),
    ("train.config",),
    ("train.engine",),
    ("train.methods",),
    ("train.evaluation",),
    ("train.stages",),
    ("train.experiments",),
    ("benchmarks",),
)


def floor(module: str, entries: set[str]) -> int:
    if module in entries and module.startswith("train."):
        return len(FLOORS)
    for level, prefixes in enumerate(FLOORS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return level
    return 0  # the empty top-level package `train`


def test_imports_run_down_the_floors() -> None:
    graph, entries = import_graph(), entry_scripts()
    upward = sorted(
        f"{importer} imports {target}"
        for importer, edges in graph.items()
        for target in edges
        if floor(target, entries) > floor(importer, entries)
    )
    assert not upward, upward


def test_every_import_is_resolved() -> None:
    unresolved = sorted(
        f"{importer}: {target}"
        for importer, edges in import_graph().items()
        for target in edges
        if "<" in target and importer not in OTHERS_DYNAMIC_IMPORTS
    )
    assert not unresolved, unresolved


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                on_stack.discard(member)
                component.append(member)
            on_stack.discard(node)
            if component:
                found.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle_through_a_package_init_and_importlib() -> None:
    graph = {"a": {"a.b"}, "a.b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(graph) == [["a", "a.b", "c"]]  # a's __init__ imports a.b, which imports c, which imports a
    tree = ast.parse('import importlib\nPLUGINS = "train.methods"\nimportlib.import_module(PLUGINS)\n')
    assert "train.methods" in set(imported_names(tree, modules()))


def functions() -> Iterator[tuple[str, ast.FunctionDef]]:
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{path.relative_to(ROOT)}:{node.name}", node


def parameters(node: ast.FunctionDef) -> list[str]:
    arguments = node.args
    names = [a.arg for a in (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)]
    names += [f"*{a.arg}" for a in (arguments.vararg, arguments.kwarg) if a is not None]
    return [name for name in names if name not in ("self", "cls")]


def test_no_function_takes_more_than_seven_parameters() -> None:
    wide = sorted(
        f"{where} ({len(parameters(node))})"
        for where, node in functions()
        if len(parameters(node)) > MAX_PARAMETERS and where not in PARAMETER_EXCEPTIONS
    )
    assert not wide, wide


def test_the_parameter_exceptions_are_still_needed() -> None:
    found = {where: node for where, node in functions()}
    stale = [where for where in PARAMETER_EXCEPTIONS if where not in found or len(parameters(found[where])) <= 7]
    assert not stale, stale


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "train").glob("*.py") if p.name != "__init__.py"))
def test_train_holds_only_thin_entry_scripts(script: str) -> None:
    """train/'s top level is what users run: each file a program, short, its work done by the library."""
    path = ROOT / "train" / script
    assert module_name(path) in entry_scripts(), f"{script} is not a program; library code goes in a subpackage"
    tree = ast.parse(path.read_text())
    defined = [node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)]
    assert len(defined) <= 3, f"{script} defines {defined}; move what it builds into the library"
