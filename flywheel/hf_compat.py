"""Where transformers' API moved between the versions Flywheel supports (>= 5.16)."""

from __future__ import annotations

import functools
import inspect


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` from transformers 5.24 on
    (``past_key_values`` is deprecated there, to go in 5.40), ``past_key_values`` before."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output: object) -> object:
    """The KV cache a forward pass returned: its output's ``cache`` from transformers 5.24 on
    (``past_key_values``, the field's name before, is a deprecated alias there)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
