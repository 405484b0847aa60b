"""Triton kernels for the streaming DiT, each beside a plain fp32 PyTorch reference.

No model knowledge here: tensors, shapes and positions in; tensors out.
"""
