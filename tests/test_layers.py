"""The project's modules form layers without cycles: the import graph of scaling/, analysis/ and the Hydra plugins
(hydra_plugins/dit_scaling), read from their source with imports inside functions counted too, has no cycle; and
no module reaches into Hydra's or submitit's private internals."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("scaling", "analysis", "hydra_plugins")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the project's modules it imports anywhere in its source}."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name and t not in PACKAGES}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for dep in sorted(graph[node]):
            if colour.get(dep) == "grey":
                return stack[stack.index(dep):] + [dep]
            if dep not in colour and (cycle := visit(dep)):
                return cycle
        colour[node] = "black"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_layers():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"scaling.train", "scaling.config", "scaling.launch", "analysis.figures",
            "hydra_plugins.dit_scaling.sweeper"} <= set(graph)
    assert "scaling.rundir" in graph["scaling.train"]  # imports are seen
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_only_public_interfaces_of_hydra_and_submitit():
    private = ("hydra._internal", "._sub_jobs", "._return_value", "_return_value=", "._executor")
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            for name in private:
                assert name not in text, f"{path.relative_to(ROOT)} uses {name}"
