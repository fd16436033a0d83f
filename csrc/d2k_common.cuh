// Shared helpers of the d2kernels CUDA reference kernels: dtype codes, scalar loads/stores,
// block reductions and the error reporting of the C ABI. Deliberately plain: every kernel
// converts to float32 on load, accumulates in float32 and converts once on store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

// Dtype codes of the C ABI (d2kernels/cuda.py mirrors them).
enum D2kDtype : int { D2K_F32 = 0, D2K_F16 = 1, D2K_BF16 = 2 };

// Error codes returned by every exported function (0 = success); d2k_last_error() has the text.
enum D2kStatus : int { D2K_OK = 0, D2K_BAD_ARGUMENT = 1, D2K_CUDA_ERROR = 2 };

constexpr int D2K_THREADS = 128;  // threads per block of every kernel

// Element strides of a 4-d tensor, passed to kernels by value.
struct D2kStrides4 {
  int64_t s0, s1, s2, s3;
};

__device__ __forceinline__ float d2k_load(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case D2K_F16: return __half2float(static_cast<const __half*>(p)[i]);
    case D2K_BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void d2k_store(void* p, int64_t i, int dtype, float x) {
  switch (dtype) {
    case D2K_F16: static_cast<__half*>(p)[i] = __float2half(x); break;
    case D2K_BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(x); break;
    default: static_cast<float*>(p)[i] = x;
  }
}

// Sum of x over the block (every thread gets the result). `red` is D2K_THREADS floats of smem.
__device__ __forceinline__ float d2k_block_sum(float x, float* red) {
  __syncthreads();  // red may still be read by a previous reduction
  red[threadIdx.x] = x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  return red[0];
}

// Max of x over the block (every thread gets the result).
__device__ __forceinline__ float d2k_block_max(float x, float* red) {
  __syncthreads();
  red[threadIdx.x] = x;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  return red[0];
}

// Thread-local text of the last error, shared by all translation units (inline = one instance).
inline char* d2k_error_buffer() {
  static thread_local char buf[512] = "";
  return buf;
}

inline int d2k_fail(int code, const char* what) {
  snprintf(d2k_error_buffer(), 512, "%s", what);
  return code;
}

inline bool d2k_valid_dtype(int dtype) { return dtype == D2K_F32 || dtype == D2K_F16 || dtype == D2K_BF16; }

// Select the tensors' device on this thread (this library has its own static CUDA runtime).
inline int d2k_set_device(int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) {
    snprintf(d2k_error_buffer(), 512, "cudaSetDevice(%d): %s", device, cudaGetErrorString(err));
    return D2K_CUDA_ERROR;
  }
  return D2K_OK;
}

// Status of the launches just made (launch errors only; kernels run asynchronously).
inline int d2k_launch_status(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    snprintf(d2k_error_buffer(), 512, "%s: %s", what, cudaGetErrorString(err));
    return D2K_CUDA_ERROR;
  }
  return D2K_OK;
}

#define D2K_EXPORT extern "C" __attribute__((visibility("default")))
