"""The device the Triton kernel tests run on, or a module-level skip when they cannot run.

`from tests.triton_kernels import DEVICE`. Without CUDA the kernels run in Triton's interpreter: the
root conftest.py sets TRITON_INTERPRET=1 before any test module is imported (it must be set before
`triton.language` is first imported); it is set here too for imports outside pytest. The importing
test module is skipped when triton is not installed, or when there is no CUDA device and the
interpreter was switched off.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from avatar_kernels._triton_util import interpreting

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is disabled", allow_module_level=True)
