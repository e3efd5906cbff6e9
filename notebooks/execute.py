"""Execute the tutorial notebooks in place, so that they are checked in with their outputs.

Usage (from the repository root, in the project's virtual environment)::

    python notebooks/execute.py                      # all notebooks
    python notebooks/execute.py 02_composites        # some of them

Each notebook runs top to bottom in a fresh kernel of this interpreter with one CPU thread; the
first error stops it (the notebook is written anyway, with the error, for inspection).
``tests/test_notebooks.py`` runs them again and checks the checked-in outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def execute(path: Path) -> float:
    """Run the notebook at ``path`` in place and return the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        nbformat.write(notebook, path)
    return time.perf_counter() - start


def main(names: list[str]) -> int:
    paths = [HERE / f"{name.removesuffix('.ipynb')}.ipynb" for name in names] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
