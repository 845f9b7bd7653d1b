"""The shape of the code: no function in ditcli/ over 60 lines (orchestrators call named steps instead), no class
over 300 and no module over 600; the package grouped into wings; backend flags set in one place."""

import ast
from pathlib import Path

import ditcli

PACKAGE = Path(ditcli.__file__).parent
MAX_LINES = 60
MAX_CLASS_LINES = 300
MAX_MODULE_LINES = 600
MIN_SUBPACKAGES = 5
MAX_TOP_MODULES = 10
MIN_WING_DOCSTRING_WORDS = 12  # a paragraph, not "TODO."


def long_functions(source: str, limit: int = MAX_LINES,
                   kinds: tuple[type, ...] = (ast.FunctionDef, ast.AsyncFunctionDef)) -> list[tuple[str, int]]:
    """(name, lines) of every function or method (or other `kinds` of definition), nested ones included, longer than
    `limit` lines (decorators and signature counted)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, kinds):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - start + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def long_classes(source: str, limit: int = MAX_CLASS_LINES) -> list[tuple[str, int]]:
    return long_functions(source, limit, (ast.ClassDef,))


def long_module(source: str, limit: int = MAX_MODULE_LINES) -> int | None:
    """The module's line count if it is over `limit`, else None."""
    lines = len(source.splitlines())
    return lines if lines > limit else None


def test_the_checker_sees_a_long_function():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    assert long_functions(f"def f():\n{body}") == [("f", MAX_LINES + 1)]
    assert long_functions(f"class C:\n    def m(self):\n    {body.replace(chr(10), chr(10) + '    ')}") != []
    assert long_functions(f"def f():\n{body[:-len(body.splitlines()[-1]) - 1]}") == []


def test_no_function_in_ditcli_is_over_60_lines():
    offenders = [f"{path.relative_to(PACKAGE.parent)}: {name} ({lines} lines)"
                 for path in sorted(PACKAGE.rglob("*.py")) for name, lines in long_functions(path.read_text())]
    assert not offenders, "split these into named steps: " + "; ".join(offenders)


def test_the_checkers_see_a_long_class_and_a_long_module():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_CLASS_LINES))
    assert long_classes(f"@dataclass\nclass C:\n{body}") == [("C", MAX_CLASS_LINES + 2)]
    assert long_classes(f"class C:\n{body[:-len(body.splitlines()[-1]) - 1]}") == []
    assert long_module("x = 1\n" * (MAX_MODULE_LINES + 1)) == MAX_MODULE_LINES + 1
    assert long_module("x = 1\n" * MAX_MODULE_LINES) is None


def test_no_class_over_300_lines_and_no_module_over_600():
    files = {path.relative_to(PACKAGE.parent): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}
    offenders = [f"{path}: class {name} ({lines} lines)" for path, source in files.items()
                 for name, lines in long_classes(source)]
    offenders += [f"{path} ({long_module(source)} lines)" for path, source in files.items() if long_module(source)]
    assert not offenders, "split these: " + "; ".join(offenders)


def wings(package: Path) -> tuple[list[str], list[str]]:
    """The subpackages of `package` and the modules left at its top."""
    subpackages = sorted(path.name for path in package.iterdir() if (path / "__init__.py").is_file())
    return subpackages, sorted(path.name for path in package.glob("*.py"))


def grouping_problems(package: Path) -> list[str]:
    """What keeps `package` from reading as wings: too few subpackages, too many modules left at the top, or a
    subpackage whose docstring is not a paragraph on what it holds."""
    subpackages, modules = wings(package)
    problems = []
    if len(subpackages) < MIN_SUBPACKAGES:
        problems.append(f"{len(subpackages)} subpackages, fewer than {MIN_SUBPACKAGES}")
    if len(modules) > MAX_TOP_MODULES:
        problems.append(f"{len(modules)} modules at the top, more than {MAX_TOP_MODULES}")
    for name in subpackages:
        docstring = ast.get_docstring(ast.parse((package / name / "__init__.py").read_text())) or ""
        if len(docstring.split()) < MIN_WING_DOCSTRING_WORDS:
            problems.append(f"{name}/__init__.py does not say what its wing holds")
    return problems


def test_the_package_is_grouped_into_wings():
    problems = grouping_problems(PACKAGE)
    assert not problems, "; ".join(problems)


def test_the_grouping_check_sees_a_flat_package(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text('"""TODO."""\n')
    for i in range(MAX_TOP_MODULES + 1):
        (tmp_path / f"m{i}.py").write_text("")
    assert grouping_problems(tmp_path) == [
        f"2 subpackages, fewer than {MIN_SUBPACKAGES}", f"{MAX_TOP_MODULES + 1} modules at the top, more than "
        f"{MAX_TOP_MODULES}", "a/__init__.py does not say what its wing holds",
        "b/__init__.py does not say what its wing holds"]


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
