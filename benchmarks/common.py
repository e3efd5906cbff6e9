"""Shared pieces of the benchmarks: models, timing, memory measurement, result files.

Every benchmark runs with one CPU thread (``torch.set_num_threads(1)``; two threads are several
times slower on the machines this project is developed on) and measures the methods it compares
side by side in one process, interleaved, reporting medians.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def set_threads() -> None:
    torch.set_num_threads(1)


def synthetic_llama(
    size: str = "small", *, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, device="cpu", vocab_size=None
):
    """Synthetic Llama configurations with random weights.

    'tiny' (for smoke tests, 1 M parameters), 'small' (tiny but not trivial, 20 M), 'medium'
    (156 M: 8 layers of width 1024, vocabulary 32000) and 'large' (TinyLlama's shape, 1.1 B);
    ``vocab_size`` overrides the vocabulary size (e.g. to fit a real tokenizer).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {
        "tiny": dict(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2),
        "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4),
        "medium": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4),
        "large": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4),
    }
    shape = dict(sizes[size], **({"vocab_size": vocab_size} if vocab_size else {}))
    config = LlamaConfig(**shape, max_position_embeddings=8192)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02)
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    model.model.rotary_emb.__init__(config)  # rebuild the rotary buffers that to_empty left uninitialized
    return model.to(device=device, dtype=dtype).eval()


#: Name of the synthetic model with Gemma-3-270m's shape and vocabulary (see :func:`synthetic_gemma3`).
LARGE_VOCABULARY = "gemma3-270m-shape"


def synthetic_gemma3(*, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, device="cpu"):
    """A ``Gemma3ForCausalLM`` of Gemma-3-270m's shape with random weights: a 262,144-token vocabulary
    (tied embeddings and head, 168 M of the 268 M parameters) on a small body (18 layers of width 640,
    4 query / 1 key-value heads of dimension 256, sliding-window and full attention 5:1)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=32768,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config).to(device=device, dtype=dtype).eval()


#: Name of the synthetic mixture-of-experts model (see :func:`synthetic_moe`).
MIXTURE_OF_EXPERTS = "qwen3-moe-8x2"


def synthetic_moe(*, attn: str = "sdpa", dtype=torch.float32, seed: int = 0, device="cpu", experts="grouped_mm",
                  size: str = "benchmark"):
    """A ``Qwen3MoeForCausalLM`` with random weights, tiny but not trivial: 4 layers of width 512, 8 experts of
    width 512 with 2 active per token (the fused ``grouped_mm`` experts), vocabulary 8192 (``size='tiny'``: for
    smoke tests)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                 moe_intermediate_size=512, intermediate_size=1024)
    if size == "tiny":
        shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     moe_intermediate_size=32, intermediate_size=64)
    config = Qwen3MoeConfig(vocab_size=8192, num_experts=8, num_experts_per_tok=2, max_position_embeddings=8192,
                            **shape)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # routers start at zero: random routing weights so that experts differ per token
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(0.0, 0.02)
    model.set_experts_implementation(experts)
    return model.to(device=device, dtype=dtype).eval()


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose text ``'t0 t1 ...'`` is token ids ``0, 1, ...``: a real tokenizer for
    :func:`lxt_explicit.explain.explain` on synthetic models fed random ids (see :func:`ids_as_text`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t0")


def ids_as_text(input_ids: torch.Tensor) -> str:
    """The text that :func:`word_tokenizer` turns into ``input_ids`` (``[1, tokens]``)."""
    return " ".join(f"t{i}" for i in input_ids[0].tolist())


def load_model(name: str, *, attn: str = "sdpa", dtype=torch.float32, device="cpu"):
    """``'smollm2'`` (the real default model), :data:`LARGE_VOCABULARY` or a synthetic Llama size;
    returns ``(model, description)``."""
    if name == "smollm2":
        from lxt_explicit.models.smollm2 import load_smollm2

        model, _ = load_smollm2(dtype=dtype, attn_implementation=attn, device=device)
        return model.eval(), "SmolLM2-135M-Instruct (real weights, 4-bit dequantized)"
    if name == LARGE_VOCABULARY:
        model = synthetic_gemma3(attn=attn, dtype=dtype, device=device)
        parameters = sum(p.numel() for p in model.parameters())
        return model, (
            f"synthetic Gemma3 of Gemma-3-270m's shape ({parameters / 1e6:.0f} M parameters: 18 layers, hidden 640, "
            f"vocab {model.config.vocab_size:,}, random weights)"
        )
    if name == MIXTURE_OF_EXPERTS:
        model = synthetic_moe(attn=attn, dtype=dtype, device=device)
        parameters = sum(p.numel() for p in model.parameters())
        return model, (
            f"synthetic Qwen3-MoE ({parameters / 1e6:.0f} M parameters: 4 layers, hidden 512, 8 experts of width 512, "
            "top-2, grouped_mm experts, vocab 8192, random weights)"
        )
    model = synthetic_llama(name, attn=attn, dtype=dtype, device=device)
    parameters = sum(p.numel() for p in model.parameters())
    cfg = model.config
    return model, (
        f"synthetic Llama '{name}' ({parameters / 1e6:.0f} M parameters: {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, vocab {cfg.vocab_size})"
    )


def smollm2_or_tiny(smoke: bool):
    """``(model, tokenizer, description)``: SmolLM2-135M-Instruct (parameters frozen), or for a smoke
    run a tiny random Llama with SmolLM2's tokenizer."""
    from lxt_explicit.models.smollm2 import load_smollm2, smollm2_folder

    if not smoke:
        model, tokenizer = load_smollm2()
        return model.requires_grad_(False), tokenizer, "SmolLM2-135M-Instruct"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    model = synthetic_llama("tiny", vocab_size=len(tokenizer)).requires_grad_(False)
    return model, tokenizer, "synthetic Llama 'tiny' (random weights) with SmolLM2's tokenizer"


def parse_dtype(name: str) -> torch.dtype:
    """``'float32'``, ``'bfloat16'`` or ``'float16'`` as a torch dtype."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def synchronize(device) -> None:
    """Wait for the queued work of ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device="cpu") -> float:
    """Seconds one call of ``fn`` takes (synchronizing ``device`` before and after)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_times(
    functions: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device="cpu", log=None
) -> dict[str, dict]:
    """Run every function ``warmup`` times, then ``repeats`` rounds interleaved; return median and all times (s).

    ``log``, if given, receives one progress line per timed call.
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for round_ in range(repeats):
        for name, fn in functions.items():
            times[name].append(timed(fn, device))
            if log is not None:
                log(f"    round {round_ + 1}/{repeats} {name}: {times[name][-1]:.3f} s")
    return {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


class SavedTensorBytes:
    """Count the bytes of the distinct storages that autograd saves for the backward pass.

    Storages of the tensors in ``exclude`` (e.g. the model's parameters, which are in memory
    anyway) are not counted.
    """

    def __init__(self, exclude=()):
        self.storages: dict[int, int] = {}
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.excluded:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory_immediately() -> bool:
    """Make glibc return freed blocks of 64 KiB and more to the system at once (``mallopt``).

    Without it, glibc raises its mmap threshold after the first large frees and then keeps freed
    memory in its heap, so the resident memory of a process no longer follows the memory it uses:
    a second measurement in the same process reads too low.  Slows allocation down (use it in
    memory measurements only, never while timing).  Returns whether it took effect.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 65536)) and bool(libc.mallopt(m_trim_threshold, 65536))


def reset_peak_rss() -> bool:
    """Reset the peak resident memory of this process (Linux ``clear_refs``); returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_line(path: str, prefix: str) -> str | None:
    """The first line of the ``/proc`` file ``path`` that starts with ``prefix``, or ``None``."""
    try:
        with open(path) as f:
            return next((line for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def peak_rss_since_reset() -> int:
    """Peak resident memory (bytes) since process start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    line = _proc_line("/proc/self/status", "VmHWM:")
    return int(line.split()[1]) * 1024 if line else peak_rss_bytes()


def extra_peak_memory(fn: Callable[[], object], device="cpu") -> dict:
    """Peak memory of one call of ``fn`` above the memory in use before it.

    On CUDA: allocated device memory (``torch.cuda.max_memory_allocated``).  On the CPU: resident
    memory of the process (``VmHWM`` after a reset); call :func:`release_freed_memory_immediately`
    first so that memory freed by earlier calls does not hide this call's allocations.

    Returns
    -------
    dict
        ``extra_peak_bytes`` and ``left_over_bytes`` (memory still in use after the call, which
        should be about 0).
    """
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {
            "extra_peak_bytes": torch.cuda.max_memory_allocated(device) - before,
            "left_over_bytes": torch.cuda.memory_allocated(device) - before,
        }
    reset_peak_rss()
    before = current_rss_bytes()
    fn()
    return {
        "extra_peak_bytes": max(0, peak_rss_since_reset() - before),
        "left_over_bytes": current_rss_bytes() - before,
    }


def measure_in_subprocess(script: Path, arguments: list[str], echo: bool = False) -> dict:
    """Run ``script`` with ``arguments`` in a fresh Python process and parse the JSON it prints last.

    With ``echo``, the process's stderr (its progress lines) goes to this process's stderr as it runs.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, str(script), *arguments], stdout=subprocess.PIPE,
        stderr=None if echo else subprocess.PIPE, text=True, env=env, check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"measurement failed: {(completed.stderr or '(see above)')[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def environment() -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "commit": _git_commit(),
        "uncommitted_changes": _git_changes(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    line = _proc_line("/proc/cpuinfo", "model name")
    return line.split(":", 1)[1].strip() if line else platform.processor() or "unknown"


def _git(*arguments: str) -> str | None:
    """Output of a read-only git command in this checkout, or ``None`` where git or the checkout is missing."""
    try:
        return subprocess.run(
            ["git", *arguments], capture_output=True, text=True, cwd=Path(__file__).parent, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _git_commit() -> str:
    output = _git("rev-parse", "HEAD")
    return output.strip() if output is not None else "unknown"


def _git_changes() -> str:
    """Tracked files with uncommitted changes (``git status``): the code run may differ from the commit."""
    output = _git("status", "--porcelain", "--untracked-files=no")
    if output is None:
        return "unknown"
    return ", ".join(line[3:] for line in output.splitlines()) or "none"


def write_results(
    name: str, payload: dict, markdown: str, directory: Path = RESULTS, indent: int | None = 2
) -> tuple[Path, Path]:
    """Write ``name.json`` (``indent=None``: compact, for large files) and ``name.md`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{name}.json", directory / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=indent) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
