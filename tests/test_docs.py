"""The API reference builds from the numpydoc docstrings without a single Sphinx warning, and covers every module."""

import importlib
import importlib.util
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lxt_explicit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def documented_modules() -> set[str]:
    names = set()
    for page in DOCS.rglob("*.rst"):
        names.update(re.findall(r"^\.\. automodule:: (\S+)", page.read_text(), flags=re.M))
    return names


def test_every_module_of_the_package_has_an_api_page():
    modules = {"lxt_explicit"} | {
        info.name for info in pkgutil.walk_packages(lxt_explicit.__path__, "lxt_explicit.")
    }
    # Subpackages whose __init__ only holds a docstring are covered by their modules' pages.
    modules -= {"lxt_explicit.models", "lxt_explicit.data"}
    missing = sorted(modules - documented_modules())
    assert not missing, f"add an API page (docs/api/NAME.rst with '.. automodule:: NAME') for: {missing}"


def test_every_name_in_a_modules_all_exists():
    # autodoc documents a module's __all__ and silently leaves out names that do not exist
    for info in [None, *pkgutil.walk_packages(lxt_explicit.__path__, "lxt_explicit.")]:
        module = lxt_explicit if info is None else importlib.import_module(info.name)
        missing = [name for name in getattr(module, "__all__", ()) if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ lists names the module does not define: {missing}"


def test_sphinx_builds_the_api_reference_without_warnings(tmp_path):
    if importlib.util.find_spec("sphinx") is None:
        pytest.skip("Sphinx is not installed (pip install sphinx): the API reference cannot be built")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"sphinx-build failed or warned:\n{result.stderr[-6000:]}\n{result.stdout[-2000:]}"
    for page in ("index.html", "api/functional.html", "api/composite.html", "api/explain.html"):
        assert (tmp_path / "html" / page).is_file(), page
    # The docstrings were really rendered (autodoc imported the modules), not just the page titles.
    functional = (tmp_path / "html" / "api" / "functional.html").read_text()
    assert "lxt_explicit.functional.linear_epsilon" in functional and "AttnLRP Eq. 8" in functional
