"""The house's layering, read from the source: every import (module-level or inside a function) goes from a
layer to the same or a lower one, and no modules import each other in a cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer or any earlier one
LAYERS = [
    ("tokenizers_vis", "mmgen="),  # "name=": that module only, not its submodules
    ("mmgen.atomic", "mmgen.config", "mmgen.text", "mmgen.conditioning", "mmgen.data"),
    ("mmgen.models",),
    ("mmgen.sampling",),
    ("mmgen.paradigms", "mmgen.alignment", "mmgen.watermark"),
    ("mmgen.safe_save", "mmgen.zoo", "mmgen.options"),  # options: every call argument's check, used by the pipelines
    ("mmgen.pipelines",),
    ("mmgen.training", "mmgen.convert"),
    ("mmgen.eval",),
    ("mmgen.bench", "mmgen.serve"),
    ("mmgen.cli", "mmgen.__main__"),
]


def layer_of(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if module == p.rstrip("=") or (not p.endswith("=") and module.startswith(p + ".")):
                if best is None or len(p) > best[1]:
                    best = (rank, len(p))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every project module `path` imports, wherever the import statement sits."""
    tree = ast.parse(path.read_text())
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in ("mmgen", "tokenizers_vis")}


def project_modules() -> dict[str, Path]:
    # a shipped model's pipeline.py (mmgen/zoo/<name>/, not importable: the name has a hyphen) is data for
    # diffusers' custom-pipeline loading, not a module of the package
    files = [p for d in ("mmgen", "tokenizers_vis") for p in (ROOT / d).rglob("*.py")
             if all(part.isidentifier() for part in p.relative_to(ROOT).with_suffix("").parts)]
    return {module_name(p): p for p in files}


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: {i for i in imports(p) if i in mods and i != m} for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in project_modules() if layer_of(m) is None] == []


def test_no_import_reaches_up_a_layer():
    upward = sorted(f"{m} -> {i}" for m, deps in graph().items() for i in deps if layer_of(i) > layer_of(m))
    assert upward == []


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan); a package's __init__ importing its own
    submodules is not a cycle unless a submodule imports the package back."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer_of("mmgen.cli") > layer_of("mmgen.pipelines.registry") > layer_of("mmgen.paradigms.next_token")
