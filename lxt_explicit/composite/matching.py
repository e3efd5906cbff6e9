"""Layer-map keys (which modules), layer-map values (which rule) and the op table (which torch functions)."""

from __future__ import annotations

import fnmatch
import re
from typing import Callable

from torch import nn

from ..ops import OP_GROUPS, op_name
from ..rules import Rule

__all__ = ["matcher", "rule_template", "op_table"]


def matcher(key) -> Callable[[str, nn.Module], bool]:
    """A predicate ``(name, module) -> bool`` for a layer-map key."""
    # classes are matched with isinstance, which also covers abstract groups such as zennit.types.Linear
    if isinstance(key, type) or (isinstance(key, tuple) and key and all(isinstance(k, type) for k in key)):
        return lambda name, module: isinstance(module, key)
    if isinstance(key, str):
        if any(ch in key for ch in "*?["):
            return lambda name, module: fnmatch.fnmatchcase(name, key)
        return lambda name, module: name == key
    if isinstance(key, re.Pattern):
        return lambda name, module: key.fullmatch(name) is not None
    if callable(key):
        return key
    raise TypeError(
        f"unsupported layer-map key {key!r}: use a module class (or a tuple of them), a module name, "
        "a name pattern (glob string or compiled regular expression), or a predicate (name, module) -> bool"
    )


def rule_template(key, value) -> Rule | None:
    """The rule a layer-map value stands for: ``None``, a configured rule, or a rule class (configured by default)."""
    if value is None or isinstance(value, Rule):
        return value
    if isinstance(value, type) and issubclass(value, Rule):
        return value()
    hint = ""
    if callable(getattr(value, "copy", None)) and callable(getattr(value, "register", None)):
        hint = " For a Zennit rule, use lxt_explicit.zennit_interop.ZennitRule(rule)."
    raise TypeError(
        f"the rule for layer-map key {key!r} must be a Rule subclass, a configured Rule instance, or None; "
        f"got {value!r}.{hint}"
    )


def op_table(ops) -> dict:
    """Torch function -> (op name, rule) for an op map keyed by op names or torch functions."""
    table: dict[Callable, tuple[str, Rule]] = {}
    for key, value in (ops or {}).items():
        if isinstance(value, type) and issubclass(value, Rule):
            value = value()
        if not isinstance(value, Rule):
            raise TypeError(f"the rule for op {key!r} must be a Rule subclass or instance, got {value!r}")
        if isinstance(key, str):
            if key not in OP_GROUPS:
                raise KeyError(f"unknown op name {key!r}; known op names: {', '.join(sorted(OP_GROUPS))}")
            for func in OP_GROUPS[key]:
                table[func] = (key, value)
        elif callable(key):
            table[key] = (op_name(key), value)
        else:
            names = ", ".join(sorted(OP_GROUPS))
            raise TypeError(f"op-map keys are op names ({names}) or torch functions, got {key!r}")
    return table
