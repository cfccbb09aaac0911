"""The package's folders are its layers: every import runs down (or within a layer), no module imports itself back
through others, and the math and the networks import no framework.

    entry points (lightning_diffusion/*.py)  >  lightning/  >  networks/  >  core/

Imports are read from the source (every `import` and `from`, inside functions too), not by importing anything.
"""

import ast
import sys
from pathlib import Path

from helpers import ROOT

PACKAGE = "lightning_diffusion"
LAYERS = {"core": 0, "networks": 1, "lightning": 2}  # anything else in the package is an entry point: layer 3
# third-party packages a layer may import (the standard library is always allowed); None: any
THIRD_PARTY = {0: {"torch", "numpy", "scipy"}, 1: {"torch", "numpy", "scipy", "diffusers"}, 2: None, 3: None}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """0 for lightning_diffusion.core..., 1 networks, 2 lightning, 3 the package's own modules (entry points)."""
    parts = module.split(".")
    return LAYERS.get(parts[1], 3) if len(parts) > 1 else 3


def imports(path: Path, module: str, is_package: bool, known: set[str]) -> list[str]:
    """Absolute names of everything `path` imports: package modules resolved, others as their top-level name."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{source}.{alias.name}"
                found.append(candidate if candidate in known else source)
    return found


def violations(root: Path) -> list[str]:
    """Up-layer imports, cycles among the package's modules, and forbidden third-party imports, as messages."""
    files = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    known = set(files)
    graph, problems = {}, []
    stdlib = set(sys.stdlib_module_names)
    for module, path in sorted(files.items()):
        graph[module] = set()
        for name in imports(path, module, path.name == "__init__.py", known):
            top = name.split(".")[0]
            if top == PACKAGE:
                target = max((m for m in known if name == m or name.startswith(m + ".")), key=len, default=name)
                graph[module].add(target)
                if layer(target) > layer(module):
                    problems.append(f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})")
            elif top not in stdlib and THIRD_PARTY[layer(module)] is not None and top not in THIRD_PARTY[layer(module)]:
                problems.append(f"{module} (layer {layer(module)}) imports the framework {name}")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-import), by DFS."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return found


def test_the_package_imports_only_down_its_layers_without_cycles():
    assert violations(ROOT) == []


def test_an_up_layer_import_a_cycle_and_a_framework_in_the_math_are_found(tmp_path):
    """The checker itself: a deliberately broken copy of the layout is refused on all three counts."""
    pkg = tmp_path / PACKAGE
    for folder in ("core", "networks", "lightning"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "maths.py").write_text("import lightning\nfrom ..networks.unet import UNet\n")
    (pkg / "networks" / "unet.py").write_text("from ..core import maths\nUNet = None\n")
    (pkg / "lightning" / "a.py").write_text("from . import b\n")
    (pkg / "lightning" / "b.py").write_text("from .a import x\n")
    (pkg / "train.py").write_text("from .lightning import a\n")
    problems = violations(tmp_path)
    assert f"{PACKAGE}.core.maths (layer 0) imports {PACKAGE}.networks.unet (layer 1)" in problems
    assert f"{PACKAGE}.core.maths (layer 0) imports the framework lightning" in problems
    assert any(p.startswith("import cycle") and f"{PACKAGE}.lightning.a" in p and f"{PACKAGE}.lightning.b" in p
               for p in problems)
    assert any(p.startswith("import cycle") and f"{PACKAGE}.core.maths" in p for p in problems)
    assert not any(f"{PACKAGE}.train" in p for p in problems)  # an entry point may import any layer
