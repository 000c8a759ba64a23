"""Every public function and method of the package documents its arguments, what it returns and
what it raises (Google style), so that help() and an editor tell a user what the README cannot.

ruff's pydocstyle and pydoclint rules check the sections against the code (a `return` with a
value needs Returns, a `raise X` needs X under Raises, every documented argument list is
complete); they cannot be limited to public names, so this test filters their findings to those
and adds the one check ruff lacks: a function that takes arguments has an Args section.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "deepshrink"
RULES = "D102,D103,D417,DOC201,DOC402,DOC501"


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef, bool]]:
    """(qualified name, node, nested in a function) of every function and method."""
    found = []

    def walk(node: ast.AST, prefix: str, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((prefix + child.name, child, in_function))
                walk(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.", in_function)

    walk(tree, "", False)
    return found


def _is_public(name: str, nested: bool) -> bool:
    parts = name.split(".")
    private = any(part.startswith("_") and not (part.startswith("__") and part.endswith("__")) for part in parts)
    special = parts[-1].startswith("__") and parts[-1] != "__call__"  # __init__, __repr__: the class says it
    return not (private or special or nested)


def _without_args_section(root: Path) -> list[str]:
    """Public functions under `root` that take arguments but have no Args section."""
    missing = []
    for path in sorted(root.rglob("*.py")):
        for name, node, nested in _functions(ast.parse(path.read_text())):
            if not _is_public(name, nested):
                continue
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            names = [argument.arg for argument in arguments if argument.arg not in ("self", "cls")]
            names += [extra.arg for extra in (node.args.vararg, node.args.kwarg) if extra is not None]
            decorators = {getattr(decorator, "id", getattr(decorator, "attr", "")) for decorator in node.decorator_list}
            if not names or decorators & {"property", "setter", "overload"}:
                continue
            if "\nArgs:\n" not in "\n" + (ast.get_docstring(node) or ""):
                missing.append(f"{path.relative_to(root)}::{name}({', '.join(names)})")
    return missing


def _ruff_findings(root: Path) -> list[dict]:
    command = [sys.executable, "-m", "ruff", "check", "--preview", "--select", RULES, "--isolated"]
    command += ["--config", 'lint.pydocstyle.convention="google"', "--output-format", "json", "--exit-zero", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"ruff did not run: {done.stderr.strip()}")
    return json.loads(done.stdout)


def _enclosing(path: Path, line: int, cache: dict) -> tuple[str, bool] | None:
    if path not in cache:
        cache[path] = _functions(ast.parse(path.read_text()))
    around = [(name, node, nested) for name, node, nested in cache[path] if node.lineno <= line <= node.end_lineno]
    if not around:
        return None
    name, _, nested = max(around, key=lambda item: item[1].lineno)
    return name, nested


def _missing_sections(root: Path) -> list[str]:
    """ruff's findings on public functions under `root`."""
    cache: dict = {}
    problems = []
    for finding in _ruff_findings(root):
        path = Path(finding["filename"])
        enclosing = _enclosing(path, finding["location"]["row"], cache)
        if enclosing is None or not _is_public(*enclosing):
            continue
        message = finding["message"]
        if finding["code"] == "DOC501":
            # `raise error(...)` with an exception class passed in, or `raise _write_error(...)`
            # building one: the docstring names the class, which ruff cannot see.
            raised = message.split("`")[1] if "`" in message else ""
            if not raised[:1].isupper():
                continue
        problems.append(f"{path.relative_to(root)}::{enclosing[0]}: {finding['code']} {message}")
    return problems


def test_public_functions_document_returns_raises_and_every_argument():
    problems = _missing_sections(PACKAGE)
    assert not problems, "public functions missing docstring sections:\n" + "\n".join(problems)


def test_public_functions_with_arguments_have_an_args_section():
    missing = _without_args_section(PACKAGE)
    assert not missing, "public functions without an Args section:\n" + "\n".join(missing)


def test_the_checks_find_what_they_should(tmp_path):
    """The filters must not hide everything: what an undocumented public function lacks is found,
    and private, nested and documented functions pass."""
    (tmp_path / "probe.py").write_text(
        "def bare(value: int) -> int:\n"
        '    """No sections."""\n'
        "    if value < 0:\n"
        '        raise ValueError("negative")\n'
        "    return value\n"
        "\n\n"
        "def _private(value: int) -> int:\n"
        '    """No sections."""\n'
        "    return value\n"
        "\n\n"
        "def documented(value: int) -> int:\n"
        '    """Documented.\n\n    Args:\n        value: a number.\n\n    Returns:\n        `value`.\n\n'
        '    Raises:\n        ValueError: `value` is negative.\n    """\n'
        "    if value < 0:\n"
        '        raise ValueError("negative")\n'
        "    return value\n"
    )
    problems = _missing_sections(tmp_path)
    assert len(problems) == 2 and all(problem.startswith("probe.py::bare: ") for problem in problems), problems
    assert {problem.split()[1] for problem in problems} == {"DOC201", "DOC501"}
    assert _without_args_section(tmp_path) == ["probe.py::bare(value)"]
