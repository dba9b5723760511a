"""The demo model: a few-million-parameter Llama chatbot built from code, no downloads.

``build_demo_model`` trains it on a synthetic chat corpus; ``judge`` is the simulated user's
taste that scores its answers.
"""

from flywheel.demo_model.build import build_demo_model

__all__ = ["build_demo_model"]
