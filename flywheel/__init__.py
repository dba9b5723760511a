"""Flywheel: a chatbot backend that improves itself from its users."""

__version__ = "0.1.0"
