"""Sphinx configuration of the lxt_explicit API reference.

Build (warnings are errors, as in ``tests/test_docs.py``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document the working tree, also when it is not installed
os.environ.setdefault("OMP_NUM_THREADS", "1")

import lxt_explicit  # noqa: E402

project = "lxt_explicit"
author = "lxt_explicit contributors"
copyright = "lxt_explicit contributors"
release = lxt_explicit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Docstrings are numpydoc style.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_preprocess_types = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# Signatures show the names of defaults such as DEFAULT_EPSILON, not their values.
autodoc_preserve_defaults = True

default_role = "code"
templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Explicit-rule LRP for PyTorch transformers", "page_width": "1100px"}
