// decayed_cross_entropy, CUDA reference: lm_head fused with the weighted cross-entropy.
//
// Build (from the repository root; part of libd2kernels_cuda.so):
//     cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
// or alone:  nvcc -O2 -shared -Xcompiler -fPIC -arch=sm_90 csrc/cross_entropy.cu -o libce.so
//
// Semantics (docs/semantics.md "Labels, supervision and decay"): hidden [T, H], weight [V, H], labels [T],
// token weights w [T] (float32, w = 0: unsupervised, never read). z = hidden @ weight^T, optionally
// softcapped zc = c * tanh(z / c); lse_t = logsumexp_v zc; num = sum_t w_t (lse_t - zc[t, label_t]),
// den = sum_t w_t. Backward: d num / d z[t, v] = g w_t (softmax_v - [v == label_t]) dzc/dz.
// No logits tensor: each thread computes one logit at a time as a float32 dot product over H,
// and a block holds at most one chunk of D2K_THREADS logits (or their gradients) in smem.
#include "d2k_common.cuh"

struct CEInputs {
  const void* hidden;  // [T, H], element strides sh0, sh1
  int hidden_dtype;
  int64_t sh0, sh1;
  const void* weight;  // [V, H], element strides sw0, sw1
  int weight_dtype;
  int64_t sw0, sw1;
  const int64_t* labels;       // [T]
  const float* token_weights;  // [T]
  int64_t T, V, H;
  float softcap;  // 0 = none
};

// Softcapped logit of (token t, vocab row v), float32.
__device__ float ce_logit(const CEInputs& in, int64_t t, int64_t v) {
  float z = 0.f;
  for (int64_t h = 0; h < in.H; ++h)
    z += d2k_load(in.hidden, t * in.sh0 + h * in.sh1, in.hidden_dtype) *
         d2k_load(in.weight, v * in.sw0 + h * in.sw1, in.weight_dtype);
  return in.softcap > 0.f ? in.softcap * tanhf(z / in.softcap) : z;
}

// d num / d z for (t, v), given the token's lse; 0 for unsupervised tokens.
__device__ float ce_dlogit(const CEInputs& in, float g, int64_t t, int64_t v, const float* lse) {
  float w = in.token_weights[t];
  if (w == 0.f) return 0.f;
  float zc = ce_logit(in, t, v);
  float d = expf(zc - lse[t]) - (v == in.labels[t] ? 1.f : 0.f);
  if (in.softcap > 0.f) {
    float th = zc / in.softcap;
    d *= 1.f - th * th;  // d(c tanh(z/c))/dz
  }
  return g * w * d;
}

// One block per token: lse, the weighted loss w (lse - zc[label]) and argmax == label.
__global__ void ce_fwd_token_kernel(CEInputs in, float* lse, float* token_loss, uint8_t* correct) {
  __shared__ float red[D2K_THREADS];
  __shared__ float s_best_z[D2K_THREADS];
  __shared__ int64_t s_best_v[D2K_THREADS];
  __shared__ float s_label_z;
  int64_t t = blockIdx.x;
  float w = in.token_weights[t];
  if (w == 0.f) {
    if (threadIdx.x == 0) {
      lse[t] = 0.f;
      token_loss[t] = 0.f;
      if (correct) correct[t] = 0;
    }
    return;
  }
  int64_t label = in.labels[t];
  // Per thread: online max m / rescaled sum l over its vocab rows, and its first argmax.
  float m = -INFINITY, l = 0.f, best_z = -INFINITY;
  int64_t best_v = in.V;
  for (int64_t v = threadIdx.x; v < in.V; v += blockDim.x) {
    float z = ce_logit(in, t, v);
    if (v == label) s_label_z = z;
    if (z > best_z) best_z = z, best_v = v;
    float m_new = fmaxf(m, z);
    l = l * expf(m - m_new) + expf(z - m_new);
    m = m_new;
  }
  float m_all = d2k_block_max(m, red);
  float l_all = d2k_block_sum(m == -INFINITY ? 0.f : l * expf(m - m_all), red);
  // Argmax: larger logit wins, ties go to the smaller vocab index (torch.argmax's first max).
  s_best_z[threadIdx.x] = best_z;
  s_best_v[threadIdx.x] = best_v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      float oz = s_best_z[threadIdx.x + s];
      int64_t ov = s_best_v[threadIdx.x + s];
      if (oz > s_best_z[threadIdx.x] || (oz == s_best_z[threadIdx.x] && ov < s_best_v[threadIdx.x]))
        s_best_z[threadIdx.x] = oz, s_best_v[threadIdx.x] = ov;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    float lse_t = m_all + logf(l_all);
    lse[t] = lse_t;
    token_loss[t] = w * (lse_t - s_label_z);
    if (correct) correct[t] = s_best_v[0] == label;
  }
}

// One block: num = sum token_loss, den = sum w, in a fixed order (deterministic).
__global__ void ce_fwd_sum_kernel(const float* token_loss, const float* token_weights, int64_t T, float* num,
                                  float* den) {
  __shared__ float red[D2K_THREADS];
  float a = 0.f, b = 0.f;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) a += token_loss[t], b += token_weights[t];
  float sa = d2k_block_sum(a, red);
  float sb = d2k_block_sum(b, red);
  if (threadIdx.x == 0) *num = sa, *den = sb;
}

// dhidden[t, h] = sum_v dz[t, v] weight[v, h]; block (t, h-chunk), vocab in chunks of D2K_THREADS.
__global__ void ce_bwd_dhidden_kernel(CEInputs in, const float* grad_num, const float* lse, void* dhidden) {
  __shared__ float s_dz[D2K_THREADS];
  int64_t t = blockIdx.x;
  int64_t h = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
  float g = *grad_num, acc = 0.f;
  if (in.token_weights[t] != 0.f) {
    for (int64_t v0 = 0; v0 < in.V; v0 += blockDim.x) {
      __syncthreads();
      int64_t v = v0 + threadIdx.x;
      s_dz[threadIdx.x] = v < in.V ? ce_dlogit(in, g, t, v, lse) : 0.f;
      __syncthreads();
      int64_t n_here = min((int64_t)blockDim.x, in.V - v0);
      for (int64_t j = 0; j < n_here && h < in.H; ++j)
        acc += s_dz[j] * d2k_load(in.weight, (v0 + j) * in.sw0 + h * in.sw1, in.weight_dtype);
    }
  }
  if (h < in.H) d2k_store(dhidden, t * in.H + h, in.hidden_dtype, acc);
}

// dweight[v, h] = sum_t dz[t, v] hidden[t, h]; block (v, h-chunk), tokens in chunks of D2K_THREADS.
__global__ void ce_bwd_dweight_kernel(CEInputs in, const float* grad_num, const float* lse, void* dweight) {
  __shared__ float s_dz[D2K_THREADS];
  int64_t v = blockIdx.x;
  int64_t h = blockIdx.y * (int64_t)blockDim.x + threadIdx.x;
  float g = *grad_num, acc = 0.f;
  for (int64_t t0 = 0; t0 < in.T; t0 += blockDim.x) {
    __syncthreads();
    int64_t t = t0 + threadIdx.x;
    s_dz[threadIdx.x] = t < in.T ? ce_dlogit(in, g, t, v, lse) : 0.f;
    __syncthreads();
    int64_t n_here = min((int64_t)blockDim.x, in.T - t0);
    for (int64_t j = 0; j < n_here && h < in.H; ++j)
      if (s_dz[j] != 0.f) acc += s_dz[j] * d2k_load(in.hidden, (t0 + j) * in.sh0 + h * in.sh1, in.hidden_dtype);
  }
  if (h < in.H) d2k_store(dweight, v * in.H + h, in.weight_dtype, acc);
}

static int check_inputs(const CEInputs& in) {
  if (!in.hidden || !in.weight || !in.labels || !in.token_weights)
    return d2k_fail(D2K_BAD_ARGUMENT, "decayed_ce: null input pointer");
  if (!d2k_valid_dtype(in.hidden_dtype) || !d2k_valid_dtype(in.weight_dtype))
    return d2k_fail(D2K_BAD_ARGUMENT, "decayed_ce: dtype must be float32, float16 or bfloat16");
  if (in.T < 0 || in.V < 1 || in.H < 0 || !(in.softcap >= 0.f))
    return d2k_fail(D2K_BAD_ARGUMENT, "decayed_ce: bad T/V/H/softcap");
  return D2K_OK;
}

// Forward. Outputs (device, float32): num, den (scalars), lse [T] (0 where w == 0); correct [T]
// (uint8, may be null); token_loss [T] is float32 scratch.
D2K_EXPORT int d2k_decayed_ce_fwd(const void* hidden, int hidden_dtype, int64_t sh0, int64_t sh1, const void* weight,
                                  int weight_dtype, int64_t sw0, int64_t sw1, const int64_t* labels,
                                  const float* token_weights, int64_t T, int64_t V, int64_t H, float softcap,
                                  float* num, float* den, float* lse, uint8_t* correct, float* token_loss, int device,
                                  void* stream) {
  CEInputs in{hidden, hidden_dtype, sh0, sh1, weight, weight_dtype, sw0, sw1, labels, token_weights, T, V, H, softcap};
  if (int st = check_inputs(in)) return st;
  if (!num || !den || (T > 0 && (!lse || !token_loss))) return d2k_fail(D2K_BAD_ARGUMENT, "decayed_ce_fwd: null output");
  if (int st = d2k_set_device(device)) return st;
  cudaStream_t s = (cudaStream_t)stream;
  if (T > 0) ce_fwd_token_kernel<<<(unsigned)T, D2K_THREADS, 0, s>>>(in, lse, token_loss, correct);
  ce_fwd_sum_kernel<<<1, D2K_THREADS, 0, s>>>(token_loss, token_weights, T, num, den);
  return d2k_launch_status("decayed_ce_fwd");
}

// Backward. grad_num: device float32 scalar. dhidden [T, H] (hidden's dtype) and dweight [V, H]
// (weight's dtype) are contiguous and each may be null (not needed).
D2K_EXPORT int d2k_decayed_ce_bwd(const float* grad_num, const void* hidden, int hidden_dtype, int64_t sh0, int64_t sh1,
                                  const void* weight, int weight_dtype, int64_t sw0, int64_t sw1,
                                  const int64_t* labels, const float* token_weights, const float* lse, int64_t T,
                                  int64_t V, int64_t H, float softcap, void* dhidden, void* dweight, int device,
                                  void* stream) {
  CEInputs in{hidden, hidden_dtype, sh0, sh1, weight, weight_dtype, sw0, sw1, labels, token_weights, T, V, H, softcap};
  if (int st = check_inputs(in)) return st;
  if (!grad_num || (T > 0 && !lse)) return d2k_fail(D2K_BAD_ARGUMENT, "decayed_ce_bwd: null grad_num/lse");
  if (int st = d2k_set_device(device)) return st;
  cudaStream_t s = (cudaStream_t)stream;
  unsigned h_chunks = (unsigned)((H + D2K_THREADS - 1) / D2K_THREADS);
  if (dhidden && T > 0 && H > 0)
    ce_bwd_dhidden_kernel<<<dim3((unsigned)T, h_chunks), D2K_THREADS, 0, s>>>(in, grad_num, lse, dhidden);
  if (dweight && H > 0)
    ce_bwd_dweight_kernel<<<dim3((unsigned)V, h_chunks), D2K_THREADS, 0, s>>>(in, grad_num, lse, dweight);
  return d2k_launch_status("decayed_ce_bwd");
}
