"""DaMO platform: train, tune, evaluate and serve an audio-visual Video LLM on Ray."""

from damo.version import __version__

__all__ = ["__version__"]
