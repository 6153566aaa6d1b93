"""Triton kernels for the hot paths. Each module names the ops/ function it must equal.

Imported lazily (only when a CUDA tensor reaches a dispatching ops/ function), so rechannel imports and
runs without a GPU or without triton. On a machine without a GPU the tests run these kernels in Triton's
interpreter (TRITON_INTERPRET=1, set before the first kernel module is imported).
"""
