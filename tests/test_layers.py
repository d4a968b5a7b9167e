"""The package's dependencies run one way, the data's: a module imports only from the layers before it.

Every module is parsed (not imported): each `import` of a waveglow_lib module must point to an earlier
layer or to the module's own layer (a package importing its parts), and imports inside functions are
allowed only for optional third-party packages.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import waveglow_lib

#: the layers, first to last; a module belongs to the first entry that is its name or a parent package of it
LAYERS = [
    ("errors", "isa"), ("io",), ("records",), ("userkey",), ("layout",), ("safe_yaml", "runlock", "safe_reader"), ("config",), ("hardware",),
    ("audio",), ("metrics",), ("model",), ("checkpoint", "denoiser"), ("mel_input",),
    ("export", "convert"), ("backends",), ("batching",), ("train",), ("stamps",), ("jobs",), ("engines",),
    ("stages",),
    ("provenance",), ("evaluate",), ("bench",), ("notebook",), ("service",), ("cli", "__main__"),
    ("assets",),  # the scripts that regenerate the bundled demo model and corpus use the whole library
]
#: third-party packages that are optional extras (or platform-only): these may be imported inside functions;
#: core dependencies (pyproject.toml's `dependencies`) are imported at the top
OPTIONAL = {"onnx", "onnxruntime", "openvino", "papermill", "nbformat", "nbconvert", "nbclient", "jupyter_client",
            "traitlets", "IPython", "ipywidgets", "matplotlib", "pystoi", "pesq", "ais_bench", "resource", "ray",
            "starlette", "fastapi", "requests", "playwright", "jinja2", "torchaudio"}
PACKAGE_DIR = Path(waveglow_lib.__file__).parent


def modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(waveglow_lib.__path__, "waveglow_lib."))


def layer_of(module: str) -> int:
    parts = module.split(".")[1:] or ["__init__"]
    for index, names in enumerate(LAYERS):
        if parts[0] in names or parts[0].removesuffix(".py") in names:
            return index
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py (add it where it belongs)")


def source_of(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin)


def imports_of(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import statement of `module`."""
    path = source_of(module)
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                    if not child.module:  # `from . import x`: x is a module of that package
                        found.extend((f"{target}.{alias.name}", in_function, child.lineno) for alias in child.names)
                        continue
                else:
                    target = child.module
                found.append((target, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


@pytest.mark.parametrize("module", modules())
def test_imports_run_with_the_data(module):
    own = layer_of(module)
    problems = []
    for target, in_function, line in imports_of(module):
        top = target.split(".")[0]
        if top == "waveglow_lib":
            if target == "waveglow_lib":
                problems.append(f"line {line}: imports the package root (import the module itself)")
                continue
            other = layer_of(target)
            if other > own:
                problems.append(f"line {line}: imports {target} (layer {LAYERS[other]}) from layer {LAYERS[own]}")
            if in_function:
                problems.append(f"line {line}: imports {target} inside a function (a circle being dodged?)")
        elif in_function and top not in OPTIONAL and top not in ("importlib",):
            problems.append(f"line {line}: imports {target} inside a function; only optional packages may be")
    assert not problems, f"{module}:\n  " + "\n  ".join(problems)


def test_every_module_imports_cleanly():
    for module in modules():
        importlib.import_module(module)
