"""The module graph: no ditcli module imports one that imports it back, not even inside a function; the subpackages
form one chain of layers, and every import goes to the importer's own layer or a lower one; docs/architecture.md
describes the layers in that order; only the shell imports typer or rich."""

import ast
import re
from pathlib import Path

import pytest

import ditcli

PACKAGE = Path(ditcli.__file__).parent
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"

# The layers, bottom to top. The ground floor is the top-level modules every wing may need; the package itself
# (`ditcli/__init__.py`, `__main__.py`) belongs to the shell. model, diffusion and data import only the ground floor,
# so their order among themselves (and data's below weights) is a choice; the other steps are imports the code makes:
# weights reads models and objectives, evaluation reads data and weights (the judge), sampling names evaluation's
# protocol, training samples and scores (eval_hook), the shell calls them all.
GROUND_FLOOR = ("errors", "version", "io", "runtime", "ranks", "hub", "downloads")
LAYERS = ("ground floor", "model", "diffusion", "data", "weights", "evaluation", "sampling", "training", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every ditcli module `path` imports, at any depth of the file (functions, try blocks, TYPE_CHECKING too)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from ditcli import finetune` is a module
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None; depth-first search with colours."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_walker_sees_function_level_imports():
    """The check can fail: a function-level import back is a cycle, and nested imports are found."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    graph = import_graph()
    assert "ditcli.weights.checkpoint" in graph["ditcli"]  # load_model's import inside a function
    assert "ditcli.training.finetune" in graph["ditcli.training.trainer"]  # `from ditcli import finetune`
    assert "ditcli.training.preview" in graph["ditcli.training.trainer"]  # imported inside a method


def layer_of(module: str) -> str:
    """The layer of a module such as "ditcli.model.dit"; KeyError for a module of no layer."""
    parts = module.split(".")[1:]
    if parts in ([], ["__main__"]):
        return "cli"
    if parts[0] in GROUND_FLOOR and len(parts) == 1:
        return "ground floor"
    if parts[0] in LAYERS:
        return parts[0]
    raise KeyError(f"{module} is in no layer: add it to GROUND_FLOOR, or move it into a subpackage")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """"a -> b" for every import of a module in a higher layer than the importer's."""
    height = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})" for a, targets in graph.items() for b in targets
                  if height[layer_of(b)] > height[layer_of(a)])


def test_every_module_is_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_every_import_goes_to_the_same_or_a_lower_layer():
    upward = upward_imports(import_graph())
    assert not upward, "imports that run back up the layers: " + "; ".join(upward)


def test_the_layer_check_sees_an_import_going_up():
    graph = {"ditcli.model.dit": {"ditcli.errors", "ditcli.sampling.generate"}, "ditcli.errors": set(),
             "ditcli.sampling.generate": {"ditcli.model.dit"}, "ditcli.cli.app": {"ditcli", "ditcli.training.trainer"},
             "ditcli": {"ditcli.weights.checkpoint"}, "ditcli.runtime": {"ditcli.errors"}}
    assert upward_imports(graph) == ["ditcli.model.dit (model) -> ditcli.sampling.generate (sampling)"]
    assert upward_imports({"ditcli.errors": {"ditcli"}}) == ["ditcli.errors (ground floor) -> ditcli (cli)"]
    with pytest.raises(KeyError, match="ditcli.stray"):
        layer_of("ditcli.stray")


def third_party_imports(source: str) -> set[str]:
    """The top-level names of every absolute import in `source`, at any depth: "typer", "rich", "torch"..."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.partition(".")[0])
    return found


def shell_imports_outside_the_shell(files: dict[str, str]) -> list[str]:
    """"path: name" for typer or rich imported outside cli/, and for click anywhere (Typer's public API suffices)."""
    return sorted(f"{path}: {name}" for path, source in files.items() for name in third_party_imports(source)
                  if name == "click" or (name in ("typer", "rich") and not path.startswith("cli/")))


def test_only_the_shell_imports_typer_or_rich():
    files = {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in PACKAGE.rglob("*.py")}
    offenders = shell_imports_outside_the_shell(files)
    assert not offenders, "only ditcli/cli/ renders, and nothing imports click: " + "; ".join(offenders)


def test_the_shell_check_sees_typer_rich_or_click_where_they_do_not_belong():
    files = {"cli/app.py": "import typer\nfrom rich.console import Console\n",
             "sampling/generate.py": "def f():\n    from rich.progress import Progress\n",
             "model/dit.py": "import torch\nfrom .codec import x\n", "cli/train.py": "import click\n"}
    assert shell_imports_outside_the_shell(files) == ["cli/train.py: click", "sampling/generate.py: rich"]


def doc_layers(text: str) -> list[str]:
    """The layer each `## ` heading of the architecture doc is about, in order: "`ditcli/model/`" names model, "ground
    floor" the ground floor; headings that name neither are skipped."""
    layers = []
    for heading in re.findall(r"^## (.*)$", text, re.MULTILINE):
        named = re.search(r"`ditcli/(\w+)/`", heading)
        if named:
            layers.append(named.group(1))
        elif "ground floor" in heading.lower():
            layers.append("ground floor")
    return layers


def undocumented(text: str, paths: list[str]) -> list[str]:
    """The module paths (relative to ditcli/) the doc never names as `path`; a subpackage's `__init__.py` is named by
    its heading, `ditcli/<name>/`."""
    return [path for path in paths if f"`{path}`" not in text
            and not (path.endswith("/__init__.py") and f"`ditcli/{path.removesuffix('__init__.py')}`" in text)]


def test_the_architecture_doc_has_one_table_per_layer_in_the_chain_order():
    assert doc_layers(ARCHITECTURE.read_text()) == list(LAYERS)


def test_the_architecture_doc_names_every_module():
    paths = sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py"))
    missing = undocumented(ARCHITECTURE.read_text(), paths)
    assert not missing, "add a row for each to docs/architecture.md: " + ", ".join(missing)


def test_the_doc_checks_see_a_wrong_order_and_a_missing_module():
    text = "## Why\n## 1. `ditcli/model/`: the network\n## 0. The ground floor: `ditcli/*.py`\n| `model/dit.py` |"
    assert doc_layers(text) == ["model", "ground floor"]
    assert undocumented(text, ["model/dit.py", "model/codec.py", "model/__init__.py", "data/__init__.py"]) == [
        "model/codec.py", "data/__init__.py"]
