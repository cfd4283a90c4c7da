"""Dependencies point one way: no import cycle in nucleusx_jax/, counting imports inside functions too, between
modules and between subpackages (train/, data/, kernels/ taken whole)."""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parent.parent / "nucleusx_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: Set[str]) -> Set[str]:
    """Every nucleusx_jax module that ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]  # trimmed to a module below
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from .x import y`: y is a name in module x
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> Dict[str, Set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One cycle as a list of nodes, or []."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def unit(module: str) -> str:
    """The module, or its subpackage (``nucleusx_jax.train.loop`` -> ``nucleusx_jax.train``)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_no_import_cycle_between_modules():
    edges = graph()
    assert {"nucleusx_jax.model", "nucleusx_jax.train.loop", "nucleusx_jax.convert"} <= set(edges)
    assert "nucleusx_jax.runs" in edges["nucleusx_jax.convert"]  # the walker sees imports
    assert find_cycle(edges) == []


def test_no_import_cycle_between_subpackages():
    edges: Dict[str, Set[str]] = {}
    for module, targets in graph().items():
        edges.setdefault(unit(module), set()).update(unit(t) for t in targets if unit(t) != unit(module))
    edges.pop("nucleusx_jax", None)  # the package __init__ only re-exports
    assert find_cycle(edges) == []


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_only_the_adapter_imports_transformers():
    users = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "transformers" for n in names):
                users.add(module_name(path))
    # tokenizer: HF tokenizer dirs, optional; the PyTorch model is transformers remote code
    assert users <= {"nucleusx_jax.hf", "nucleusx_jax.tokenizer", "nucleusx_jax.torch",
                     "nucleusx_jax.remote_code.configuration_nucleus_x",
                     "nucleusx_jax.remote_code.modeling_nucleus_x"}, users


def imported_names(path: Path):
    """(absolute module names, relative ``from .x`` names) that ``path`` imports, anywhere in the file."""
    absolute, relative = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            absolute.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            (relative if node.level else absolute).add(("." * node.level) + (node.module or ""))
    return absolute, relative


def test_the_pytorch_model_imports_no_jax_and_the_shipped_files_only_each_other():
    for sub in ("torch", "remote_code"):
        for path in sorted((PACKAGE / sub).glob("*.py")):
            absolute, relative = imported_names(path)
            roots = {n.split(".")[0] for n in absolute}
            assert not roots & {"jax", "jaxlib", "flax", "optax", "orbax", "nucleusx_jax"}, (path, roots)
            if sub == "remote_code" and path.name != "__init__.py":  # shipped as remote code: self-contained
                assert relative <= {".configuration_nucleus_x"}, (path, relative)
                assert roots <= {"math", "typing", "torch", "transformers"}, (path, roots)


def reaches(edges: Dict[str, Set[str]], start: str) -> Set[str]:
    """Every module that ``start`` imports, directly or through others."""
    seen: Set[str] = set()
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_core_model_does_not_import_the_converter_or_the_trainer():
    edges = graph()
    assert "nucleusx_jax.pretrained" in edges["nucleusx_jax.model"]  # the walker sees this edge
    for core in ("nucleusx_jax.model", "nucleusx_jax.pretrained", "nucleusx_jax.losses", "nucleusx_jax.modeling"):
        assert not reaches(edges, core) & {"nucleusx_jax.convert", "nucleusx_jax.train.loop"}, core
    # persistence knows files, not the model object; the losses know no linen module
    assert "nucleusx_jax.model" not in reaches(edges, "nucleusx_jax.pretrained")
    assert "nucleusx_jax.modeling" not in reaches(edges, "nucleusx_jax.losses")
