"""Command line: ``lxt-explicit explain``, ``lxt-explicit audit`` and ``lxt-explicit explain-dataset``.

``lxt-explicit explain`` with no arguments loads the default model (SmolLM2-135M-Instruct,
converted once into the cache folder), lets it answer a built-in question about a built-in
document, explains the answer with AttnLRP, prints a coloured heatmap of the prompt and the most
relevant tokens, and writes ``explanation.html``, ``explanation.png`` and ``explanation.json`` to
the output folder (``explain-dataset`` explains every row of a JSON Lines file:
:mod:`lxt_explicit.cli_dataset`).  A generated answer is explained up to the end of its first sentence or line
(or the model's end of sequence); ``--full-continuation`` explains everything generated.

Every mistake in the command (a missing model folder or context file, an empty prompt, an
unavailable device, an output folder that cannot be written, ...) prints one line on stderr that
names the problem and the fix, and exits with code 2; the arguments, the device and the output
folder are checked before the model is loaded and the explanation computed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

#: The ``--method`` choices: the keys of :data:`lxt_explicit.explain.METHODS` (not imported here: no torch at startup).
METHOD_NAMES = ("attnlrp", "attnlrp_sinks", "cp_lrp")

__all__ = ["UsageError", "main"]

DTYPES = ("float32", "bfloat16", "float16", "float64")
OUTPUT_FILES = ("explanation.html", "explanation.png", "explanation.json")
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


class UsageError(Exception):
    """A mistake in the command: its message names the problem and the fix (exit code 2, no traceback)."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as :class:`UsageError` (one line), not argparse's usage text and exit."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a number of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lxt-explicit", description="Explain transformer predictions with AttnLRP.")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="explain a language model's answer (default: the built-in demo)")
    source = explain.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="a raw prompt (no chat template); the model continues it")
    source.add_argument("--context", help="a document the model answers a question about")
    source.add_argument("--context-file", type=Path, help="a UTF-8 text file with the document")
    explain.add_argument("--question", help="the question about the document (default: the demo's question)")
    explain.add_argument("--target", help="explain this continuation text instead of the model's own answer")
    explain.add_argument("--model", type=Path, help=f"a local Hugging Face model folder (default: {DEFAULT_MODEL})")
    explain.add_argument("--method", choices=METHOD_NAMES, default="attnlrp",
                         help="attnlrp: the paper's rules; attnlrp_sinks: with the attention-sink gate; cp_lrp")
    explain.add_argument("--dtype", choices=DTYPES, default="float32")
    explain.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    explain.add_argument("--max-new-tokens", type=_positive, default=40, help="length limit of the generated answer")
    explain.add_argument("--full-continuation", action="store_true",
                         help="explain everything generated, not only the answer up to its first sentence or line")
    explain.add_argument("--top", type=_positive, default=10, help="how many of the most relevant tokens to list")
    explain.add_argument("--output", type=Path, default=Path("lxt_explicit_output"), help="folder for the files")
    explain.add_argument("--no-png", action="store_true", help="skip the PNG heatmap")

    audit = commands.add_parser("audit", help="list every operation on a model's relevance path and its rule")
    audit.add_argument("--model", type=Path, help=f"a local Hugging Face model folder (default: {DEFAULT_MODEL})")
    audit.add_argument("--method", choices=METHOD_NAMES, default="attnlrp")
    audit.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    audit.add_argument("--text", default="The capital of France is", help="example input")

    from .cli_dataset import add_parser

    add_parser(commands, positive=_positive, dtypes=DTYPES, default_model=DEFAULT_MODEL)
    return parser


# ------------------------------------------------------------------------------------ checks before any work


_WHAT = {
    "--prompt": 'the text the model should continue, e.g. --prompt "The capital of France is"',
    "--context": "the document the model should answer a question about",
    "--question": "the question about the document",
    "--target": "the continuation text to explain, or leave --target out to explain the model's own answer",
    "--text": "an example input for the audit",
}


def _check_not_empty(**values: str | None) -> None:
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is not None and not value.strip():
            raise UsageError(f"{flag} is empty; give {_WHAT[flag]}")


def _read_context(path: Path) -> str:
    if not path.exists():
        raise UsageError(f"--context-file {path} does not exist; give the path of a text file with the document")
    if path.is_dir():
        raise UsageError(f"--context-file {path} is a folder; give the path of a text file with the document")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--context-file {path} is not UTF-8 text; save the document as UTF-8") from None
    except OSError as error:
        raise UsageError(f"--context-file {path} cannot be read ({error.strerror}); check its permissions") from None
    if not text.strip():
        raise UsageError(f"--context-file {path} is empty; give a file with the document")
    return text


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data, so nothing can be computed on it; use cpu or cuda")
    if device.type == "cpu":
        return
    try:
        torch.empty(1, device=device)
    except Exception as error:  # torch raises RuntimeError, AssertionError or NotImplementedError here
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--device {name} is not available on this machine ({reason}); use --device cpu") from None


def _check_output(folder: Path) -> None:
    """The result files can be written into ``folder`` (checked without creating it)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output {folder} is a file; give a folder for the result files (created if missing)")
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output {folder} cannot be created because {existing} is a file; give another folder")
    for name in OUTPUT_FILES:
        if (folder / name).is_dir():
            raise UsageError(f"--output {folder}: {folder / name} is a folder, so the file cannot be written; "
                             "remove it or give another folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(f"--output {folder}: cannot write in {existing} ({error.strerror}); "
                         "give a folder you can write to") from None


def _check_explain_arguments(args) -> tuple[str, str] | None:
    """Everything that can be checked before loading the model; returns ``(document, question)`` or ``None``."""
    _check_not_empty(prompt=args.prompt, context=args.context, question=args.question, target=args.target)
    context = _read_context(args.context_file) if args.context_file is not None else args.context
    if context is not None and args.question is None:
        raise UsageError("give --question with --context/--context-file (the question the model should answer)")
    _check_device(args.device)
    _check_output(args.output)
    if not args.no_png and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("the PNG heatmap needs matplotlib: pip install matplotlib, or pass --no-png")
    if args.prompt is not None:
        return None
    from .data.demo import DEMO_CONTEXT, DEMO_QUESTION

    return (context, args.question) if context is not None else (DEMO_CONTEXT, args.question or DEMO_QUESTION)


# ------------------------------------------------------------------------------------ model


@contextlib.contextmanager
def _quiet_transformers():
    """No transformers progress bars while loading (this process prints the explanation); restored after."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _load(model_dir: Path | None, dtype: str, device: str):
    """``(model, tokenizer, description)``; a folder or package that cannot be loaded is a :class:`UsageError`."""
    import torch

    from .models.smollm2 import PACKAGE, MissingModelPackageError, load_pretrained, smollm2_folder

    folder = model_dir
    try:
        with _quiet_transformers():
            folder = smollm2_folder() if model_dir is None else model_dir
            model, tokenizer = load_pretrained(folder, dtype=getattr(torch, dtype), device=device)
    except MissingModelPackageError as error:
        raise UsageError(str(error)) from None
    except FileNotFoundError as error:
        raise UsageError(f"--model: {error}" if model_dir is not None else str(error)) from None
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--model {folder} cannot be loaded as a causal language model with its tokenizer "
                         f"({reason}); give a folder written by save_pretrained") from None
    name = DEFAULT_MODEL if model_dir is None else str(model_dir)
    description = {"name": name, "folder": str(Path(folder).absolute()), "dtype": dtype, "device": device}
    if model_dir is None:
        description["package"] = PACKAGE
    return model, tokenizer, description


# ------------------------------------------------------------------------------------ explain


def _request(args, document: tuple[str, str] | None, tokenizer) -> tuple[str, str, dict]:
    """The prompt, the part of it to show (the user's text), and the keyword arguments of ``explain``."""
    from .data.reading_comprehension import SYSTEM_PROMPT
    from .stabilizer import DEFAULT_EPSILON

    if document is None:
        prompt, chat, system = args.prompt, False, None
        shown = prompt
    else:
        context, question = document
        prompt, system = f"Context: {context.strip()}\nQuestion: {question}", SYSTEM_PROMPT
        shown = prompt
        chat = tokenizer.chat_template is not None
        if not chat:
            prompt += "\nAnswer:"
    kwargs = dict(chat=chat, system=system, method=args.method, epsilon=DEFAULT_EPSILON)
    if args.target is not None:
        kwargs["continuation"] = args.target
    else:
        kwargs["max_new_tokens"] = args.max_new_tokens
        kwargs["stop"] = "eos" if args.full_continuation else "sentence"
    return prompt, shown, kwargs


def _shown_span(result, shown: str) -> slice:
    """The user's text (document and question) in the prompt, without the chat template around it."""
    try:
        return result.token_span(shown)
    except ValueError:
        return slice(0, result.prompt_length)


def _print_result(result, span: slice, top: int) -> None:
    from .heatmap import terminal_heatmap

    print(f"\nanswer: {result.continuation_text.strip()}")
    if result.stop_reason in ("sentence", "line"):
        print(f"cut: the answer ends with its first {result.stop_reason}; the {len(result.discarded_ids)} generated "
              f"tokens after it are not explained: {result.discarded_text!r} (--full-continuation explains them)")
    print(f"explained: {result.target}, value {result.target_value:.3f}, "
          f"relevance at the inputs / explained value: {result.conservation:.3f}\n")
    print(terminal_heatmap(result.token_texts[span], result.relevance[span], clean=False))
    print("\nmost relevant tokens of the prompt text:")
    for position, text, value in result.top_tokens(top, span=span):
        print(f"  {position:>5}  {text!r:<24} {value:+.4f}")


def _record(args, model: dict, prompt: str, kwargs: dict, result, tokenizer) -> dict:
    """Everything ``explanation.json`` holds: the result and what it takes to reproduce it."""
    import torch
    import transformers

    from . import __version__
    from .sinks import sink_shares

    return {
        "answer": result.continuation_text.strip(),
        "model": model,
        "versions": {"lxt_explicit": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command": ["lxt-explicit", *args.argv],
        "explain_arguments": {"prompt": prompt, **kwargs},
        **result.to_dict(),
        "relevance_shares": sink_shares(result, tokenizer),
    }


def _write_files(result, span: slice, args, record: dict) -> list[Path]:
    from .heatmap import html_heatmap, png_heatmap

    args.output.mkdir(parents=True, exist_ok=True)
    tokens, relevance = result.token_texts[span], result.relevance[span]
    title = f"{result.method}: relevance for the answer \u201c{record['answer']}\u201d"
    html_path = args.output / "explanation.html"
    html_path.write_text(html_heatmap(tokens, relevance, title=title, subtitle=result.target, clean=False),
                         encoding="utf-8")
    written = [html_path]
    if not args.no_png:
        written.append(png_heatmap(tokens, relevance, args.output / "explanation.png", title=title, clean=False))
    json_path = args.output / "explanation.json"
    json_path.write_text(json.dumps(record, indent=1, allow_nan=False, ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, json_path]


def _run_explain(args) -> int:
    import torch

    from .explain import explain

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    document = _check_explain_arguments(args)
    model, tokenizer, description = _load(args.model, args.dtype, args.device)
    print(f"model: {description['name']} ({args.dtype}, {args.device}), method: {args.method}")
    prompt, shown, kwargs = _request(args, document, tokenizer)
    try:
        result = explain(model, tokenizer, prompt, **kwargs)
    except ValueError as error:
        raise UsageError(str(error)) from None
    span = _shown_span(result, shown)
    _print_result(result, span, args.top)
    written = _write_files(result, span, args, _record(args, description, prompt, kwargs, result, tokenizer))
    print(f"\nwrote {', '.join(str(p) for p in written)} ({time.perf_counter() - started:.1f} s)")
    return 0


def _run_audit(args) -> int:
    import torch

    from .diagnostics import audit
    from .explain import METHODS

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    _check_not_empty(text=args.text)
    _check_device(args.device)
    model, tokenizer, _ = _load(args.model, "float32", args.device)
    inputs = tokenizer(args.text, return_tensors="pt").to(args.device)
    if inputs["input_ids"].shape[1] == 0:
        raise UsageError(f"--text {args.text!r} gives no tokens; give an example input the tokenizer keeps")
    composite = METHODS[args.method]()
    report = audit(model, composite, input_ids=inputs["input_ids"], use_cache=False)
    print(report)
    return 1 if report.unhandled else 0


def main(argv=None) -> int:
    """Entry point of the ``lxt-explicit`` console script; returns the exit code (2: a mistake in the command)."""
    arguments = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = _parser().parse_args(arguments)
        args.argv = arguments
        if args.command == "explain-dataset":
            from .cli_dataset import run

            return run(args)
        return _run_explain(args) if args.command == "explain" else _run_audit(args)
    except UsageError as error:
        print(f"lxt-explicit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(f"lxt-explicit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
