// noise_embedding, CUDA reference: the draft slots' input embeddings and the weight gradient.
//
// Build (from the repository root; part of libd2kernels_cuda.so):
//     cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
// or alone:  nvcc -O2 -shared -Xcompiler -fPIC -arch=sm_90 csrc/embedding.cu -o libemb.so
//
// Semantics (docs/semantics.md "Draft slots"): slot k of block n of sample b holds token
// input_ids[b, anchor + k] if k < prefix_lens[b, n] and keep[b, n] and anchor + k < S, else
// mask_token_id; its embedding is weight[token]. Row r = b*N*B + n*B + k of out [Bt*N*B, H].
// Index tensors are contiguous int64 (keep: uint8), as d2kernels/cuda.py passes them.
#include "d2k_common.cuh"

struct SlotLayout {
  const int64_t* input_ids;  // [Bt, S]
  const int64_t* anchors;    // [Bt, N]
  const uint8_t* keep;       // [Bt, N]
  const int64_t* prefix_lens;  // [Bt, N]
  int64_t Bt, S, N, B, mask_token_id;
};

__device__ int64_t slot_token(const SlotLayout& L, int64_t r) {
  int64_t b = r / (L.N * L.B);
  int64_t n = (r / L.B) % L.N;
  int64_t k = r % L.B;
  int64_t blk = b * L.N + n;
  int64_t pos = L.anchors[blk] + k;
  bool visible = L.keep[blk] != 0 && k < L.prefix_lens[blk] && pos >= 0 && pos < L.S;
  return visible ? L.input_ids[b * L.S + pos] : L.mask_token_id;
}

// out[r, h] = weight[slot_token(r), h]; one thread per element (grid-stride loop).
__global__ void noise_embedding_fwd_kernel(const void* weight, int dtype, int64_t sw0, int64_t sw1, SlotLayout L,
                                           int64_t H, void* out) {
  int64_t total = L.Bt * L.N * L.B * H;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    int64_t r = e / H, h = e % H;
    int64_t tok = slot_token(L, r);
    d2k_store(out, e, dtype, d2k_load(weight, tok * sw0 + h * sw1, dtype));
  }
}

// dweight[v, h] = sum over slots r with token v of grad_out[r, h], in slot order (deterministic).
// Block (v, h-chunk); the block's tokens of D2K_THREADS slots at a time are staged in smem.
__global__ void noise_embedding_bwd_kernel(const void* grad_out, int dtype, SlotLayout L, int64_t H, void* dweight) {
  __shared__ int64_t s_tok[D2K_THREADS];
  int64_t v = blockIdx.x;
  int64_t h = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
  int64_t R = L.Bt * L.N * L.B;
  float acc = 0.f;
  for (int64_t r0 = 0; r0 < R; r0 += blockDim.x) {
    __syncthreads();
    if (r0 + threadIdx.x < R) s_tok[threadIdx.x] = slot_token(L, r0 + threadIdx.x);
    __syncthreads();
    int64_t n_here = min((int64_t)blockDim.x, R - r0);
    for (int64_t j = 0; j < n_here; ++j)
      if (s_tok[j] == v && h < H) acc += d2k_load(grad_out, (r0 + j) * H + h, dtype);
  }
  if (h < H) d2k_store(dweight, v * H + h, dtype, acc);
}

static int check_layout(const SlotLayout& L) {
  if (!L.input_ids || !L.anchors || !L.keep || !L.prefix_lens) return d2k_fail(D2K_BAD_ARGUMENT, "null index pointer");
  if (L.Bt < 0 || L.S < 1 || L.N < 0 || L.B < 1) return d2k_fail(D2K_BAD_ARGUMENT, "bad Bt/S/N/B");
  return D2K_OK;
}

// weight [V, H] (element strides sw0, sw1) -> out [Bt*N*B, H] contiguous, same dtype.
D2K_EXPORT int d2k_noise_embedding_fwd(const void* weight, int dtype, int64_t V, int64_t H, int64_t sw0, int64_t sw1,
                                       const int64_t* input_ids, const int64_t* anchors, const uint8_t* keep,
                                       const int64_t* prefix_lens, int64_t Bt, int64_t S, int64_t N, int64_t B,
                                       int64_t mask_token_id, void* out, int device, void* stream) {
  SlotLayout L{input_ids, anchors, keep, prefix_lens, Bt, S, N, B, mask_token_id};
  if (int st = check_layout(L)) return st;
  if (!weight || !out || !d2k_valid_dtype(dtype) || H < 0 || mask_token_id < 0 || mask_token_id >= V)
    return d2k_fail(D2K_BAD_ARGUMENT, "noise_embedding_fwd: bad weight/out/dtype/mask_token_id");
  if (int st = d2k_set_device(device)) return st;
  int64_t total = Bt * N * B * H;
  if (total == 0) return D2K_OK;
  int blocks = (int)std::min<int64_t>((total + D2K_THREADS - 1) / D2K_THREADS, 65536);
  noise_embedding_fwd_kernel<<<blocks, D2K_THREADS, 0, (cudaStream_t)stream>>>(weight, dtype, sw0, sw1, L, H, out);
  return d2k_launch_status("noise_embedding_fwd_kernel");
}

// grad_out [Bt*N*B, H] contiguous -> dweight [V, H] contiguous, same dtype; every row written.
D2K_EXPORT int d2k_noise_embedding_bwd(const void* grad_out, int dtype, int64_t H, const int64_t* input_ids,
                                       const int64_t* anchors, const uint8_t* keep, const int64_t* prefix_lens,
                                       int64_t Bt, int64_t S, int64_t N, int64_t B, int64_t mask_token_id, int64_t V,
                                       void* dweight, int device, void* stream) {
  SlotLayout L{input_ids, anchors, keep, prefix_lens, Bt, S, N, B, mask_token_id};
  if (int st = check_layout(L)) return st;
  if (!grad_out || !dweight || !d2k_valid_dtype(dtype) || H < 0 || V < 0)
    return d2k_fail(D2K_BAD_ARGUMENT, "noise_embedding_bwd: bad grad_out/dweight/dtype/sizes");
  if (int st = d2k_set_device(device)) return st;
  if (V == 0 || H == 0) return D2K_OK;
  dim3 grid((unsigned)V, (unsigned)((H + D2K_THREADS - 1) / D2K_THREADS));
  noise_embedding_bwd_kernel<<<grid, D2K_THREADS, 0, (cudaStream_t)stream>>>(grad_out, dtype, L, H, dweight);
  return d2k_launch_status("noise_embedding_bwd_kernel");
}
