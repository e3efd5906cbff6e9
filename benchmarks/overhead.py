"""Cost of one explanation versus a plain gradient, side by side in one run.

For each model and sequence length: the median time of

* ``forward``   - a forward pass without gradients,
* ``gradient``  - forward + backward of the explained logit with respect to the input embeddings
                  (parameters frozen, as in every method here),
* ``attnlrp``   - forward + relevance backward with ``lxt_explicit.attnlrp()`` registered,
* ``cp_lrp``    - the same with ``lxt_explicit.cp_lrp()``,

the peak extra memory of each (resident memory above the loaded model, each method in a fresh
process), and the bytes autograd saves for the backward pass.  The explained quantity is the largest
logit at the last position, with the logits of all positions computed (the default of transformers).

Usage::

    python benchmarks/overhead.py                      # small synthetic Llama and SmolLM2, 128-1024 tokens
    python benchmarks/overhead.py --models small --lengths 128 256 --repeats 3
    python benchmarks/overhead.py --smoke --output /tmp/out   # seconds; used by the test suite

Results: ``benchmarks/results/overhead.json`` and ``overhead.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

import lxt_explicit as lxt  # noqa: E402

METHODS = ("forward", "gradient", "attnlrp", "cp_lrp")


def make_runner(model, method: str, input_ids: torch.Tensor):
    """A function that runs one measurement of ``method`` and returns nothing."""
    if method == "forward":

        def run():
            with torch.no_grad():
                model(input_ids=input_ids, use_cache=False)

        return run
    if method == "gradient":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        embedding = model.get_input_embeddings()

        def run():
            embeds = embedding(input_ids).detach().requires_grad_()
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            logits[0, -1].max().backward()
            return embeds.grad

        return run
    composite = (lxt.attnlrp if method == "attnlrp" else lxt.cp_lrp)()

    def run():
        # registration is part of every explanation, so that the other methods run on the plain model
        with composite.context(model):
            logits = model(input_ids=input_ids, use_cache=False).logits
            target = logits[0, -1].max()
            target.backward(target.detach())
            return composite.source_relevance()

    return run


def measure_memory(model_name: str, method: str, length: int) -> dict:
    """Peak resident memory above the loaded model for one run of ``method`` (run in a fresh process).

    A short run first pages in the weights (loaded lazily from disk) and does the first-call work,
    so that neither is counted; the peak is read after resetting it (``VmHWM``).
    """
    common.set_threads()
    model, _ = common.load_model(model_name)
    generator = torch.Generator().manual_seed(0)
    make_runner(model, method, torch.randint(0, model.config.vocab_size, (1, 8), generator=generator))()
    input_ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator.manual_seed(0))
    run = make_runner(model, method, input_ids)
    with common.SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
        measured = common.extra_peak_memory(run)
    return {"extra_peak_bytes": measured["extra_peak_bytes"], "saved_bytes": saved.total}


def benchmark(model_names, lengths, repeats, memory=True, log=common.log) -> dict:
    common.set_threads()
    results = {"environment": common.environment(), "models": {}}
    for model_name in model_names:
        model, description = common.load_model(model_name)
        log(f"{model_name}: {description}")
        rows = []
        for length in lengths:
            input_ids = torch.randint(
                0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0)
            )
            runners = {method: make_runner(model, method, input_ids) for method in METHODS}
            times = common.median_times(runners, repeats)
            row = {"length": length, "time_s": {m: times[m]["median_s"] for m in METHODS}}
            if memory:
                row["memory"] = {
                    m: common.measure_in_subprocess(
                        Path(__file__), ["--memory-of", m, "--model-name", model_name, "--length", str(length)]
                    )
                    for m in METHODS
                }
            gradient = row["time_s"]["gradient"]
            row["time_ratio_to_gradient"] = {m: row["time_s"][m] / gradient for m in METHODS}
            if memory:
                plain = row["memory"]["gradient"]
                row["memory_ratio_to_gradient"] = {
                    m: {
                        "extra_peak": row["memory"][m]["extra_peak_bytes"] / max(1, plain["extra_peak_bytes"]),
                        "saved": row["memory"][m]["saved_bytes"] / max(1, plain["saved_bytes"]),
                    }
                    for m in METHODS
                }
            log(
                f"  {length:>5} tokens: "
                + ", ".join(f"{m} {row['time_s'][m]:.3f}s ({row['time_ratio_to_gradient'][m]:.2f}x)" for m in METHODS)
            )
            rows.append(row)
        results["models"][model_name] = {"description": description, "rows": rows}
        del model
    return results


def markdown(results: dict, command: str) -> str:
    lines = [
        "# Explanation cost versus a plain gradient",
        "",
        f"Command: `{command}`  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()),
        "",
        "Ratios are to `gradient` (forward + backward to the input embeddings, parameters frozen), measured in the",
        "same process, interleaved, median of the repeats; peak extra memory is resident memory above the",
        "loaded model, each method in a fresh process; saved = bytes autograd keeps for the backward pass.",
        "",
    ]
    for name, entry in results["models"].items():
        lines += [f"## {entry['description']}", ""]
        header = "| tokens | " + " | ".join(f"{m} time" for m in METHODS) + " | attnlrp / gradient time |"
        has_memory = "memory" in entry["rows"][0]
        if has_memory:
            header += " attnlrp / gradient peak extra memory | attnlrp / gradient saved |"
        lines += [header, "|" + "---|" * (header.count("|") - 1)]
        for row in entry["rows"]:
            cells = [str(row["length"])] + [f"{row['time_s'][m]:.3f} s" for m in METHODS]
            cells.append(f"**{row['time_ratio_to_gradient']['attnlrp']:.2f}x**")
            if has_memory:
                ratio = row["memory_ratio_to_gradient"]["attnlrp"]
                cells += [f"**{ratio['extra_peak']:.2f}x**", f"{ratio['saved']:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "smollm2"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for the test suite)")
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    parser.add_argument("--memory-of", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-name", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        import json

        print(json.dumps(measure_memory(args.model_name, args.memory_of, args.length)))
        return 0
    if args.smoke:
        args.models, args.lengths, args.repeats = ["small"], [16], 1
    command = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = benchmark(args.models, args.lengths, args.repeats, memory=not args.no_memory)
    results["command"] = command.strip()
    paths = common.write_results("overhead", results, markdown(results, command.strip()), args.output)
    common.log(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
