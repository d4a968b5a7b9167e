"""The package ships what `python -m waveglow_lib run` needs outside a clone: every subpackage, the notebooks
and the demo assets (a wheel is built and read, nothing installed)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import waveglow_lib
from waveglow_lib.notebook.runner import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(waveglow_lib.__file__).parent


def listed_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_listed():
    folders = {".".join(("waveglow_lib",) + p.parent.relative_to(PACKAGE).parts)
               for p in PACKAGE.rglob("__init__.py")}
    assert folders <= set(listed_packages()), sorted(folders - set(listed_packages()))


def test_the_wheel_holds_the_notebooks_and_the_demo_assets(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"waveglow_lib/notebooks/{n}" for n in NOTEBOOKS} <= names
    assert "waveglow_lib/assets/demo_waveglow.safetensors.gz" in names
    assert any(n.startswith("waveglow_lib/assets/demo_corpus/wavs/") for n in names)
    assert "waveglow_lib/backends/fast/engine.py" in names
