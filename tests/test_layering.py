"""Imports flow one way: tests -> bench -> training -> service.

Read from the source (every ``import`` and ``from ... import``, lazy ones inside functions
included), so a wrong import fails here before it breaks an installed wheel: the wheel holds
``service`` and ``training`` only, and ``bench``/``tests`` are not installed.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("service", "training", "bench", "tests")  # lowest first
# Inside the service: the framework-free core shared with training, and the HTTP edge.
FRAMEWORK_FREE = "service.inference"
HTTP_ONLY = ("fastapi", "starlette", "uvicorn", "prometheus_fastapi_instrumentator")
# The Ray Serve application: the only part of the service that imports Ray (the `scale` extra).
RAY_APP = "service.rayserve"


def imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved against
    ``package``, by default the package the file is in)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def sources(layer: str) -> list[Path]:
    """The Python files of one top-level package."""
    return sorted((REPO / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_no_module_imports_from_a_higher_layer(layer: str) -> None:
    higher = LAYERS[LAYERS.index(layer) + 1 :]
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sources(layer)
        for name in imported_modules(path)
        if name.split(".")[0] in higher
    }
    assert not wrong, sorted(wrong)


def test_the_inference_core_is_framework_free() -> None:
    """service.inference is shared with training: no web framework, no other service module."""
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sources(FRAMEWORK_FREE.replace(".", "/"))
        for name in imported_modules(path)
        if name.split(".")[0] in HTTP_ONLY
        or (name.startswith("service.") and not name.startswith(FRAMEWORK_FREE))
    }
    assert not wrong, sorted(wrong)


def test_below_the_api_nothing_speaks_http() -> None:
    """Decoding, segmenting and loading raise domain errors; only service.api maps them."""
    below = [p for p in sources("service") if "api" not in p.relative_to(REPO).parts]
    below = [p for p in below if p.name != "main.py"]  # main builds the app
    # ... and so does the Ray Serve ingress, on a Serve replica
    below = [p for p in below if "rayserve" not in p.relative_to(REPO).parts]
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in below
        for name in imported_modules(path)
        if name.split(".")[0] in HTTP_ONLY or name.startswith("service.api")
    }
    assert not wrong, sorted(wrong)


def test_only_the_ray_app_imports_ray() -> None:
    """The service core runs without Ray installed: only service.rayserve imports it, and no
    other module of the service imports service.rayserve."""
    ray_dir = RAY_APP.replace(".", "/")
    core = [p for p in sources("service") if not p.relative_to(REPO).as_posix().startswith(ray_dir)]
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in core
        for name in imported_modules(path)
        if name.split(".")[0] == "ray" or name.startswith(RAY_APP)
    }
    assert not wrong, sorted(wrong)
    assert any(
        name.split(".")[0] == "ray" for path in sources(ray_dir) for name in imported_modules(path)
    ), "the check looks at the right folder"


def test_the_wheel_holds_what_its_modules_import() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    packaged = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert packaged == ["service*", "training*"]


def test_the_checker_sees_the_imports_it_is_meant_to_catch(tmp_path: Path) -> None:
    """The AST walk finds lazy, dotted and relative imports alike."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import bench.flops\n"
        "from . import card\n"
        "from ..inference import tiling\n"
        "def later():\n"
        "    from tests.conftest import png_bytes\n"
    )
    names = imported_modules(probe, package="service.api")
    assert names == {"bench.flops", "service.api", "service.inference", "tests.conftest"}


def test_the_client_and_the_service_know_nothing_of_each_other() -> None:
    """``client/`` is its own distribution for labs' machines (no server dependencies): it
    imports no layer of the project, and the wheel's packages never import it."""
    client_files = sorted((REPO / "client" / "segment_client").rglob("*.py"))
    assert client_files
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in client_files
        for name in imported_modules(path, package="segment_client")
        if name.split(".")[0] in LAYERS
    }
    wrong |= {
        f"{path.relative_to(REPO)} imports {name}"
        for layer in ("service", "training")
        for path in sources(layer)
        for name in imported_modules(path)
        if name.split(".")[0] == "segment_client"
    }
    assert not wrong, sorted(wrong)


def project_modules(layers: tuple[str, ...] = ("service", "training")) -> dict[str, Path]:
    """Every module of ``layers`` by its dotted name (a package by its ``__init__``)."""
    found = {}
    for layer in layers:
        for path in sources(layer):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Which project modules each module imports (``from pkg import mod`` counts as
    importing ``pkg.mod``), lazy imports included."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for imported in imported_modules(path, package):
            if imported in modules:
                targets.add(imported)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
        graph[name] = targets - {name}
    return graph


def test_no_two_modules_import_each_other() -> None:
    """No import cycle in the service or the training pipeline (issue 25 found
    training.architectures and training.config importing each other)."""
    graph = import_graph(project_modules())
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_telemetry_and_the_core_know_nothing_of_the_domain() -> None:
    """service.core (settings, gate, budgets, telemetry) is below the domain: metrics are
    recorded by the use case or the API with plain values, never looked up from below."""
    wrong = {
        f"{path.relative_to(REPO)} imports {name}"
        for path in sources("service/core")
        for name in imported_modules(path)
        if name.startswith("service.") and not name.startswith("service.core")
    }
    assert not wrong, sorted(wrong)
