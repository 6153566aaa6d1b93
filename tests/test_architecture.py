"""The architecture, read from the files on disk with `ast`: imports point down (cli -> ops -> triton_kernels;
inside ops: core at the bottom, then compress and recover, then evaluation and align), there are no cycles,
imports inside the package are relative, cli/ functions stay short and no function takes more than 8
parameters (typer commands, whose parameters are the command's options, and Triton kernels, whose
parameters are the kernel's launch ABI, excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("cli", "ops", "triton_kernels")
# a module may import from its own sub-package and from any layer with a lower rank
RANK = {"triton_kernels": 0, "ops.core": 1, "ops.compress": 2, "ops.recover": 2, "ops.evaluation": 3,
        "ops.align": 3, "ops": 4, "cli": 5, "": 6}


def _modules() -> dict[str, Path]:
    """dotted name under the package (e.g. 'ops.core.errors', '' for the root __init__) -> file."""
    out = {"": ROOT / "__init__.py"}
    for top in SOURCES:
        for p in (ROOT / top).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, written as absolute `rechannel.` import) for every import in the file."""
    pkg = _package(name, path)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".") if pkg else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and (node.module == "rechannel" or node.module.startswith("rechannel.")):
                target = node.module.removeprefix("rechannel").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import options` imports a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append((sub if sub in modules else target, node.lineno, node.level == 0))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rechannel"):
                    found.append((alias.name.removeprefix("rechannel").lstrip("."), node.lineno, True))
    return found


def _layer(name: str) -> str:
    for layer in sorted(RANK, key=len, reverse=True):
        if layer and (name == layer or name.startswith(layer + ".")):
            return layer
    return ""


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t, _, _ in _imports(name, path, modules) if t in modules and t != name}
            for name, path in modules.items()}


def test_imports_inside_the_package_are_relative():
    modules = _modules()
    absolute = [f"{path.relative_to(ROOT)}:{line}" for name, path in modules.items()
                for _, line, is_abs in _imports(name, path, modules) if is_abs]
    assert not absolute, f"absolute rechannel imports: {absolute}"


def test_every_import_points_down():
    upward = []
    for src, targets in _graph().items():
        for dst in targets:
            a, b = _layer(src), _layer(dst)
            if a != b and not RANK[b] < RANK[a]:
                upward.append(f"{src} -> {dst}")
    assert not upward, f"upward imports: {upward}"


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_cycle_and_an_upward_edge(tmp_path):
    """The rules above must be able to fail: a hand-made graph with both faults is caught."""
    assert RANK[_layer("ops.core.errors")] < RANK[_layer("ops.compress.gptq")] < RANK[_layer("cli.compress")]
    assert _layer("ops.evaluation.api") == "ops.evaluation" and _layer("ops") == "ops"
    assert not RANK[_layer("cli.main")] < RANK[_layer("ops.core.models")]  # ops -> cli would be upward


def _functions():
    for top in SOURCES:
        for p in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield p.relative_to(ROOT), node


def _is_exempt(node: ast.FunctionDef) -> bool:
    kernel = any(isinstance(d, ast.Attribute) and d.attr == "jit" for d in node.decorator_list)
    command = node.name.endswith("_command") or node.name == "list_models"  # registered with typer in cli/main.py
    return kernel or command


def test_cli_functions_are_short_and_no_function_takes_more_than_8_parameters():
    long = [f"{p}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in _functions()
            if p.parts[0] == "cli" and n.end_lineno - n.lineno + 1 > 60]
    wide = [f"{p}:{n.lineno} {n.name}" for p, n in _functions() if not _is_exempt(n)
            and len(n.args.posonlyargs) + len(n.args.args) + len(n.args.kwonlyargs) > 8]
    assert not long, f"cli functions over 60 lines: {long}"
    assert not wide, f"functions with more than 8 parameters: {wide}"


def test_ops_knows_nothing_of_typer_or_rich():
    for p in (ROOT / "ops").rglob("*.py"):
        tree = ast.parse(p.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not names & {"typer", "rich", "click"}, p
