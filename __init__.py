"""rechannel: compress a causal LM, measure what it lost, recover it with routed soft prompts."""

__version__ = "0.1.0"
