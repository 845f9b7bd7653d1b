"""The shape of the code: no function in ditcli/ over 60 lines (orchestrators call named steps instead), and backend
flags set in one place."""

import ast
from pathlib import Path

import ditcli

PACKAGE = Path(ditcli.__file__).parent
MAX_LINES = 60


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method, nested ones included, longer than `limit` lines (decorators and
    signature counted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - start + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def test_the_checker_sees_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    assert long_functions(f"def f():\n{body}") == [("f", MAX_LINES + 1)]
    assert long_functions(f"class C:\n    def m(self):\n    {body.replace(chr(10), chr(10) + '    ')}") != []
    assert long_functions(f"def f():\n{body[:-len(body.splitlines()[-1]) - 1]}") == []


def test_no_function_in_ditcli_is_over_60_lines():
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {name} ({lines} lines)"
                 for path in sorted(PACKAGE.rglob("*.py")) for name, lines in long_functions(path.read_text())]
    assert not offenders, "split these into named steps: " + "; ".join(offenders)


def backend_flag_writes(source: str) -> list[str]:
    """Assignments to torch.backends.* in `source`, e.g. "torch.backends.cudnn.benchmark"."""
    return [ast.unparse(target) for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            for target in node.targets if ast.unparse(target).startswith("torch.backends.")]


def test_backend_flags_are_set_in_one_place():
    assert backend_flag_writes("torch.backends.cuda.matmul.allow_tf32 = False\nx = 1") == [
        "torch.backends.cuda.matmul.allow_tf32"]
    writers = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
               if backend_flag_writes(path.read_text())}
    assert writers == {"runtime.py"}
