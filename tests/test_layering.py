"""The import graph of edgemed: no cycles (lazy imports included) and dependencies that point one way.

Built from the source with ``ast`` rather than by importing, so an import inside a function counts as much as one
at the top of a module: a cycle hidden by lazy imports is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgemed"

# (importer prefix, imported prefix, why it is forbidden); a prefix matches a module and its submodules
FORBIDDEN = [
    ("edgemed.archs", "edgemed.modeling", "archs are the bottom layer: facts about families, no loading"),
    ("edgemed.archs", "edgemed.backends", "archs are the bottom layer"),
    ("edgemed.archs", "edgemed.export", "archs are the bottom layer"),
    ("edgemed.modeling", "edgemed.backends", "modeling loads checkpoints; runtimes build on it"),
    ("edgemed.backends", "edgemed.parity", "runtimes do not check themselves"),
    ("edgemed.backends", "edgemed.evaluate", "runtimes do not check themselves"),
    ("edgemed.backends", "edgemed.serve", "runtimes know nothing of HTTP"),
    ("edgemed.parity", "edgemed.export", "checkers compare folders they are given; they never run an exporter"),
    ("edgemed.evaluate", "edgemed.export", "checkers never run an exporter"),
    ("edgemed.evaluate", "edgemed.parity", "eval and parity are siblings"),
    ("edgemed.parity", "edgemed.evaluate", "eval and parity are siblings"),
    ("edgemed.parity", "edgemed.serve", "checkers know nothing of HTTP"),
    ("edgemed.evaluate", "edgemed.serve", "checkers know nothing of HTTP"),
]
# exporters must not depend on the checkers or the commands (export.auto_quant is the one place that joins them)
for _top in ("edgemed.parity", "edgemed.evaluate", "edgemed.serve", "edgemed.demo"):
    FORBIDDEN.append(("edgemed.export", _top, "exporters do not depend on checkers or commands"))
JOINS = {"edgemed.export.auto_quant"}  # exports candidates, then judges them with parity and eval
for _mod in ("edgemed.archs", "edgemed.modeling", "edgemed.backends", "edgemed.parity", "edgemed.evaluate",
             "edgemed.export", "edgemed.serve", "edgemed.demo", "edgemed.data", "edgemed.manifest"):
    FORBIDDEN.append((_mod, "edgemed.cli", "the CLI is the top: nothing imports it"))

RUNTIMES = ("edgemed.backends.pytorch", "edgemed.backends.llamacpp", "edgemed.backends.onnx")
# who may import a runtime class directly instead of opening a folder with edgemed.backends.open_model
RUNTIME_IMPORTERS = ("edgemed.backends", "edgemed.export.imatrix")  # calibration runs the reference model


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """edgemed modules imported anywhere in ``path`` (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import edgemed.x.y as z` or a name inside a module
                t = t.rpartition(".")[0]
            if t.startswith("edgemed") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports_of(p, n, known) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _under(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, dsts in sorted(g.items()):
        for dst in sorted(dsts):
            for a, b, why in FORBIDDEN:
                if _under(src, a) and _under(dst, b) and not (src in JOINS and b != "edgemed.cli"):
                    bad.append(f"{src} imports {dst}: {why}")
            if dst in RUNTIMES and not any(_under(src, r) for r in RUNTIME_IMPORTERS):
                bad.append(f"{src} imports the runtime {dst}: open models with edgemed.backends.open_model")
    return bad


def test_the_checker_finds_a_cycle_and_a_forbidden_edge():
    """The contract bites: a planted cycle and a planted upward import are both reported."""
    planted = {"edgemed.a": {"edgemed.b"}, "edgemed.b": {"edgemed.c"}, "edgemed.c": {"edgemed.a"}, "edgemed.d": set()}
    assert cycles(planted) == [["edgemed.a", "edgemed.b", "edgemed.c"]]
    assert cycles({"edgemed.a": {"edgemed.b"}, "edgemed.b": set()}) == []
    upward = {"edgemed.parity.metrics": {"edgemed.export.gguf"}, "edgemed.serve.app": {"edgemed.backends.onnx"},
              "edgemed.export.onnx_quant": {"edgemed.evaluate"}, "edgemed.export.auto_quant": {"edgemed.parity"}}
    found = violations(upward)
    assert any("never run an exporter" in v for v in found) and any("open_model" in v for v in found), found
    assert any(v.startswith("edgemed.export.onnx_quant") for v in found), found
    assert not any(v.startswith("edgemed.export.auto_quant") for v in found), found  # the one join


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "edgemed"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from edgemed import other\n")
    (pkg / "other.py").write_text("")
    known = {"edgemed", "edgemed.sub", "edgemed.sub.leaf", "edgemed.other"}
    assert imports_of(pkg / "sub" / "__init__.py", "edgemed.sub", known) == {"edgemed.sub.leaf"}
    assert imports_of(pkg / "sub" / "leaf.py", "edgemed.sub.leaf", known) == {"edgemed.other"}


def test_edgemed_has_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles (lazy imports count): " + "; ".join(" <-> ".join(c) for c in found)


def test_dependencies_point_one_way():
    bad = violations(graph())
    assert not bad, "\n".join(bad)
