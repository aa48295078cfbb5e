"""Every import inside a function in ``detkit/`` says why it is there (issue 22): a comment on its line or the
line above, one comment covering a run of consecutive imports. Imports that only dodged a cycle or came from
habit belong at the top of the module; the ones left keep ``detkit --help`` fast or load an optional dependency."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import detkit

PACKAGE = Path(detkit.__file__).parent

def comment_lines(source: str) -> set[int]:
    """The line numbers holding a comment (``#`` inside a string is not one)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT}


def unexplained_imports(source: str) -> list[int]:
    """Lines of the imports inside a function of ``source`` without a comment on their first line or the line above,
    that do not follow a commented import in the same block (blank lines between them allowed)."""
    comments = comment_lines(source)
    found: list[int] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for _, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                covered = False  # the previous statement of this block is an explained import
                for stmt in value:
                    if in_function and isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        covered = covered or bool({stmt.lineno - 1, stmt.lineno} & comments)
                        if not covered:
                            found.append(stmt.lineno)
                    else:
                        covered = False
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.AST):
                    visit(child, in_function)

    visit(ast.parse(source), False)
    return found


def test_unexplained_import_is_found() -> None:
    source = ("def f():\n    import json\n\n"
              "def g():\n    # lazy: torch, kept out of --help\n    import torch\n\n    from x import y\n    z = 1\n"
              "    import os\n\n"
              "import sys\n")
    assert unexplained_imports(source) == [2, 10]


def test_every_import_inside_a_function_says_why() -> None:
    files = {path.relative_to(PACKAGE).as_posix(): path for path in sorted(PACKAGE.rglob("*.py"))}
    bad = [f"detkit/{name}:{line}" for name, path in files.items()
           for line in unexplained_imports(path.read_text())]
    assert not bad, ("imports inside functions without a comment saying why (move them to the top of the module, "
                     "or comment: lazy for start-up, or an optional dependency): " + ", ".join(bad))
