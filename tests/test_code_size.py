"""The size rules of docs/architecture.md, checked: no function in detkit/ over 60 lines, no module over 300."""

from __future__ import annotations

import ast
from pathlib import Path

import detkit

PACKAGE = Path(detkit.__file__).parent
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 60, 300


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """``(name, first line, length)`` of every function or method of ``source`` longer than ``limit`` lines
    (decorators not counted, docstring and comments counted)."""
    return [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > limit]


def test_long_function_is_found() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    assert long_functions(f"def short():\n    return 1\n\n\ndef long():\n{body}\n") == [("long", 5, 62)]


def test_no_function_over_60_lines_and_no_module_over_300() -> None:
    too_long, too_big = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source, name = path.read_text(), path.relative_to(PACKAGE.parent).as_posix()
        too_long += [f"{name}:{line} {fn} ({length} lines)" for fn, line, length in long_functions(source)]
        if source.count("\n") > MAX_MODULE_LINES:
            too_big.append(f"{name} ({source.count(chr(10))} lines)")
    assert not too_long, "functions over 60 lines (split them by step): " + ", ".join(too_long)
    assert not too_big, "modules over 300 lines (split them by job): " + ", ".join(too_big)
