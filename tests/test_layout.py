"""The package's shape, kept: imports point down the floors, no circle, no module over 800 lines, fit() short.

The graph is built from the source with `ast`, deferred imports (inside functions) included, so a
circle cannot hide behind one. `python tests/test_layout.py` prints the figures the README quotes.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "qlora_lite"

# Each top-level module or wing of the package, on its floor: a module may import its own wing and
# anything on a lower floor, never a floor above or a sibling on its own floor. The README's Layout
# section draws the same floors.
FLOORS = {
    "errors": 0,
    "config": 1, "verify": 1,
    "folders": 2, "tiny": 2,
    "quant": 3, "safetensors_io": 3, "llama_cpp": 3,
    "memory": 4, "activations": 4,
    "doctor": 5, "sharding": 5,
    "data": 6,
    "demo": 7, "gguf_base": 7,
    "model_paths": 8,
    "methods": 9,
    "planner": 10, "generate": 10,
    "training": 11, "export": 11,
    "cli": 12, "__init__": 12,
    "__main__": 13,
}  # fmt: skip
MAX_MODULE_LINES = 800
MAX_FIT_LINES = 120
# Deferred imports of the package's own modules, where they are and why: cli.py imports each command's
# library inside its run_ function, so that `qlora-lite --help` does not import torch.
DEFERRED_ALLOWED = {"cli"}
# Benchmarks that must reach inside the package, and why (every other benchmark and notebook uses the public API only).
INTERNAL_ALLOWED = {
    "fsdp_loading.py": ["qlora_lite.training.fit"],  # wraps fit's load_model and run_step in a meter, from inside the run, as tests/training/dist_worker.py does
}


def list_modules() -> dict[str, Path]:
    """Dotted module names (without `qlora_lite.`; a package's __init__ by the package's name) -> file."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def read_imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module of the package, deferred?) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = [] if name == "__init__" else name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("qlora_lite"):
                target = node.module.removeprefix("qlora_lite").lstrip(".")
            else:
                continue
            targets = [f"{target}.{alias.name}".lstrip(".") for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name.removeprefix("qlora_lite").lstrip(".") for alias in node.names if alias.name.startswith("qlora_lite")]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from .x import name`: the module is x
                target = target.rpartition(".")[0]
            if target and target != name and target != "__init__":
                found.append((target, id(node) not in top_level))
    return found


def build_graph() -> dict[str, set[str]]:
    modules = list_modules()
    return {name: {target for target, _ in read_imports(name, path, modules)} for name, path in modules.items()}


def floor_of(module: str) -> int:
    top = module.split(".")[0]
    if top not in FLOORS:
        raise KeyError(f"qlora_lite/{top} is on no floor: add it to FLOORS in tests/test_layout.py and to the README's Layout section")
    return FLOORS[top]


def find_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def count_floors(graph: dict[str, set[str]]) -> int:
    """The longest chain of imports, in modules (the graph has no circle when this is asked)."""
    depth: dict[str, int] = {}

    def height(node: str) -> int:
        if node not in depth:
            depth[node] = 1 + max((height(nxt) for nxt in graph[node]), default=0)
        return depth[node]

    return max(height(node) for node in graph)


def find_functions() -> list[tuple[int, str]]:
    """(lines, module.function) of every function, longest first."""
    found = []
    for name, path in list_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(found, reverse=True)


# ---------------------------------------------------------------------------------------------------


def test_every_module_is_on_a_floor_and_imports_only_its_wing_or_lower_floors():
    graph = build_graph()
    upward = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if source.split(".")[0] != target.split(".")[0] and floor_of(target) >= floor_of(source)
    ]
    assert upward == [], f"imports that run up or sideways between floors: {upward}"


def test_no_circle_of_imports_counting_deferred_ones():
    assert find_circles(build_graph()) == []


def test_the_graph_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a made-up graph with the circle issue 21 removed (config -> methods -> config)."""
    graph = {"config": {"methods.table"}, "methods.table": {"config", "quant"}, "quant": {"config"}}
    assert find_circles(graph) == [["config", "methods.table", "quant"]]
    assert floor_of("methods.table") > floor_of("config")  # config -> methods.table is an upward import
    with pytest.raises(KeyError, match="add it to FLOORS"):
        floor_of("newwing.module")


def test_deferred_imports_of_the_package_only_where_they_keep_help_fast():
    modules = list_modules()
    deferred = sorted({name for name, path in modules.items() for _, late in read_imports(name, path, modules) if late})
    assert set(deferred) <= DEFERRED_ALLOWED, deferred


def test_wings_are_packages_and_no_module_is_over_800_lines():
    for wing in ("methods", "data", "training", "export"):
        assert (PACKAGE / wing / "__init__.py").is_file(), wing
    sizes = {name: len(path.read_text().splitlines()) for name, path in list_modules().items()}
    assert {name: size for name, size in sizes.items() if size > MAX_MODULE_LINES} == {}


def test_fit_reads_in_at_most_120_lines():
    lines = dict((name, size) for size, name in find_functions())
    assert lines["training.fit.fit"] <= MAX_FIT_LINES


def test_readme_layout_names_every_module():
    section = README_LAYOUT.search((REPO / "README.md").read_text()).group(0)
    missing = [f"{name.replace('.', '/')}.py" for name, path in list_modules().items() if path.name != "__init__.py" and f"{path.relative_to(PACKAGE)}" not in section]
    assert missing == [], f"the README's Layout section does not name {missing}"


README_LAYOUT = re.compile(r"^## Layout\n.*?(?=^## )", re.M | re.S)


# --- the public API -----------------------------------------------------------------------------------


def test_every_public_name_resolves():
    import qlora_lite

    for name in qlora_lite.__all__:
        assert getattr(qlora_lite, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qlora_lite.nope  # noqa: B018


def read_code_of(path: Path) -> ast.Module:
    """A benchmark's or a notebook's code (its code cells, shell and magic lines left out), parsed."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("!", "%")))
        return ast.parse(code)
    return ast.parse(path.read_text())


@pytest.mark.parametrize("path", sorted([*REPO.glob("notebooks/*.ipynb"), *REPO.glob("benchmarks/*.py")]), ids=lambda p: p.name)
def test_notebooks_and_benchmarks_import_only_the_public_api(path):
    import qlora_lite

    imports = [node for node in ast.walk(read_code_of(path)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    inside = [node.module for node in imports if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qlora_lite.")]
    inside += [alias.name for node in imports if isinstance(node, ast.Import) for alias in node.names if alias.name.startswith("qlora_lite.")]
    inside = [name for name in inside if name not in INTERNAL_ALLOWED.get(path.name, [])]
    assert inside == [], f"{path.name} imports {inside}: import from qlora_lite itself (its __init__ lists the API)"
    names = [alias.name for node in imports if isinstance(node, ast.ImportFrom) and node.module == "qlora_lite" for alias in node.names]
    assert [name for name in names if name not in qlora_lite.__all__] == []


def print_figures() -> None:
    graph = build_graph()
    functions = find_functions()
    sizes = sorted(((len(path.read_text().splitlines()), name) for name, path in list_modules().items()), reverse=True)
    print(f"modules {len(graph)}, floors (longest import chain) {count_floors(graph) if not find_circles(graph) else 'n/a'}, circles {find_circles(graph)}")
    print(f"longest functions: {functions[:5]}")
    print(f"largest modules: {sizes[:5]}")


if __name__ == "__main__":
    sys.exit(print_figures())
