"""The package's structure against docs/ARCHITECTURE.md, from the source alone (nothing imported):
every import of a jaxsft module goes to the same or a lower layer, every module has a layer, no
import cycle, no module over 400 lines, at most 10 deferred (function-level) jaxsft imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jaxsft"
OUTSIDE = {"jaxsft.assets.build_assets"}  # a maintainer's script, not part of the package's layers


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layers() -> dict[str, int]:
    """Module name pattern → layer, from the table's `modules` column."""
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    out = {}
    for row in re.finditer(r"^\| (\d+) [^|]*\| ([^|]+) \|", table, re.M):
        for pattern in re.findall(r"`([^`]+)`", row.group(2)):
            out[f"jaxsft.{pattern}"] = int(row.group(1))
    return out


def layer_of(module: str, table: dict[str, int]) -> int | None:
    if module in table:
        return table[module]
    for pattern, layer in table.items():
        if pattern.endswith(".*") and module.startswith(pattern[:-1]):
            return layer
    return None


def imports(path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported jaxsft module, deferred?) for each import in the file."""
    out = []
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxsft":
            for alias in node.names:  # `from jaxsft import hf` imports the module jaxsft.hf
                full = f"{node.module}.{alias.name}"
                out.append((full if full in known else node.module, id(node) not in top_level))
        elif isinstance(node, ast.Import):
            out.extend((a.name, id(node) not in top_level) for a in node.names if a.name.split(".")[0] == "jaxsft")
    return out


def graph():
    names = module_names()
    return names, {m: imports(p, set(names)) for m, p in names.items() if m not in OUTSIDE}


def test_every_import_goes_down_the_layers():
    table = layers()
    names, deps = graph()
    unplaced = sorted(m for m in deps if m != "jaxsft" and layer_of(m, table) is None)
    assert not unplaced, f"modules without a layer in docs/ARCHITECTURE.md: {unplaced}"
    upward = []
    for module, imported in deps.items():
        mine = layer_of(module, table)
        for target, _ in imported:
            theirs = layer_of(target, table)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    _, deps = graph()
    edges = {m: {t for t, _ in imported if t in deps and t != m} for m, imported in deps.items()}
    # a package's __init__ importing its own submodules is how packages work; a submodule importing
    # its package back (`from jaxsft.hf import names` inside jaxsft.hf.save) would close a cycle
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_module_size_and_deferred_imports():
    names, deps = graph()
    long = {m: n for m, p in names.items() if m not in OUTSIDE and (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
    deferred = [(m, t) for m, imported in deps.items() for t, later in imported if later]
    assert len(deferred) <= 10, f"{len(deferred)} deferred jaxsft imports: {deferred}"


def test_the_model_layer_knows_nothing_of_config_hf_or_the_run():
    """The rule the families and MoE work builds on: jaxsft.model imports only layer 0 and itself."""
    table = layers()
    _, deps = graph()
    for module, imported in deps.items():
        if module.startswith("jaxsft.model"):
            for target, _ in imported:
                assert layer_of(target, table) <= 1, f"{module} imports {target}"
