"""DaMO platform: train, tune, evaluate and serve an audio-visual Video LLM on Ray."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("damo-platform")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
