"""The demo model: a small Llama chatbot built from code, no downloads.

``build_demo_model`` trains it on a synthetic chat corpus (``corpus``, ``tasks``) with its own
BPE tokenizer (``tokenizer``); ``judge`` is the simulated user's taste that scores its answers,
``evaluate`` samples and judges a model directory. ``python -m flywheel.demo_model --out DIR``.
"""

from flywheel.demo_model.build import build_demo_model

__all__ = ["build_demo_model"]
