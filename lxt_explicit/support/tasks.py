"""The families of the support matrix, their task, tiny model, example inputs and explained logit.

Every model type in the installed transformers' causal-LM, masked-LM, sequence-to-sequence-LM and
image-classification auto mappings is one family.  A family in several mappings is checked on one
task, the first of :data:`TASKS` that lists it: an encoder-decoder family (BART, T5) on
sequence-to-sequence generation, an encoder family (BERT) on masked-LM prediction rather than on
its decoder variant (``BertLMHeadModel``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch
from torch import nn

__all__ = [
    "Task",
    "TASKS",
    "SEQUENCE_LENGTH",
    "families",
    "task",
    "model_class",
    "build",
    "prepare",
    "example_inputs",
    "is_encoder_decoder",
    "explained_logit",
]

#: Tokens in the example input.
SEQUENCE_LENGTH = 8


@dataclass(frozen=True)
class Task:
    """One auto mapping: its name in the matrix, the mapping and the Auto class that builds from it."""

    name: str
    mapping: str
    auto_class: str
    target: str


#: The tasks in order of precedence (a family in several mappings is checked on the first).
TASKS: tuple[Task, ...] = (
    Task("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM",
         "largest logit at the first decoder position"),
    Task("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM",
         "largest logit at the masked position (2)"),
    Task("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM",
         "largest logit at the last position"),
    Task("image-classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification",
         "largest class logit"),
)
_BY_NAME: Mapping[str, Task] = MappingProxyType({task.name: task for task in TASKS})


def families() -> dict[str, Task]:
    """Every model type of the four auto mappings, with the task it is checked on (sorted by name)."""
    from transformers.models.auto import modeling_auto

    found: dict[str, Task] = {}
    for task in TASKS:
        for model_type in getattr(modeling_auto, task.mapping):
            found.setdefault(model_type, task)
    return dict(sorted(found.items()))


def task(name: str) -> Task:
    """The :class:`Task` called ``name`` (``'causal-lm'``, ``'masked-lm'``, ``'seq2seq'``, ...)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(_BY_NAME)}") from None


def model_class(model_type: str, task: Task) -> type:
    """The transformers class the task's auto mapping names for ``model_type`` (the first, if several).

    Raises
    ------
    ImportError
        If the class needs a package that is not installed (``natten``, ``timm``, ...).
    """
    import transformers
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, task.mapping)[model_type]
    name = names[0] if isinstance(names, (list, tuple)) else names
    return getattr(transformers, name)


def build(cls: type, config, task: Task, *, seed: int = 0) -> nn.Module:
    """``cls`` from ``config`` under ``torch.manual_seed(seed)``, in eval mode, float32.

    The task's Auto class builds it (``from_config``); a config class the Auto class does not map
    (the decoder of a composite family) builds ``cls`` directly.  The caller's random state is
    left as it was.
    """
    import transformers
    from transformers.models.auto import modeling_auto

    auto_class = getattr(transformers, task.auto_class)
    mapping = getattr(modeling_auto, task.mapping.removesuffix("_NAMES"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if type(config) in mapping:
            model = auto_class.from_config(config)
        else:
            model = cls(config)
    return model.float().eval()


def _vocabulary(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    return int(getattr(config, "vocab_size", 0) or 128)


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 32)
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    if isinstance(size, dict):
        return int(size.get("height", 32)), int(size.get("width", 32))
    return int(size), int(size)


def _token_ids(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(5, min(_vocabulary(model), 128), shape, generator=generator)


def _takes(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _image_inputs(model: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> dict:
    config = model.config
    if not _takes(model, "pixel_values") and _takes(model, "input_ids"):  # ImageGPT: colour-cluster ids
        return {"input_ids": _token_ids(model, (1, SEQUENCE_LENGTH), generator)}
    if _takes(model, "spatial_shapes"):  # SigLIP 2: flattened patches of a variable-resolution image
        vision = getattr(config, "vision_config", config)
        side, patch = 4, int(vision.patch_size)
        return {
            "pixel_values": torch.randn(1, side * side, 3 * patch * patch, generator=generator, dtype=dtype),
            "pixel_attention_mask": torch.ones(1, side * side, dtype=torch.long),
            "spatial_shapes": torch.tensor([[side, side]]),
        }
    vision = config if hasattr(config, "image_size") else getattr(config, "vision_config", config)
    channels = int(getattr(vision, "num_channels", 3) or 3)
    return {"pixel_values": torch.randn(1, channels, *_image_size(vision), generator=generator, dtype=dtype)}


def example_inputs(model: nn.Module, task: Task, *, dtype: torch.dtype = torch.float32, seed: int = 1) -> dict:
    """Inputs of one example: 8 tokens (and 4 decoder tokens), or one image of the configured size.

    Token ids avoid the special ids 0-4; a masked-LM example has the config's mask token at position 2.
    """
    generator = torch.Generator().manual_seed(seed)
    if task.name == "image-classification":
        return _image_inputs(model, dtype, generator)
    ids = _token_ids(model, (1, SEQUENCE_LENGTH), generator)
    if task.name == "masked-lm":
        mask = getattr(model.config, "mask_token_id", None)
        if isinstance(mask, int) and 0 <= mask < _vocabulary(model):
            ids[0, 2] = mask
    inputs = {"input_ids": ids}
    if is_encoder_decoder(model):
        inputs["decoder_input_ids"] = _token_ids(model, (1, SEQUENCE_LENGTH // 2), generator)
    return inputs


def prepare(model_type: str, model: nn.Module) -> None:
    """Family-specific setup a built model needs before it runs (X-MOD: the default language)."""
    if model_type == "xmod":
        model.set_default_language(model.config.languages[0])


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether the model takes ``decoder_input_ids`` (its config says it is an encoder-decoder)."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def explained_logit(model: nn.Module, task: Task, output) -> torch.Tensor:
    """The scalar the checks explain (see :attr:`Task.target`); decoder-only sequence-to-sequence
    families (audio language models) are explained at the last position."""
    logits = output.logits if hasattr(output, "logits") else output[0]
    if task.name == "image-classification":
        return logits[0].max()
    if task.name == "masked-lm":
        return logits[0, 2].max()
    if task.name == "seq2seq" and is_encoder_decoder(model):
        return logits[0, 0].max()
    return logits[0, -1].max()
