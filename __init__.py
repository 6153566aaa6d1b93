"""rechannel: compress a causal LM, measure what it lost, recover it with routed soft prompts."""

from .ops.core.version import __version__

__all__ = ["__version__"]
