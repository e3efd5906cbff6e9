"""Per-token attribution of an answer versus one explanation per answer token, side by side in one run.

For a 32-token answer of SmolLM2 (generated greedily), the median time of

* ``separate``  - 32 calls of :func:`lxt_explicit.explain.explain`, one per answer token (the prompt
                  and the answer before it as prompt, that token as ``target=``),
* ``per_token`` - one call of :func:`lxt_explicit.per_token.explain_tokens` (one forward pass,
                  batched backward passes),

their ratio, and the largest absolute difference between the matrix rows and the separate
explanations: in float32 (the timed runs; the forward passes over prompt + answer and over a
prefix round differently; and against the same matrix with one backward pass per row, ``chunk=1``,
after the same forward pass) and in float64 (one extra run each, the separate explanations
written out in float64, since ``explain`` returns float32: rounding does not hide a difference of
method there).

Usage::

    python benchmarks/per_token.py                     # SmolLM2, 32-token answer, 3 repeats
    python benchmarks/per_token.py --smoke --output /tmp/out   # tiny synthetic model; the test suite

Results: ``benchmarks/results/per_token.json`` and ``per_token.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

from lxt_explicit.explain import explain  # noqa: E402
from lxt_explicit.per_token import explain_tokens  # noqa: E402
from lxt_explicit.presets import attnlrp  # noqa: E402
from lxt_explicit.targets import embedding_name  # noqa: E402

PROMPTS = {
    "smollm2": "The history of Paris, the capital of France, began",
    "tiny": "t5 t9 t3 t7 t2",
}


def load(name: str, dtype):
    """The model and tokenizer: ``'smollm2'`` or ``'tiny'`` (a synthetic Llama with a word tokenizer)."""
    if name == "smollm2":
        from lxt_explicit.models.smollm2 import load_smollm2

        return load_smollm2(dtype=dtype)
    model = common.synthetic_llama("tiny", dtype=dtype)
    return model, common.word_tokenizer(model.config.vocab_size)


def separate(model, tokenizer, matrix) -> list[torch.Tensor]:
    """One explanation per answer token through the public ``explain``, checked to see the same tokens."""
    rows = []
    for t in range(len(matrix)):
        end = matrix.prompt_length + t
        prefix = matrix.text + "".join(matrix.token_texts[matrix.prompt_length : end])
        explanation = explain(model, tokenizer, prefix, target=matrix.token_ids[end])
        if explanation.token_ids != matrix.token_ids[:end]:
            raise RuntimeError(f"the prefix of answer token {t} tokenizes differently; choose another prompt")
        rows.append(explanation.relevance)
    return rows


def literal_rows(model, matrix) -> list[torch.Tensor]:
    """The separate explanations written out, in the model's dtype (``explain`` returns float32): the
    AttnLRP composite registered, a forward pass over the prefix, a backward pass from the token's logit."""
    composite = attnlrp()
    composite.register(model)
    source = embedding_name(model)
    rows = []
    try:
        for t in range(len(matrix)):
            end = matrix.prompt_length + t
            with torch.enable_grad():
                logit = model(input_ids=torch.tensor([matrix.token_ids[:end]]), use_cache=False).logits[0, -1]
                value = logit[matrix.token_ids[end]]
                value.backward(value.detach())
            rows.append(composite.source_relevance()[source].detach().sum(-1)[0])
    finally:
        composite.remove()
    return rows


def max_difference(matrix, rows) -> float:
    """Largest absolute difference between the matrix rows and the separate explanations (zeros after each)."""
    worst = 0.0
    for t, row in enumerate(rows):
        end = matrix.prompt_length + t
        worst = max(worst, float((matrix.relevance[t, :end].double() - row.double()).abs().max()))
        worst = max(worst, float(matrix.relevance[t, end:].abs().max()))
    return worst


def run(name: str, answer: int, repeats: int, chunk: int) -> dict:
    common.set_threads()
    # the environment (commit, uncommitted changes) of the code that runs, recorded before it runs
    results = {"model": name, "answer_tokens": answer, "chunk": chunk, "repeats": repeats,
               "environment": common.environment()}
    for dtype in (torch.float32, torch.float64):
        model, tokenizer = load(name, dtype)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        generated = explain_tokens(model, tokenizer, PROMPTS[name], max_new_tokens=answer, stop="eos", chunk=chunk)
        if len(generated) != answer:
            raise RuntimeError(f"the answer has {len(generated)} tokens, not {answer}; choose another prompt")
        given = dict(continuation=generated.answer_text, stop="eos", chunk=chunk)
        matrix = explain_tokens(model, tokenizer, PROMPTS[name], **given)
        if matrix.token_ids != generated.token_ids:
            raise RuntimeError("the generated answer tokenizes differently as text; choose another prompt")
        key = str(dtype).removeprefix("torch.")
        rows = separate(model, tokenizer, matrix) if dtype == torch.float32 else literal_rows(model, matrix)
        results[f"max_abs_difference_{key}"] = max_difference(matrix, rows)
        results[f"max_abs_relevance_{key}"] = float(matrix.relevance.abs().max())
        if dtype == torch.float32:
            results["prompt_tokens"], results["answer"] = matrix.prompt_length, matrix.answer_text
            times = common.median_times(
                {"separate": lambda: separate(model, tokenizer, matrix),
                 "per_token": lambda: explain_tokens(model, tokenizer, PROMPTS[name], **given)},
                repeats, warmup=0, log=common.log,
            )
            results["times"] = times
            unbatched = explain_tokens(model, tokenizer, PROMPTS[name], **{**given, "chunk": 1})
            difference = (unbatched.relevance - matrix.relevance).abs().max()
            results["max_abs_difference_float32_unbatched"] = float(difference)
            results["ratio"] = times["per_token"]["median_s"] / times["separate"]["median_s"]
        common.log(f"{key}: {results}")
    return results


def markdown(results: dict, command: str) -> str:
    times = results["times"]
    lines = [
        "# Per-token attribution versus separate explanations",
        "",
        f"Model `{results['model']}`, prompt of {results['prompt_tokens']} tokens, answer of "
        f"{results['answer_tokens']} tokens ({results['answer']!r}); backward passes batched in chunks of "
        f"{results['chunk']} rows; median of {results['repeats']} runs, one CPU thread.",
        "",
        "| | time (s) |",
        "|---|---|",
        f"| {results['answer_tokens']} separate explanations | {times['separate']['median_s']:.2f} |",
        f"| one per-token matrix | {times['per_token']['median_s']:.2f} |",
        f"| ratio | **{results['ratio']:.2f}** |",
        "",
        "Largest absolute difference between the matrix rows and the separate explanations: "
        f"{results['max_abs_difference_float64']:.2g} in float64, {results['max_abs_difference_float32']:.2g} in "
        f"float32 (largest relevance {results['max_abs_relevance_float32']:.3g}; the forward passes over the whole "
        "sequence and over a prefix round differently in float32). Batched and one-at-a-time backward passes after "
        f"the same forward pass differ by {results['max_abs_difference_float32_unbatched']:.2g} in float32.",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny model, short answer, one repeat (test suite)")
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.answer, args.repeats = "tiny", 4, 1
    command = "python benchmarks/per_token.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(args.model, args.answer, args.repeats, args.chunk)
    results["command"] = command.strip()
    paths = common.write_results("per_token", results, markdown(results, command.strip()), args.output)
    common.log(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
