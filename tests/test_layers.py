"""The import graph against the declared layers (``setup.py``'s LAYERS, lowest first): a package
imports only itself and the packages below it - every import, module-level or inside a function;
``tests`` import anything but ``bench``, and nothing imports ``bench`` but itself."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _layers() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    (layers,) = [ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "LAYERS" for target in node.targets)]
    return layers


def _imports(package: str) -> list[tuple[str, str]]:
    """(file, imported top-level package) for every absolute import in ``package``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(ROOT)), alias.name.split(".")[0]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path.relative_to(ROOT)), node.module.split(".")[0]))
    return found


def test_every_package_imports_only_the_layers_below_it():
    layers = _layers()
    assert layers[-1] == "bench" and "tests" not in layers
    wrong = []
    for rank, package in enumerate(layers):
        allowed = set(layers[: rank + 1])
        wrong += [f"{file} imports {top}" for file, top in _imports(package) if top in layers and top not in allowed]
    wrong += [f"{file} imports bench" for file, top in _imports("tests") if top == "bench"]
    assert not wrong, "\n".join(wrong)


def test_the_layers_are_the_project_packages():
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages == set(_layers())
