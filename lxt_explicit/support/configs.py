"""Tiny configurations of any transformers model type, built through the config class's constructor.

:func:`tiny_config` passes small sizes to ``AutoConfig.for_model(model_type, ...)``, so that the
fields a config derives from them (layer types, sliding-window patterns, head dimensions) follow.
A size is passed only where the config class has that field (or an ``attribute_map`` alias of it)
and its default has the same shape (a number for a number, a sequence for a sequence); sub-configs
(``text_config``, ``vision_config``, ``encoder``, ...) get tiny configurations of their own class.
Families that validate shapes beyond that get the few values they need from
:data:`~lxt_explicit.support.overrides.OVERRIDES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .overrides import GENERIC_SIZES, OVERRIDES

__all__ = ["tiny_config", "config_kwargs"]


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _compatible(default: Any, value: Any) -> bool:
    """A number replaces a number (or ``None``), a sequence a sequence."""
    sequence = (list, tuple)
    if default is None:
        return True
    if isinstance(default, sequence) or isinstance(value, sequence):
        return isinstance(default, sequence) and isinstance(value, sequence)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    return isinstance(default, (int, float)) and isinstance(value, (int, float))


def _lists(value: Any) -> Any:
    return [_lists(item) for item in value] if isinstance(value, (list, tuple)) else value


def _typed(field: dataclasses.Field | None, value: Any) -> Any:
    """The tables hold tuples and mapping proxies (immutable); fields get fresh dicts, and lists where declared."""
    if isinstance(value, Mapping) and not _is_sub_config(field):
        return {key: _typed(None, item) for key, item in value.items()}
    if field is None or not isinstance(value, tuple):
        return value
    default = _default(field)
    declared = str(field.type)
    if isinstance(default, list) or (default is None and "list" in declared and "tuple" not in declared):
        return _lists(value)
    return value


def _is_sub_config(field: dataclasses.Field | None) -> bool:
    return field is not None and "Config" in str(field.type)


def config_kwargs(config_class: type, model_type: str) -> dict[str, Any]:
    """The generic sizes ``config_class`` accepts, then the family's overrides.

    Parameters
    ----------
    config_class : type
        A transformers config class (a dataclass in transformers 5).
    model_type : str
        Its model type (the key of :data:`~lxt_explicit.support.overrides.OVERRIDES`).

    Returns
    -------
    dict
        Constructor arguments; ``attribute_map`` aliases are translated to the field names.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    aliases = dict(getattr(config_class, "attribute_map", {}) or {})
    kwargs: dict[str, Any] = {}
    for key, value in GENERIC_SIZES.items():
        name = _field_name(key, fields, aliases)
        if name is not None and name not in kwargs and _compatible(_default(fields[name]), value):
            kwargs[name] = value
    for key, value in OVERRIDES.get(model_type, {}).items():
        name = _field_name(key, fields, aliases) or key
        kwargs[name] = _typed(fields.get(name), value)
    return kwargs


def _field_name(key: str, fields: dict, aliases: dict) -> str | None:
    """The field ``key`` sets: itself, or the field its ``attribute_map`` alias names."""
    for name in (aliases.get(key, key), key):
        if name in fields:
            return name
    return None


def _sub_configs(config_class: type, kwargs: dict[str, Any], depth: int) -> dict[str, Any]:
    """Tiny configurations of the sub-configs, of the classes the default configuration uses.

    A mapping in ``kwargs`` for a sub-config (from an override) holds extra values for it; its
    ``model_type`` entry, if any, chooses the sub-config's class.
    """
    declared = set(getattr(config_class, "sub_configs", {}) or {})
    names = sorted(declared | {name for name, value in kwargs.items() if isinstance(value, Mapping)})
    if not names:
        return {}
    classes = _default_sub_classes(config_class, names)
    subs = {}
    for name in names:
        extra = dict(kwargs[name]) if isinstance(kwargs.get(name), Mapping) else {}
        if name in kwargs and not extra:
            continue
        if "model_type" in extra:  # an override names the sub-config's model type
            from transformers import CONFIG_MAPPING

            sub_type = extra.pop("model_type")
            subs[name] = _build(CONFIG_MAPPING[sub_type], sub_type, depth + 1, extra)
        elif name in classes:
            subs[name] = _build(classes[name], classes[name].model_type, depth + 1, extra)
        elif extra:
            subs[name] = extra
    return subs


def _default_sub_classes(config_class: type, names: list[str]) -> dict[str, type]:
    """The config classes the default configuration uses for ``names`` (or the declared ones, if the
    default configuration does not validate)."""
    try:
        default = config_class()
    except Exception:  # noqa: BLE001 - a default that does not validate: the declared classes
        declared = getattr(config_class, "sub_configs", {}) or {}
        return {name: declared[name] for name in names if getattr(declared.get(name), "model_type", "")}
    found = {}
    for name in names:
        sub = getattr(default, name, None)
        if hasattr(sub, "model_type") and hasattr(sub, "to_dict"):
            found[name] = type(sub)
    return found


def _build(config_class: type, model_type: str, depth: int = 0, extra: Mapping[str, Any] | None = None):
    kwargs = config_kwargs(config_class, model_type)
    kwargs.update(extra or {})
    if depth < 3:
        kwargs.update(_sub_configs(config_class, kwargs, depth))
    return config_class(**kwargs)


def tiny_config(model_type: str, *, config_class: type | None = None, **extra):
    """A tiny configuration of ``model_type`` (2 layers, hidden size 32, vocabulary 128, ...).

    Parameters
    ----------
    model_type : str
        A key of transformers' ``CONFIG_MAPPING`` (``"llama"``, ``"t5"``, ``"vit"``, ...).
    config_class : type, optional
        The config class to build (default: the model type's, ``AutoConfig.for_model``'s choice);
        a model class whose ``config_class`` is another one (a decoder of a composite family) needs it.
    **extra
        More constructor arguments (``architectures``, ``attn_implementation``, ...), applied last.

    Returns
    -------
    transformers.PreTrainedConfig

    Raises
    ------
    KeyError
        If the installed transformers does not know ``model_type``.
    """
    from transformers import CONFIG_MAPPING

    config_class = config_class or CONFIG_MAPPING[model_type]
    return _build(config_class, getattr(config_class, "model_type", model_type) or model_type, extra=extra)
