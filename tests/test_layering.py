"""The package's layers, bottom to top: a module imports from its own layer or from below, never from above; and no
two modules import each other, directly or through others.

Every module is parsed, not imported, and every import statement counts, at the top or inside a function: an import
moved into a function to dodge a cycle is still an upward import, or still a cycle. Modules named by string (the
package's lazy exports, the CLI's command table, the fork server's preload list) are outside this check.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Each installed package and the folder its sources are in (pyproject's package-dir).
SOURCES: dict[str, Path] = {"bridge": ROOT / "bridge", "bridge.models": ROOT / "models",
                            "bridge.converters": ROOT / "converters", "bridge.cli": ROOT / "cli"}

#: Bottom to top. `pkg.*` is a package with all its modules (its __init__ included); other names are single modules.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("bridge", "bridge.config", "bridge.layout", "bridge.mapping", "bridge.params", "bridge.sharding",
              "bridge.transforms", "bridge.errors", "bridge.checkpoint", "bridge.memory", "bridge.fused", "bridge.tiny",
              "bridge.hub", "bridge.processes")),
    ("models", ("bridge.models.*",)),
    ("converters", ("bridge.converters.*",)),
    ("data", ("bridge.data.*",)),  # the runtime: data, parallel and nn, where nn builds on parallel, never the reverse
    ("parallel", ("bridge.parallel.*",)),
    ("nn", ("bridge.nn.*",)),
    ("launch", ("bridge.launch",)),
    ("training", ("bridge.training.*",)),
    ("apps", ("bridge.apps.*", "bridge.rank_server")),
    ("api", ("bridge.api",)),
    ("cli", ("bridge.cli.*",)),
)

#: Modules whose layer is not the one their folder or the plain order suggests, each with its reason.
REASONS: dict[str, str] = {
    "bridge": "the package's __init__ imports no bridge module: its names (AutoBridge, ...) load on first use",
    "bridge.hub": "Hub ids and from_pretrained for data (tokenizers), models (config.json) and converters (import)",
    "bridge.launch": "under training: `bridge train --nproc` starts its ranks with it; it needs only parallel.state",
    "bridge.rank_server": "with the apps: the ranks' fork server preloads what they run (apps.verify); only by string",
}


def module_names() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    modules = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def layer_of(module: str) -> int:
    """Index in LAYERS of the one entry that names `module`."""
    found = [i for i, (_, names) in enumerate(LAYERS) for name in names
             if module == name.removesuffix(".*") or (name.endswith(".*") and module.startswith(name[:-1]))]
    assert len(found) == 1, f"{module} is in {len(found)} layers; LAYERS must name it once"
    return found[0]


def imported(tree: ast.AST, known: set[str]) -> list[tuple[int, str]]:
    """(line, bridge module) of every import in `tree`, in functions too; `from pkg import name` counts as pkg.name
    where that is a module, else as pkg."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"line {node.lineno}: a relative import; bridge imports by absolute names only"
            found += [(node.lineno, f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
                      for a in node.names]
    return [(line, name) for line, name in found if name == "bridge" or name.startswith("bridge.")]


def upward_imports(module: str, source: str, known: set[str]) -> list[str]:
    """`line: importer (layer) imports target (layer)` for each import of a higher layer."""
    own = layer_of(module)
    return [f"{line}: {module} ({LAYERS[own][0]}) imports {name} ({LAYERS[layer_of(name)][0]})"
            for line, name in imported(ast.parse(source), known) if layer_of(name) > own]


def import_graph() -> dict[str, set[str]]:
    """Module -> the bridge modules it imports."""
    modules = module_names()
    return {m: {name for _, name in imported(ast.parse(path.read_text()), set(modules))} - {m}
            for m, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in graph.get(todo.pop(), set()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_every_module_has_one_layer() -> None:
    for module in module_names():
        layer_of(module)


def test_no_module_imports_from_a_layer_above() -> None:
    modules = module_names()
    known = set(modules)
    upward = [f"{modules[m].relative_to(ROOT)}:{line}" for m in modules
              for line in upward_imports(m, modules[m].read_text(), known)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_an_upward_import_inside_a_function_is_caught() -> None:
    known = set(module_names())
    source = "def f():\n    from bridge.api import reshard\n"
    assert upward_imports("bridge.training.run", source, known) == [
        "2: bridge.training.run (training) imports bridge.api (api)"]


def test_every_reason_is_for_a_module_in_the_table() -> None:
    named = {name for _, names in LAYERS for name in names}
    assert set(REASONS) <= named


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a] if a in reachable(graph, b))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_command_line_starts_without_the_trainer() -> None:
    """Building the CLI (every command pays it at start) reads `bridge train`'s flags from bridge.training.config
    alone: the trainer's modules load only when a run starts, torch.distributed.checkpoint only for `torch_dist`."""
    import subprocess
    import sys

    code = ("import sys; from bridge.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('bridge.training.', 'bridge.nn', 'bridge.parallel',"
            " 'torch.distributed.checkpoint'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['bridge.training.config']", loaded
