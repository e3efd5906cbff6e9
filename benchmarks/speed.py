"""Speed, memory and scaling of AttnLRP and CP-LRP against the attribution methods a user would otherwise pick.

For each model and sequence length, the time and peak memory of

* ``forward``              - a forward pass without gradients,
* ``gradient``             - forward + backward of the explained logit to the input embeddings,
* ``attnlrp``, ``cp_lrp``  - one explanation with :mod:`lxt_explicit` (composite registered,
                             forward, relevance backward, composite removed),
* ``input_x_gradient``     - Captum's Input x Gradient,
* ``integrated_gradients`` - Captum's Integrated Gradients (``--ig-steps`` steps, ``--ig-batch``
                             per pass),
* ``attention_rollout``    - attention rollout (eager attention with attention weights returned),
* ``occlusion``            - every token's embedding replaced by zero in turn (``--occlusion-batch``
                             copies per forward pass),
* ``smoothgrad``           - optional (``--methods``): Captum's NoiseTunnel; costs what IG costs.

The explained quantity is the largest next-token logit at the last position (the token is picked
once, beforehand); every method computes only the last position's logits (``logits_to_keep=1``).
Inputs are random token ids (a fixed seed): cost does not depend on the text.

Timing: the single-pass methods run ``--repeats`` rounds, interleaved, in one process; the tables
give medians and ratios to ``gradient`` from the same rounds.  The multi-pass methods (IG,
SmoothGrad, occlusion) cost their number of passes times one pass: one pass is timed once after the
rounds, and the whole method is run once as well where that estimate is below ``--full-limit``
seconds; otherwise the table gives the estimate, marked ``~``.

Memory: peak memory above the memory in use before the call (the loaded model), each method once,
in a fresh process per model (on the CPU: resident memory, with glibc told to return freed memory
at once so that one measurement does not reuse the memory another freed; on CUDA: allocated device
memory, in the timing process).  The multi-pass
methods run one pass there, which is exactly their peak (passes run one after another).

Usage::

    python benchmarks/speed.py                                  # the full run (~40 min on one CPU thread)
    python benchmarks/speed.py --models smollm2:128,512 --repeats 3
    python benchmarks/speed.py --device cuda --dtype bfloat16   # on a GPU
    python benchmarks/speed.py --smoke --output /tmp/out        # seconds; used by the test suite

Results: ``benchmarks/results/speed.json``, ``speed.md`` and ``speed.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attributions  # noqa: E402
import common  # noqa: E402
import torch  # noqa: E402
from attributions import COLORS, LABELS, Settings  # noqa: E402

SINGLE_PASS = ("forward", "gradient", "attnlrp", "cp_lrp", "input_x_gradient", "attention_rollout")
MULTI_PASS = ("integrated_gradients", "smoothgrad", "occlusion")
#: Methods timed on request only: the library's ``explain()`` end to end (it reads text: the random ids are
#: written as words of :func:`common.word_tokenizer`), AttnLRP with the logits of every position, and
#: ``attnlrp_sinks`` (the attention-sink gate, ``attnlrp(sinks='gate')``; ``--name speed_sinks``,
#: :data:`SINKS_COMMAND`).
EXTRA = ("explain", "attnlrp_all_logits", "attnlrp_sinks")
DEFAULT_METHODS = SINGLE_PASS + ("integrated_gradients", "occlusion")
DEFAULT_MODELS = ("smollm2:128,512,1024,2048", "medium:128,512")
#: The large-vocabulary comparison (``--name speed_large_vocabulary``): what ``explain()`` costs on a
#: 262,144-token vocabulary, next to a plain gradient and AttnLRP with the logits of every position.
#: The mixture-of-experts comparison (``--name speed_moe``): fused experts at 512 tokens.
MIXTURE_OF_EXPERTS_COMMAND = (
    f"--models {common.MIXTURE_OF_EXPERTS}:512 --methods forward gradient attnlrp cp_lrp --repeats 5 --name speed_moe"
)
SINKS_COMMAND = (
    "--models smollm2:128,512,1024 --methods forward gradient attnlrp attnlrp_sinks cp_lrp --name speed_sinks"
)
LARGE_VOCABULARY_COMMAND = (
    f"--models {common.LARGE_VOCABULARY}:128,512 --methods forward gradient attnlrp attnlrp_all_logits explain "
    "--name speed_large_vocabulary"
)


# ------------------------------------------------------------------------------------ workloads


def parse_models(specs: list[str], default_lengths: list[int]) -> list[tuple[str, list[int]]]:
    """``['smollm2:128,512', 'medium']`` -> ``[('smollm2', [128, 512]), ('medium', default_lengths)]``."""
    parsed = []
    for spec in specs:
        name, _, lengths = spec.partition(":")
        parsed.append((name, [int(n) for n in lengths.split(",")] if lengths else list(default_lengths)))
    return parsed


def random_input(model, length: int) -> tuple[torch.Tensor, int]:
    """Random token ids ``[1, length]`` (seed 0) on the model's device and the most likely next token."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    with torch.no_grad():
        token = int(model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
    return ids, token


def passes(method: str, length: int, settings: Settings) -> int:
    """Number of forward(/backward) passes a method makes (1 for the single-pass methods)."""
    if method == "integrated_gradients":
        return math.ceil(settings.ig_steps / settings.ig_batch)
    if method == "smoothgrad":
        return math.ceil(settings.smoothgrad_samples / settings.smoothgrad_batch)
    if method == "occlusion":
        return math.ceil((length + 1) / settings.occlusion_batch)  # the unoccluded copy and one per token
    return 1


def runner(method: str, model, input_ids: torch.Tensor, token: int, settings: Settings) -> Callable[[], object]:
    """A function that runs ``method`` once on ``input_ids`` (the whole method)."""
    if method == "forward":

        def forward():
            with torch.no_grad():
                return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits

        return forward
    if method == "explain":
        return explain_runner(model, input_ids, token)
    return lambda: attributions.attribute(method, model, input_ids, token, settings)


def explain_runner(model, input_ids: torch.Tensor, token: int) -> Callable[[], object]:
    """``lxt_explicit.explain.explain`` of ``token`` after the text of ``input_ids`` (a word per id)."""
    from lxt_explicit.explain import explain

    tokenizer = common.word_tokenizer(model.config.vocab_size)
    text = common.ids_as_text(input_ids.cpu())
    if tokenizer(text, add_special_tokens=False)["input_ids"] != input_ids[0].tolist():
        raise RuntimeError("the word tokenizer does not give back the benchmark's token ids")
    return lambda: explain(model, tokenizer, text, target=token)


def one_pass_runner(
    method: str, model, input_ids: torch.Tensor, token: int, settings: Settings
) -> Callable[[], object]:
    """A function that runs one pass of ``method``: the same work and peak memory as each of its passes."""
    if method == "integrated_gradients":
        settings = dataclasses.replace(settings, ig_steps=settings.ig_batch)
    elif method == "smoothgrad":
        settings = dataclasses.replace(settings, smoothgrad_samples=settings.smoothgrad_batch)
    elif method == "occlusion":
        positions = range(min(settings.occlusion_batch - 1, input_ids.shape[1]))
        return lambda: attributions.attribute(method, model, input_ids, token, settings, positions=positions)
    return runner(method, model, input_ids, token, settings)


# ------------------------------------------------------------------------------------ timing


def time_length(model, length: int, methods, settings, repeats: int, warmup: int, full_limit: float, device, log):
    """Times of every method at one sequence length; see the module docstring for the procedure."""
    input_ids, token = random_input(model, length)
    single = [m for m in methods if m not in MULTI_PASS]
    rounds = common.median_times(
        {m: runner(m, model, input_ids, token, settings) for m in single}, repeats, warmup, device, log
    )
    row = {"length": length, "time_s": {}, "times_s": {}, "estimated": {}, "passes": {}, "one_pass_s": {}}
    for method in single:
        row["time_s"][method] = rounds[method]["median_s"]
        row["times_s"][method] = rounds[method]["times_s"]
        row["estimated"][method] = False
        row["passes"][method] = 1
    for method in (m for m in methods if m in MULTI_PASS):
        n = passes(method, length, settings)
        one = common.timed(one_pass_runner(method, model, input_ids, token, settings), device)
        estimate = one * n
        row["passes"][method], row["one_pass_s"][method] = n, one
        log(f"    {method}: one pass {one:.3f} s x {n} passes = {estimate:.1f} s estimated")
        if estimate <= full_limit:
            row["time_s"][method] = common.timed(runner(method, model, input_ids, token, settings), device)
            row["estimated"][method] = False
            log(f"    {method}: measured {row['time_s'][method]:.1f} s")
        else:
            row["time_s"][method] = estimate
            row["estimated"][method] = True
            log(f"    {method}: {estimate:.1f} s > --full-limit {full_limit:.0f} s, reporting the estimate")
    if "explain" in methods and "attnlrp" in methods:  # the same relevance, or the times compare different work
        ours = explain_runner(model, input_ids, token)().relevance
        row["explain_vs_attnlrp_max_abs_difference"] = float((ours - runner("attnlrp", model, input_ids, token,
                                                                                 settings)()).abs().max())
    if "gradient" in row["time_s"]:
        row["time_ratio_to_gradient"] = {m: t / row["time_s"]["gradient"] for m, t in row["time_s"].items()}
    return row


# ------------------------------------------------------------------------------------ memory


def memory_length(model, length: int, methods, settings, device, log) -> dict:
    """Peak extra memory (and bytes autograd saves) of one run of each method; multi-pass methods: one pass."""
    input_ids, token = random_input(model, length)
    warm_ids, warm_token = random_input(model, 8)
    results = {}
    for method in methods:
        one_pass_runner(method, model, warm_ids, warm_token, settings)()  # first-call work out of the way
        fn = one_pass_runner(method, model, input_ids, token, settings)
        with common.SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
            measured = common.extra_peak_memory(fn, device)
        measured["saved_bytes"] = saved.total
        results[method] = measured
        log(f"    memory {method} at {length} tokens: {measured['extra_peak_bytes'] / 2**20:.0f} MiB peak extra")
    return results


def memory_in_subprocess(name: str, lengths, methods, settings: Settings, dtype: str, log) -> list[dict]:
    """Run :func:`memory_length` for every length in a fresh CPU process (see ``--memory-of``)."""
    arguments = ["--memory-of", name, "--lengths", *map(str, lengths), "--dtype", dtype, "--methods", *methods,
                 "--settings-json", json.dumps(dataclasses.asdict(settings))]
    log(f"  {name}: memory, in a fresh process")
    return common.measure_in_subprocess(Path(__file__), arguments, echo=True)


def memory_main(name: str, lengths, methods, settings: Settings, dtype: str) -> list[dict]:
    """Body of the ``--memory-of`` process (CPU): glibc returns freed memory at once, so that the
    measurements of one process do not see each other's freed memory."""
    common.set_threads()
    common.release_freed_memory_immediately()
    model, _ = common.load_model(name, dtype=common.parse_dtype(dtype))
    model.requires_grad_(False)
    return [memory_length(model, length, methods, settings, "cpu", common.log) for length in lengths]


# ------------------------------------------------------------------------------------ benchmark


def add_memory_ratios(row: dict) -> None:
    """Memory ratios of every method to ``gradient`` (peak extra memory and saved bytes)."""
    if "memory" not in row or "gradient" not in row["memory"]:
        return
    plain = row["memory"]["gradient"]
    row["memory_ratio_to_gradient"] = {
        m: {
            "extra_peak": v["extra_peak_bytes"] / max(1, plain["extra_peak_bytes"]),
            "saved": v["saved_bytes"] / max(1, plain["saved_bytes"]),
        }
        for m, v in row["memory"].items()
    }


def benchmark(models, methods, settings, *, repeats, full_limit, memory, device, dtype, log=common.log) -> dict:
    """Measure every model at its lengths; returns the results dictionary written to ``speed.json``."""
    common.set_threads()
    start = time.perf_counter()
    results = {"environment": common.environment(), "device": device, "dtype": dtype,
               "settings": dataclasses.asdict(settings), "methods": list(methods), "models": {}}
    if device == "cpu":
        results["environment"]["gpu"] = "none: CPU only, one thread"
    for name, lengths in models:
        model, description = common.load_model(name, dtype=common.parse_dtype(dtype), device=device)
        model.requires_grad_(False)
        log(f"{name}: {description}")
        rows = []
        for index, length in enumerate(lengths):
            log(f"  {name}, {length} tokens")
            row = time_length(model, length, methods, settings, repeats, int(index == 0), full_limit, device, log)
            log(f"  {name}, {length} tokens: " + ", ".join(
                f"{m} {row['time_s'][m]:.2f}s ({row['time_ratio_to_gradient'][m]:.2f}x)" for m in methods
                if "time_ratio_to_gradient" in row))
            rows.append(row)
        if memory:
            measured = (
                [memory_length(model, length, methods, settings, device, log) for length in lengths]
                if device != "cpu" else memory_in_subprocess(name, lengths, methods, settings, dtype, log)
            )
            for row, values in zip(rows, measured):
                row["memory"] = values
                add_memory_ratios(row)
        parameters = sum(p.numel() for p in model.parameters())
        results["models"][name] = {"description": description, "parameters": parameters, "rows": rows}
        del model
    results["seconds"] = time.perf_counter() - start
    return results


# ------------------------------------------------------------------------------------ output


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t < 100 else f"{t:,.0f} s"


def _ratio(r: float) -> str:
    return f"{r:.2f}x" if r < 10 else f"{r:,.0f}x"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n / 2**20:.2f} MiB"


def markdown(results: dict) -> str:
    """Tables of the results: per model, time and memory of every method at every length."""
    methods = results["methods"]
    env = results["environment"]
    lines = [
        "# Speed, memory and scaling of explanation methods",
        "",
        f"Command: `{results['command']}`"
        + (f" ({results['seconds'] / 60:.0f} min)" if "seconds" in results else "") + "  ",
        f"Device: {results['device']} ({env.get('gpu', '')}), dtype {results['dtype']}  ",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "gpu"),
        "",
        "Explained quantity: the largest next-token logit at the last position of random token ids.",
        f"Settings: {', '.join(f'{k} {v}' for k, v in results['settings'].items() if k != 'seed')}.",
        "Time: median over the interleaved rounds (single-pass methods); one run of the multi-pass",
        "methods, `~` = estimated as (time of one pass) x (passes) where a full run was too long.",
        "In parentheses: ratio to `gradient` (plain forward + backward to the input embeddings) from the",
        "same process.  Memory: peak above the loaded model, one run (multi-pass methods: one pass,",
        "which is their peak), in a fresh process per model.",
        "",
    ]
    for entry in results["models"].values():
        rows = entry["rows"]
        header = "| method | " + " | ".join(f"{r['length']} tokens" for r in rows) + " |"
        rule = "|---|" + "---|" * len(rows)
        lines += [f"## {entry['description']}", "", "Time (ratio to gradient):", "", header, rule]
        for method in methods:
            cells = []
            for row in rows:
                mark = "~" if row["estimated"][method] else ""
                ratio = row.get("time_ratio_to_gradient", {}).get(method)
                ratio_text = f" ({mark}{_ratio(ratio)})" if ratio else ""
                cells.append(f"{mark}{_seconds(row['time_s'][method])}{ratio_text}")
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        if "explain_vs_attnlrp_max_abs_difference" in rows[0]:
            differences = ", ".join(f"{r['explain_vs_attnlrp_max_abs_difference']:.1e} at {r['length']} tokens"
                                    for r in rows)
            lines += ["", f"`explain()` gives AttnLRP's relevance (largest difference: {differences})."]
        if "memory" in rows[0]:
            lines += ["", "Peak extra memory (ratio to gradient):", "", header, rule]
            for method in methods:
                cells = []
                for row in rows:
                    ratio = row.get("memory_ratio_to_gradient", {}).get(method, {}).get("extra_peak")
                    peak = row["memory"][method]["extra_peak_bytes"]
                    cells.append(_mib(peak) + (f" ({ratio:.2f}x)" if ratio is not None else ""))
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
            lines += ["", "Bytes autograd saves for the backward pass, parameters not counted (ratio to gradient):", "",
                      header, rule]
            for method in (m for m in methods if rows[0]["memory"][m]["saved_bytes"] > 0):
                cells = [_mib(r["memory"][method]["saved_bytes"])
                         + f" ({r['memory_ratio_to_gradient'][method]['saved']:.2f}x)" for r in rows]
                lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Time and peak memory against sequence length (log-log), one row per model."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].values())
    with_memory = "memory" in models[0]["rows"][0]
    columns = 2 if with_memory else 1
    fig, axes = plt.subplots(len(models), columns, figsize=(6 * columns, 4 * len(models)), squeeze=False)
    for axes_row, entry in zip(axes, models):
        lengths = [r["length"] for r in entry["rows"]]
        for method in results["methods"]:
            times = [r["time_s"][method] for r in entry["rows"]]
            estimated = [r["estimated"][method] for r in entry["rows"]]
            style = {"color": COLORS[method], "linewidth": 2.5 if method in ("attnlrp", "cp_lrp") else 1.2}
            axes_row[0].plot(lengths, times, marker="o", label=LABELS[method], **style)
            hollow = [(x, y) for x, y, e in zip(lengths, times, estimated) if e]
            if hollow:
                axes_row[0].plot(*zip(*hollow), marker="o", linestyle="none", markerfacecolor="white",
                                 color=COLORS[method])
            if with_memory:
                memory = [r["memory"][method]["extra_peak_bytes"] / 2**20 for r in entry["rows"]]
                axes_row[1].plot(lengths, memory, marker="o", label=LABELS[method], **style)
        axes_row[0].set(ylabel="seconds", title=f"time ({entry['description'].split(' (')[0]})")
        if with_memory:
            axes_row[1].set(ylabel="MiB above the model", title="peak extra memory (multi-pass methods: one pass)")
        for ax in axes_row:
            ax.set(xscale="log", yscale="log", xlabel="tokens")
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xticks(lengths, [str(n) for n in lengths])
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.text(0.01, 0.005, "hollow markers: estimated from one pass", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def notes(results: dict, methods, full_limit: float) -> list[str]:
    """Lines for the results: where a method was estimated rather than run in full, and why."""
    lines = []
    if results["device"] == "cpu":
        lines.append("No GPU was available: every number is from one CPU thread (`torch.set_num_threads(1)`).")
    for name, entry in results["models"].items():
        for method in methods:
            skipped = [r["length"] for r in entry["rows"] if r["estimated"][method]]
            if skipped:
                lines.append(
                    f"{name}: {LABELS[method]} at {', '.join(map(str, skipped))} tokens is estimated (one pass "
                    f"timed x passes): a full run would have taken longer than --full-limit {full_limit:.0f} s."
                )
    if "smoothgrad" not in methods:
        lines.append("SmoothGrad is not timed by default: its cost is that of Integrated Gradients with as many "
                     "samples as steps (same passes of gradients on a batch of noisy copies).")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="model names ('smollm2' or a synthetic Llama size), each optionally with ':lengths'")
    parser.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 1024],
                        help="lengths for the models given without ':lengths'")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=SINGLE_PASS + MULTI_PASS + EXTRA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-limit", type=float, default=120.0,
                        help="run a multi-pass method in full only if one pass x passes is below this (seconds)")
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--ig-batch", type=int, default=4)
    parser.add_argument("--smoothgrad-samples", type=int, default=16)
    parser.add_argument("--occlusion-batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (for the test suite)")
    parser.add_argument("--output", type=Path, default=common.RESULTS)
    parser.add_argument("--name", default="speed", help="stem of the result files (NAME.json, NAME.md, NAME.png)")
    parser.add_argument("--from-json", type=Path, help="only rewrite the table and the plot from a results file")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)

    parser.add_argument("--settings-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_of:
        settings = Settings(**json.loads(args.settings_json))
        print(json.dumps(memory_main(args.memory_of, args.lengths, args.methods, settings, args.dtype)))
        return 0
    if args.from_json:
        write(json.loads(args.from_json.read_text()), args.output, args.name)
        return 0
    if args.smoke:
        args.models, args.repeats, args.ig_steps, args.smoothgrad_samples = ["tiny:16,32"], 1, 4, 4
    settings = Settings(ig_steps=args.ig_steps, ig_batch=args.ig_batch, smoothgrad_samples=args.smoothgrad_samples,
                        smoothgrad_batch=args.ig_batch, occlusion_batch=args.occlusion_batch)
    command = "python benchmarks/speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = benchmark(
        parse_models(args.models, args.lengths), args.methods, settings, repeats=args.repeats,
        full_limit=args.full_limit, memory=not args.no_memory, device=args.device, dtype=args.dtype,
    )
    results["command"] = command.strip()
    results["notes"] = notes(results, args.methods, args.full_limit)
    write(results, args.output, args.name)
    return 0


def write(results: dict, output: Path, name: str = "speed") -> None:
    """Write ``NAME.json``, ``NAME.md`` and ``NAME.png`` into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    paths = common.write_results(name, results, markdown(results), output)
    figure = plot(results, output / f"{name}.png")
    common.log(f"wrote {paths[0]}, {paths[1]} and {figure}")


if __name__ == "__main__":
    raise SystemExit(main())
