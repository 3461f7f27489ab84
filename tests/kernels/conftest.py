"""Without a GPU, kernel tests run Triton on CPU tensors through its interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it is set here, before any test
module imports `kernels`. With CUDA present it is left alone so the gpu tests run real Triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
