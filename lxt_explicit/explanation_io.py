"""Explanations as data: a documented file format (JSON + safetensors) and long pandas tables.

File format (``SCHEMA_VERSION`` 1).  ``save(path)`` writes two files side by side:

* ``NAME.json`` (UTF-8 JSON): ``{"schema_version": 1, "kind": "explanation" | "token_matrix",
  "tensors": "NAME.safetensors", "fields": {...}, "reproduce": {...}}``.  ``fields`` holds every
  field of the object that is not a number array or a float (token ids, tokens, decoded texts,
  prompt and tokenized text, offsets, target, method, epsilon, model, dtype, ...); ``reproduce``
  repeats what is needed to compute the result again (model, dtype, method, epsilon, target,
  prompt, tokenized text, token ids) with the versions of Python, torch, transformers and
  lxt_explicit that computed it.
* ``NAME.safetensors``: the numbers at full precision - ``relevance``, ``source_relevance/<name>``,
  ``latent/<name>``, ``target_values`` and every float field as a 0-d float64 tensor
  ``float/<name>`` (so NaN and infinities survive).

``load`` reads both and returns fields equal to the saved ones (tensors bit for bit).  Files of a
newer schema are refused.  Tables (:func:`long_frame`, :func:`to_table`) need pandas
(``pip install lxt_explicit[data]``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["SCHEMA_VERSION", "load_fields", "long_frame", "model_description", "save_fields", "to_table", "versions"]

#: Version of the file format written by :func:`save_fields`.
SCHEMA_VERSION = 1

_REPRODUCE = ("model", "dtype", "method", "epsilon", "target", "target_ids", "score", "prompt", "text", "token_ids")


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that compute explanations."""
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "lxt_explicit"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - depends on the installation
            found[package] = "unknown"
    return found


def model_description(model) -> tuple[str, str]:
    """``(model, dtype)`` for the metadata: the class and the name or folder it was loaded from; the dtype."""
    config = getattr(model, "config", None)
    origin = getattr(config, "_name_or_path", "") or ""
    name = f"{type(model).__name__}({origin})" if origin else type(model).__name__
    parameter = next(iter(model.parameters()), None)
    return name, str(parameter.dtype).removeprefix("torch.") if parameter is not None else ""


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    json_path = path if path.suffix == ".json" else path.with_name(path.name + ".json")
    return json_path, json_path.with_suffix(".safetensors")


def save_fields(obj, path, kind: str) -> Path:
    """Write the dataclass ``obj`` as ``NAME.json`` and ``NAME.safetensors`` (see the module); return the JSON path.

    ``path`` is the JSON file (``.json`` is appended if it has another suffix or none).
    """
    from safetensors.torch import save_file

    json_path, tensor_path = _paths(path)
    tensors, fields = {}, {}
    for item in dataclasses.fields(obj):
        value = getattr(obj, item.name)
        if isinstance(value, torch.Tensor):
            tensors[item.name] = value
        elif isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{item.name}/{name}": v for name, v in value.items()})
            fields[item.name] = sorted(value)  # the names, in the JSON as well
        elif isinstance(value, float):
            tensors[f"float/{item.name}"] = torch.tensor(value, dtype=torch.float64)
        else:
            fields[item.name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(
                value, list) else value
    reproduce = {key: getattr(obj, key) for key in _REPRODUCE if hasattr(obj, key)}
    document = {
        "schema_version": SCHEMA_VERSION, "kind": kind, "tensors": tensor_path.name, "fields": fields,
        "reproduce": {**reproduce, "versions": versions()},
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tensor_path),
              metadata={"schema_version": str(SCHEMA_VERSION), "kind": kind})
    json_path.write_text(json.dumps(document, ensure_ascii=False, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return json_path


def load_fields(path, kind: str) -> dict:
    """The fields saved by :func:`save_fields` (a ``kind`` object), ready for the dataclass's constructor.

    Raises
    ------
    FileNotFoundError
        If the JSON file or its tensor file is missing.
    ValueError
        If the file is of another kind or of a newer schema version.
    """
    from safetensors.torch import load_file

    json_path, _ = _paths(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"no saved explanation at {json_path}")
    document = json.loads(json_path.read_text(encoding="utf-8"))
    version = document.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{json_path} has schema version {version!r}; this lxt_explicit reads up to "
                         f"{SCHEMA_VERSION}: upgrade lxt_explicit")
    if document.get("kind") != kind:
        raise ValueError(f"{json_path} holds a {document.get('kind')!r}, not a {kind!r}; load it with its own class")
    tensor_path = json_path.with_name(document["tensors"])
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{json_path} needs its numbers in {tensor_path}, which is missing")
    return _merge(dict(document["fields"]), load_file(str(tensor_path)))


def _merge(fields: dict, tensors: dict) -> dict:
    """The JSON fields with the tensors put back in their places."""
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        if group == "float":
            fields[name] = float(value)
        elif name:
            if not isinstance(fields.get(group), dict):
                fields[group] = {}
            fields[group][name] = value
        else:
            fields[key] = value
    for key in ("source_relevance", "latent"):
        if isinstance(fields.get(key), list):  # saved names without tensors: empty dicts
            fields[key] = {}
    if "offsets" in fields:
        fields["offsets"] = [tuple(o) for o in fields["offsets"]]
    return fields


def long_frame(relevance: torch.Tensor, labels: Sequence[str], label_name: str, row_labels: Sequence[str],
               constants: dict, columns: dict | None = None, valid_columns: Sequence[int] | None = None):
    """A long pandas table of a vector (one row per entry) or a matrix (one row per (row, column) entry).

    ``labels`` name the entries (columns of a matrix), ``columns`` adds per-entry columns,
    ``constants`` columns with one value for all; for a matrix ``row_labels`` name its rows and
    ``valid_columns[r]`` (optional) limits row ``r`` to its first entries.
    """
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("tables need pandas: pip install 'lxt_explicit[data]' (or pip install pandas)") from error
    values = relevance.detach().cpu().double()
    columns = columns or {}
    per_entry = {"index": list(range(len(labels))), label_name: list(labels), **columns}
    if values.dim() == 1:
        frame = pd.DataFrame({**per_entry, "relevance": values.tolist()})
    else:
        records = {key: [] for key in ("row", "row_label", *per_entry, "relevance")}
        for r, row in enumerate(values.tolist()):
            count = len(labels) if valid_columns is None else valid_columns[r]
            records["row"] += [r] * count
            records["row_label"] += [row_labels[r]] * count
            for key, entries in per_entry.items():
                records[key] += list(entries[:count])
            records["relevance"] += row[:count]
        frame = pd.DataFrame(records)
    for key, value in constants.items():
        frame[key] = value
    return frame


def to_table(items: Iterable, *, keys: Sequence | None = None):
    """One long table of many explanations (anything with ``to_pandas()``), with an ``explanation`` column.

    ``keys`` names each item in that column (default: its number in ``items``).
    """
    import pandas as pd

    items = list(items)
    if keys is not None and len(keys) != len(items):
        raise ValueError(f"keys has {len(keys)} entries for {len(items)} explanations")
    frames = []
    for number, item in enumerate(items):
        frame = item.to_pandas()
        frame.insert(0, "explanation", number if keys is None else keys[number])
        frames.append(frame)
    if not frames:
        raise ValueError("no explanations to put in a table")
    return pd.concat(frames, ignore_index=True)
