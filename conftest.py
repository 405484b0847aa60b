"""Session-wide test setup.

Without a GPU, the Triton kernels run in Triton's interpreter. Triton must see TRITON_INTERPRET=1
before `triton.language` is first imported (importing the runtime imports the kernels, which import
triton), or interpreted kernels fail on nested `tl.*` helpers; so it is set here, before any test
module is imported. On a GPU machine the variable is left alone and the kernels compile.
"""
import os

try:
    import torch
    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False

if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
