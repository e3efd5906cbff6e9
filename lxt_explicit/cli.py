"""Command line: ``lxt-explicit explain`` and ``lxt-explicit audit``.

``lxt-explicit explain`` with no arguments loads the default model (SmolLM2-135M-Instruct,
converted once into the cache folder), lets it answer a built-in question about a built-in
document, explains the answer sentence with AttnLRP, prints a coloured heatmap of the prompt and
the most relevant tokens, and writes ``explanation.html``, ``explanation.png`` and
``explanation.json`` to the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

DTYPES = ("float32", "bfloat16", "float16", "float64")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lxt-explicit", description="Explain transformer predictions with AttnLRP.")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="explain a language model's answer (default: the built-in demo)")
    source = explain.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="a raw prompt (no chat template); the model continues it")
    source.add_argument("--context", help="a document the model answers a question about")
    source.add_argument("--context-file", type=Path, help="a text file with the document")
    explain.add_argument("--question", help="the question about the document (default: the demo's question)")
    explain.add_argument("--target", help="explain this continuation text instead of the model's own answer")
    explain.add_argument("--model", type=Path, help="a local Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    explain.add_argument("--method", choices=("attnlrp", "cp_lrp"), default="attnlrp")
    explain.add_argument("--dtype", choices=DTYPES, default="float32")
    explain.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    explain.add_argument("--max-new-tokens", type=int, default=40, help="length limit of the generated answer")
    explain.add_argument("--top", type=int, default=10, help="how many of the most relevant tokens to list")
    explain.add_argument("--output", type=Path, default=Path("lxt_explicit_output"), help="folder for the files")
    explain.add_argument("--no-png", action="store_true", help="skip the PNG heatmap")

    audit = commands.add_parser("audit", help="list every operation on a model's relevance path and its rule")
    audit.add_argument("--model", type=Path, help="a local Hugging Face model folder (default: SmolLM2-135M-Instruct)")
    audit.add_argument("--method", choices=("attnlrp", "cp_lrp"), default="attnlrp")
    audit.add_argument("--text", default="The capital of France is", help="example input")
    return parser


def _load(model_dir: Path | None, dtype: str, device: str):
    import torch
    from transformers.utils import logging as transformers_logging

    from .models.smollm2 import load_pretrained, load_smollm2

    transformers_logging.disable_progress_bar()  # this process only prints the explanation
    torch_dtype = getattr(torch, dtype)
    if model_dir is not None:
        return load_pretrained(model_dir, dtype=torch_dtype, device=device)
    return load_smollm2(dtype=torch_dtype, device=device)


def _run_explain(args) -> int:
    import torch

    from .data.demo import DEMO_CONTEXT, DEMO_QUESTION
    from .data.reading_comprehension import SYSTEM_PROMPT
    from .explain import explain
    from .heatmap import clean_tokens, html_heatmap, png_heatmap, terminal_heatmap

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    model, tokenizer = _load(args.model, args.dtype, args.device)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct'} ({args.dtype}, {args.device}), method: {args.method}")

    if args.prompt is not None:
        prompt, chat, system = args.prompt, False, None
        shown = args.prompt
    else:
        context = args.context_file.read_text() if args.context_file else (args.context or DEMO_CONTEXT)
        question = args.question or (DEMO_QUESTION if not (args.context or args.context_file) else None)
        if question is None:
            print("error: give --question with --context/--context-file", file=sys.stderr)
            return 2
        prompt, system = f"Context: {context.strip()}\nQuestion: {question}", SYSTEM_PROMPT
        shown = prompt
        chat = tokenizer.chat_template is not None
        if not chat:
            prompt += "\nAnswer:"
    kwargs = dict(chat=chat, system=system, method=args.method)
    if args.target is not None:
        kwargs["continuation"] = args.target
    else:
        kwargs["max_new_tokens"] = args.max_new_tokens
    result = explain(model, tokenizer, prompt, **kwargs)

    answer = "".join(clean_tokens(result.continuation)).strip()
    # show and rank the user's text (document and question), not the chat template around it
    try:
        span = result.token_span(shown)
    except ValueError:
        span = slice(0, result.prompt_length)
    prompt_tokens, prompt_relevance = result.tokens[span], result.relevance[span]
    print(f"\nanswer: {answer}")
    print(f"explained: {result.target}, value {result.target_value:.3f}, "
          f"relevance at the inputs / explained value: {result.conservation:.3f}\n")
    print(terminal_heatmap(prompt_tokens, prompt_relevance))
    print("\nmost relevant tokens of the prompt text:")
    for position, token, value in result.top_tokens(args.top, span=span):
        print(f"  {position:>5}  {clean_tokens([token])[0]!r:<24} {value:+.4f}")

    args.output.mkdir(parents=True, exist_ok=True)
    title = f"{args.method}: relevance for the answer {answer!r}"
    html_path = args.output / "explanation.html"
    html_path.write_text(html_heatmap(prompt_tokens, prompt_relevance, title=title, subtitle=result.target))
    written = [html_path]
    if not args.no_png:
        written.append(png_heatmap(prompt_tokens, prompt_relevance, args.output / "explanation.png", title=title))
    json_path = args.output / "explanation.json"
    json_path.write_text(json.dumps({"answer": answer, **result.to_dict()}, indent=1))
    written.append(json_path)
    print(f"\nwrote {', '.join(str(p) for p in written)} ({time.perf_counter() - started:.1f} s)")
    return 0


def _run_audit(args) -> int:
    import torch

    from .diagnostics import audit
    from .presets import attnlrp, cp_lrp

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tokenizer = _load(args.model, "float32", "cpu")
    inputs = tokenizer(args.text, return_tensors="pt")
    composite = (attnlrp if args.method == "attnlrp" else cp_lrp)()
    report = audit(model, composite, input_ids=inputs["input_ids"], use_cache=False)
    print(report)
    return 1 if report.unhandled else 0


def main(argv=None) -> int:
    """Entry point of the ``lxt-explicit`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _run_explain(args) if args.command == "explain" else _run_audit(args)
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
