"""Adapter for transformers' gradient checkpointing: recomputed layers run under the rules.

transformers checkpoints a layer's *class* ``forward`` (``GradientCheckpointingLayer``) through
the layer's ``_gradient_checkpointing_func``, so the backward pass recomputes the layer without
passing through the instance-level wrappers of a registered Composite.  This extension gives such
layers, while registered, a checkpoint function whose recomputation is routed like the forward pass,
with the per-forward settings of other extensions (``Registration.keep_for_recomputation``) as they
were in that forward pass.
"""

from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["TransformersCheckpointing"]

_ATTRIBUTE = "_gradient_checkpointing_func"


class TransformersCheckpointing:
    """A :class:`~lxt_explicit.composite.Composite` extension for models with transformers' gradient checkpointing.

    Before every call of a module whose class has a ``gradient_checkpointing`` attribute, a
    checkpoint function set by transformers (``model.activation_checkpointing_enable()``, also
    after registration) is replaced by one whose recomputation is routed through the Composite.
    The original function is put back when the Composite is removed.
    """

    #: Only instance attributes change (undone on removal, left out of copies).
    changes_model = False

    def register(self, model: nn.Module, registration) -> dict:
        for name, module in model.named_modules():
            if hasattr(type(module), "gradient_checkpointing"):
                registration.before_call(module, self._router_for(name, registration))
        return {}

    @staticmethod
    def _router_for(name: str, registration):
        def route_recomputation(module, args, kwargs):
            checkpoint = module.__dict__.get(_ATTRIBUTE)
            if checkpoint is None or getattr(checkpoint, "__lxt_routed__", False):
                return

            def routed_checkpoint(function, *args, **kwargs):
                # the extensions' settings of this forward pass, for a recomputation after later ones
                settings = [capture() for capture in registration.recomputation_states]

                def run(*inner_args, **inner_kwargs):
                    with contextlib.ExitStack() as stack:
                        for setting in settings:
                            stack.enter_context(setting())
                        return registration.router.run_routed(name, function, inner_args, inner_kwargs)

                return checkpoint(run, *args, **kwargs)

            routed_checkpoint.__lxt_routed__ = True
            registration.override(module, _ATTRIBUTE, routed_checkpoint)

        return route_recomputation

    def __repr__(self) -> str:
        return "TransformersCheckpointing()"
