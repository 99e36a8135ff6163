"""The package's layers: every import points to a lower layer or within its
own package, and no imports form a cycle (read from the source, function-
level imports included).

    0  _C, _native, errors, reference     the extension and its tables, leaves
    1  _tensors/                          structures, plans, validation: never communicates
    2  _comm/                             groups, collectives, gloo, NCCL: flat buffers only
    3  _algorithms/                       what SGD and EA share
    4  sgd, ea, checkpoint, _build_info   the public classes (and the package's __init__)
    5  elastic/                           elastic mode, over the public classes
    6  examples/

Because a lower layer is always imported first, its exit handlers run after
every upper layer's (atexit runs in reverse order of registration): the
algorithm objects close before the NCCL registry closes what is left.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distlearn_cuda"
LAYERS = {
    "_C": 0,
    "_native": 0,
    "errors": 0,
    "reference": 0,
    "_tensors": 1,
    "_comm": 2,
    "_algorithms": 3,
    "sgd": 4,
    "ea": 4,
    "diloco": 4,
    "checkpoint": 4,
    "_build_info": 4,
    "": 4,  # the package's __init__
    "elastic": 5,
    "examples": 6,
}


def module_name(path: Path) -> str:
    """'_comm.nccl' for distlearn_cuda/_comm/nccl.py; '' for the package's __init__."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """The package's modules ``path`` (module ``name``, by default its own)
    imports, relative to the package; a name imported from a package counts
    as its submodule when it is one."""
    name = module_name(path) if name is None else name
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").split(".")[0] == "distlearn_cuda":
                base = []
            else:
                continue
            module = node.module or ""
            if not node.level:
                module = module.removeprefix("distlearn_cuda").lstrip(".")
            target = ".".join([*base, *([module] if module else [])])
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                is_module = (PACKAGE / child.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE / child.replace(".", "/")
                ).is_dir()
                found.add(child if is_module or child == "_C" else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("distlearn_cuda."):
                    found.add(alias.name.removeprefix("distlearn_cuda."))
    found.discard(name)
    return found


def layer_of(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        assert module.split(".")[0] in LAYERS, f"{module}: add its package to LAYERS"


def points_up(module: str, target: str) -> bool:
    """Whether ``module`` importing ``target`` breaks the layering: a higher
    layer, or another package of the same layer (layers 0 and 4 are single
    modules, which may import each other; the cycle test covers them)."""
    if layer_of(target) != layer_of(module):
        return layer_of(target) > layer_of(module)
    return layer_of(module) not in (0, 4) and target.split(".")[0] != module.split(".")[0]


def test_imports_point_down_or_within_a_package() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if points_up(module, target)
    ]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_nothing_imports_under_type_checking_only() -> None:
    # A TYPE_CHECKING import is how a cycle hides; the layers leave none to hide.
    guarded = [str(p) for p in PACKAGE.rglob("*.py") if "if TYPE_CHECKING:" in p.read_text()]
    assert not guarded, guarded


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The reader itself: a layer-1 module importing a layer-2 one is found.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from ..errors import CommunicationError\n"
        "from .._comm import nccl as _nccl\n"
        "def f():\n    from ..sgd import AllReduceSGD\n"
    )
    found = imports_of(probe, "_tensors.probe")
    assert found == {"errors", "_comm.nccl", "sgd"}
    assert [t for t in sorted(found) if points_up("_tensors.probe", t)] == ["_comm.nccl", "sgd"]


def private_accesses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is neither ``self``, ``cls``, ``super()`` nor
    reached from a module imported by name (torch's privates, which a test
    of torch's version guards, are another matter): another object's
    private attribute."""
    tree = ast.parse(path.read_text())
    modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") and node.attr.endswith("__"):
            continue
        owner = node.value
        root = owner
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(owner, ast.Name) and owner.id in {"self", "cls"}:
            continue
        if isinstance(root, ast.Name) and root.id in modules:
            continue
        if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
            continue
        found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_elastic_mode_reaches_the_algorithms_through_declared_methods_only() -> None:
    # ElasticPort (_algorithms/member.py) declares what it may do beyond the public API.
    found = [a for p in sorted((PACKAGE / "elastic").glob("*.py")) for a in private_accesses(p)]
    assert not found, "private attributes of other objects:\n" + "\n".join(found)


def test_the_kernels_include_nothing_from_csrc() -> None:
    # kernels/ (the element ops and engines) sits below csrc/ (launchers,
    # bindings, the NCCL communicator), which includes it; never the reverse.
    kernels = PACKAGE.parent / "kernels"
    found = [
        f"{path.name}: {line.strip()}"
        for path in sorted(kernels.iterdir())
        for line in path.read_text().splitlines()
        if line.lstrip().startswith("#include") and "csrc" in line
    ]
    assert not found, found
