"""The structure the project promises: functions short enough to read, and methods that are plug-ins
(no method's name, metric, label or config section is written in the code anywhere but in its own
module)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from train.methods import METHODS

PACKAGES = ("pipeline", "model", "train", "benchmarks")
MAX_FUNCTION_LINES = 50


def sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_is_longer_than_fifty_lines() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sources()
        for node in functions(ast.parse(path.read_text()))
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


def docstring_nodes(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a Python file but its docstrings."""
    tree = ast.parse(path.read_text())
    docs = docstring_nodes(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def built_in_methods() -> dict[str, type]:
    return {name: cls for name, cls in METHODS.items() if cls.__module__.startswith("train.methods.")}


def method_words(cls: type) -> list[re.Pattern]:
    """What would name the method: its name, metric and label as words, its section as a dotted key."""
    words = [re.compile(rf"(?<![\w-]){re.escape(word)}(?![\w-])") for word in (cls.name, cls.metric, cls.label)]
    if cls.section:
        words.append(re.compile(rf"(?<![\w-]){re.escape(cls.section)}\."))
    return words


@pytest.mark.parametrize("name", sorted(built_in_methods()))
def test_no_method_name_is_written_outside_its_own_module(name: str) -> None:
    cls = built_in_methods()[name]
    own = Path(cls.__module__.replace(".", "/") + ".py")
    # The code only: configs, docs, tests and the GPU check's recipe (benchmarks/gpu_plan.py, which names
    # the runs an issue's targets ask for) may name a method.
    files = [path for path in sources() if path.relative_to(ROOT) != Path("benchmarks/gpu_plan.py")]
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for path in files
        if path.relative_to(ROOT) != own
        for line, text in string_literals(path)
        if any(word.search(text) for word in method_words(cls))
    ]
    assert not found, found


def test_the_literal_check_finds_a_method_name_where_it_is_written(tmp_path: Path) -> None:
    cls = built_in_methods()[next(iter(built_in_methods()))]
    module = tmp_path / "m.py"
    module.write_text(f'"""Docs may say {cls.name}."""\nMETHOD = "{cls.name}"\nKEY = "x_{cls.name}"\n')
    hits = [text for _, text in string_literals(module) if any(w.search(text) for w in method_words(cls))]
    assert hits == [cls.name]
