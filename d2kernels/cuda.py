"""Loader of the CMake-built CUDA reference library (``backend="cuda"``)."""
from __future__ import annotations

import os

BUILD_HELP = (
    "the CUDA reference library of d2kernels is not built. Build it from the repository root with:\n"
    "    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release\n"
    "    cmake --build build -j\n"
    "or point D2KERNELS_CUDA_LIB at an existing libd2kernels_cuda.so"
)


def load_library():
    raise RuntimeError("backend='cuda' is not available yet: " + BUILD_HELP)
