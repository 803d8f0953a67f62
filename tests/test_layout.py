"""The package's layers, checked on its source: each layer imports only the layers below it, and
the module-level imports have no cycles (so a newcomer can read the tree top-down)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "innsteer"
LAYERS = ("core", "datasets", "hf", "eval", "llama", "serve", "cli")  # bottom to top


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module imported, whether at module level) for every import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    # `if TYPE_CHECKING:` imports are for annotations only: never executed, so never a cycle
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from . import x` names submodule x (the package itself is already being imported)
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            found += [(module, id(node) in top_level) for module in submodules or [target]]
    return found


def layer(module: str):
    parts = module.split(".")
    if parts[0] == "innsteer_ext":
        return -1
    if parts[0] != "innsteer" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return LAYERS.index(parts[1])


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py")


MODULES = {module_name(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_sits_in_a_layer():
    strays = [module_name(p) for p in sources() if layer(module_name(p)) is None]
    assert strays == [], f"modules outside the layers {LAYERS}: {strays}"


def upward_imports(path: Path) -> list[str]:
    source = module_name(path)
    return [
        f"{source} imports {target}"
        for target, _ in imports(path)
        if layer(target) is not None and layer(target) > layer(source)
    ]


def test_no_layer_imports_a_layer_above_it():
    assert [line for path in sources() for line in upward_imports(path)] == []


def test_the_compiled_ops_do_not_import_the_package():
    for path in (ROOT / "innsteer_ext").glob("*.py"):
        text = path.read_text()
        assert "import innsteer\n" not in text and "from innsteer " not in text and "from innsteer." not in text, path


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (module -> modules it imports), each as a closed path."""
    visiting, done, found = set(), set(), []

    def visit(node, stack):
        visiting.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in visiting:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    return found


def import_graph() -> dict[str, set[str]]:
    """Every import between the package's modules, at module level or inside a function: a function-level
    import back into a module that imports this one is still a cycle a reader has to untangle."""
    return {module_name(path): {t for t, _ in imports(path) if t in MODULES} for path in sources()}


def test_imports_have_no_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_function_level_cycle():
    """The check itself can fail: a function-level import back into the importing module is caught."""
    fake = PACKAGE / "hf" / "_layout_probe.py"
    assert not fake.exists()
    try:
        fake.write_text("from . import models\n\n\ndef f():\n    from . import fit\n")
        graph = import_graph()
        graph["innsteer.hf.fit"] = graph["innsteer.hf.fit"] | {"innsteer.hf._layout_probe"}
        assert [set(cycle) for cycle in cycles(graph)] == [{"innsteer.hf._layout_probe", "innsteer.hf.fit"}]
    finally:
        fake.unlink()


def test_the_checker_sees_an_upward_import():
    """The check itself can fail: a core module importing the CLI is caught."""
    fake = PACKAGE / "core" / "_layout_probe.py"
    assert not fake.exists()
    try:
        fake.write_text("from ..cli import main\n")
        assert upward_imports(fake) == ["innsteer.core._layout_probe imports innsteer.cli.main"]
    finally:
        fake.unlink()
