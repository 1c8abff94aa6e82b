"""The house: no import cycles, no stage module leaning on another stage module's helpers, imports at the top."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("rlft", "reward_models")
# Each is one command's entry point; the pipeline composes them and is the one allowed to import them.
STAGES = {"rlft.sft", "reward_models.train", "reward_models.preferences", "rlft.ppo.train", "rlft.dpo", "rlft.evaluate"}


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports, at module level or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and "TYPE_CHECKING" in ast.unparse(branch.test) for node in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from rlft import hub`
    return {name for name in found if name in known}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def cycles_in(edges: dict[str, set[str]]) -> list[list[str]]:
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return cycles


def test_the_import_graph_has_no_cycle():
    assert not cycles_in(graph())


def test_no_stage_imports_another_stage():
    edges = graph()
    leaning = {stage: sorted(edges[stage] & (STAGES - {stage})) for stage in STAGES}
    assert not any(leaning.values()), leaning
    assert set(edges) >= STAGES  # the list of stages names real modules


def test_the_graph_sees_imports_at_any_depth(tmp_path):
    (tmp_path / "rlft").mkdir()
    (tmp_path / "rlft" / "a.py").write_text("from rlft import b\n")
    (tmp_path / "rlft" / "b.py").write_text("def f():\n    import rlft.a\n")
    (tmp_path / "reward_models").mkdir()
    edges = graph(tmp_path)
    assert edges == {"rlft.a": {"rlft.b"}, "rlft.b": {"rlft.a"}}
    assert cycles_in(edges) == [["rlft.a", "rlft.b", "rlft.a"]]


def local_imports(path: Path, root: Path = ROOT) -> list[str]:
    """`module:line name` of each import inside a function of rlft's own modules or of the standard library
    (heavy or optional third-party libraries may load late: transformers, peft, trl, ...)."""
    tree = ast.parse(path.read_text())
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(root)}:{node.lineno} {name}" for name in names
                      if name.split(".")[0] in (*PACKAGES, *sys.stdlib_module_names)]
    return found


def test_imports_of_our_modules_and_the_standard_library_are_at_the_top():
    late = [line for path in modules(ROOT).values() for line in local_imports(path)]
    assert not late, "import these at the top of the module:\n" + "\n".join(late)


def test_a_late_import_is_found(tmp_path):
    (tmp_path / "rlft").mkdir()
    path = tmp_path / "rlft" / "a.py"
    path.write_text("import torch\n\ndef f():\n    import json\n    from rlft import b\n    import peft\n")
    assert [line.split(" ")[1] for line in local_imports(path, tmp_path)] == ["json", "rlft"]
