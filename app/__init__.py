"""edgebatch core: plain Python, testable without Ray."""

__version__ = "0.1.0"
