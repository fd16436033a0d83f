// C ABI glue of libd2kernels_cuda.so: the text of the last error on this thread.
// Build: see CMakeLists.txt at the repository root (cmake -S . -B build && cmake --build build -j).
#include "d2k_common.cuh"

D2K_EXPORT const char* d2k_last_error() { return d2k_error_buffer(); }

// ABI version: d2kernels/cuda.py refuses a library built from other sources.
D2K_EXPORT int d2k_abi_version() { return 2; }
