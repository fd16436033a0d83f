// varprefix_attention, CUDA reference: variable-prefix block-sparse attention, forward and backward.
//
// Build (from the repository root; part of libd2kernels_cuda.so):
//     cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j
// or alone:  nvcc -O2 -shared -Xcompiler -fPIC -arch=sm_90 csrc/attention.cu -o libattn.so
//
// Semantics (docs/semantics.md "Attention mask"): q [Bt, NB, Hq, D] (NB = N*B), k/v_ctx [Bt, S, Hkv, D],
// k/v_draft [Bt, NB, Hkv, D]. Query slot i belongs to block n = i / B; it sees context keys
// j < anchor[n] and the B draft slots n*B .. n*B+B-1 (so anchor[n] + B keys, listed as
// u < anchor: context u, else draft slot n*B + u - anchor). A dummy block (keep = 0) sees
// nothing: its output is 0, its lse is 0 (by convention), it takes and gives no gradient.
// GQA: query head h reads kv head h / (Hq / Hkv). Scores are float32 dot products; softmax in
// two passes per query row (max/sum, then the weighted sum of values).
#include "d2k_common.cuh"

struct AttnInputs {
  const void *q, *k_ctx, *v_ctx, *k_draft, *v_draft;
  D2kStrides4 sq, skc, svc, skd, svd;
  int dtype;
  const int64_t* anchors;  // [Bt, N]
  const uint8_t* keep;     // [Bt, N]
  int64_t Bt, N, B, S, Hq, Hkv, D;
  float scale;
};

__device__ __forceinline__ int64_t off4(const D2kStrides4& s, int64_t a, int64_t b, int64_t c, int64_t d) {
  return a * s.s0 + b * s.s1 + c * s.s2 + d * s.s3;
}

// Pointer/stride of key u (0 <= u < anchor + B) of query block n, for k (or v when want_v).
__device__ __forceinline__ void key_row(const AttnInputs& in, int64_t b, int64_t n, int64_t anchor, int64_t u,
                                        int64_t kvh, bool want_v, const void** p, int64_t* base, int64_t* sd) {
  if (u < anchor) {
    const D2kStrides4& s = want_v ? in.svc : in.skc;
    *p = want_v ? in.v_ctx : in.k_ctx;
    *base = off4(s, b, u, kvh, 0);
    *sd = s.s3;
  } else {
    const D2kStrides4& s = want_v ? in.svd : in.skd;
    *p = want_v ? in.v_draft : in.k_draft;
    *base = off4(s, b, n * in.B + (u - anchor), kvh, 0);
    *sd = s.s3;
  }
}

// Row dot product sum_d x[xb + d*xs] * y[yb + d*ys] in float32.
__device__ float row_dot(const void* x, int64_t xb, int64_t xs, const void* y, int64_t yb, int64_t ys, int64_t D,
                         int dtype) {
  float acc = 0.f;
  for (int64_t d = 0; d < D; ++d) acc += d2k_load(x, xb + d * xs, dtype) * d2k_load(y, yb + d * ys, dtype);
  return acc;
}

// scale * q[b, i, h] . k[key u]
__device__ float score(const AttnInputs& in, int64_t b, int64_t i, int64_t h, int64_t n, int64_t anchor, int64_t u,
                       int64_t kvh) {
  const void* kp;
  int64_t kb, ks;
  key_row(in, b, n, anchor, u, kvh, false, &kp, &kb, &ks);
  return in.scale * row_dot(in.q, off4(in.sq, b, i, h, 0), in.sq.s3, kp, kb, ks, in.D, in.dtype);
}

// One block per query row (i, h, b): lse [Bt, Hq, NB] and o [Bt, NB, Hq, D] (contiguous).
__global__ void attn_fwd_kernel(AttnInputs in, void* o, float* lse) {
  __shared__ float red[D2K_THREADS];
  __shared__ float s_p[D2K_THREADS];
  int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  int64_t NB = in.N * in.B, n = i / in.B, kvh = h / (in.Hq / in.Hkv);
  int64_t o_row = ((b * NB + i) * in.Hq + h) * in.D;
  int64_t lse_i = (b * in.Hq + h) * NB + i;
  if (!in.keep[b * in.N + n]) {
    for (int64_t d = threadIdx.x; d < in.D; d += blockDim.x) d2k_store(o, o_row + d, in.dtype, 0.f);
    if (threadIdx.x == 0) lse[lse_i] = 0.f;
    return;
  }
  int64_t anchor = in.anchors[b * in.N + n];
  int64_t L = anchor + in.B;  // visible keys; always >= B >= 1
  // Pass 1: m = max score, l = sum exp(score - m).
  float m = -INFINITY;
  for (int64_t u = threadIdx.x; u < L; u += blockDim.x) m = fmaxf(m, score(in, b, i, h, n, anchor, u, kvh));
  m = d2k_block_max(m, red);
  float l = 0.f;
  for (int64_t u = threadIdx.x; u < L; u += blockDim.x) l += expf(score(in, b, i, h, n, anchor, u, kvh) - m);
  l = d2k_block_sum(l, red);
  float lse_row = m + logf(l);
  // Pass 2: o[d] = sum_u p_u v_u[d], keys in chunks of D2K_THREADS, dims in chunks of D2K_THREADS.
  for (int64_t d0 = 0; d0 < in.D; d0 += blockDim.x) {
    int64_t d = d0 + threadIdx.x;
    float acc = 0.f;
    for (int64_t u0 = 0; u0 < L; u0 += blockDim.x) {
      __syncthreads();
      int64_t u = u0 + threadIdx.x;
      s_p[threadIdx.x] = u < L ? expf(score(in, b, i, h, n, anchor, u, kvh) - lse_row) : 0.f;
      __syncthreads();
      for (int64_t j = 0; j < blockDim.x && u0 + j < L && d < in.D; ++j) {
        const void* vp;
        int64_t vb, vs;
        key_row(in, b, n, anchor, u0 + j, kvh, true, &vp, &vb, &vs);
        acc += s_p[j] * d2k_load(vp, vb + d * vs, in.dtype);
      }
    }
    if (d < in.D) d2k_store(o, o_row + d, in.dtype, acc);
  }
  if (threadIdx.x == 0) lse[lse_i] = lse_row;
}

struct AttnGradInputs {
  const void* dout;  // [Bt, NB, Hq, D], strides sdo
  D2kStrides4 sdo;
  const float* lse;    // [Bt, Hq, NB]
  const float* delta;  // [Bt, Hq, NB], from attn_bwd_delta_kernel
};

// P and dP = do . v of (query row i, head h) against key u.
__device__ void prob_dprob(const AttnInputs& in, const AttnGradInputs& g, int64_t b, int64_t i, int64_t h, int64_t n,
                           int64_t anchor, int64_t u, int64_t kvh, float* p, float* dp) {
  int64_t NB = in.N * in.B;
  *p = expf(score(in, b, i, h, n, anchor, u, kvh) - g.lse[(b * in.Hq + h) * NB + i]);
  const void* vp;
  int64_t vb, vs;
  key_row(in, b, n, anchor, u, kvh, true, &vp, &vb, &vs);
  *dp = row_dot(g.dout, off4(g.sdo, b, i, h, 0), g.sdo.s3, vp, vb, vs, in.D, in.dtype);
}

// One block per query row: delta = sum_u P_u dP_u (= do . o in exact arithmetic; summed from P
// and dP in float32 so the low-precision stored o plays no part). 0 for dummy blocks.
__global__ void attn_bwd_delta_kernel(AttnInputs in, AttnGradInputs g, float* delta) {
  __shared__ float red[D2K_THREADS];
  int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  int64_t NB = in.N * in.B, n = i / in.B, kvh = h / (in.Hq / in.Hkv);
  bool kept = in.keep[b * in.N + n] != 0;
  int64_t anchor = kept ? in.anchors[b * in.N + n] : 0;
  int64_t L = kept ? anchor + in.B : 0;
  float acc = 0.f;
  for (int64_t u = threadIdx.x; u < L; u += blockDim.x) {
    float p, dp;
    prob_dprob(in, g, b, i, h, n, anchor, u, kvh, &p, &dp);
    acc += p * dp;
  }
  acc = d2k_block_sum(acc, red);
  if (threadIdx.x == 0) delta[(b * in.Hq + h) * NB + i] = acc;
}

// dS of (query row i, head h) against key u: P (dP - delta); also returns P.
__device__ float dscore(const AttnInputs& in, const AttnGradInputs& g, int64_t b, int64_t i, int64_t h, int64_t n,
                        int64_t anchor, int64_t u, int64_t kvh, float* p_out) {
  float p, dp;
  prob_dprob(in, g, b, i, h, n, anchor, u, kvh, &p, &dp);
  *p_out = p;
  return p * (dp - g.delta[(b * in.Hq + h) * in.N * in.B + i]);
}

// One block per query row: dq[d] = scale * sum_u dS_u k_u[d]; zero for dummy blocks.
__global__ void attn_bwd_dq_kernel(AttnInputs in, AttnGradInputs g, void* dq) {
  __shared__ float s_ds[D2K_THREADS];
  int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  int64_t NB = in.N * in.B, n = i / in.B, kvh = h / (in.Hq / in.Hkv);
  int64_t row = ((b * NB + i) * in.Hq + h) * in.D;
  bool kept = in.keep[b * in.N + n] != 0;
  int64_t anchor = kept ? in.anchors[b * in.N + n] : 0;
  int64_t L = kept ? anchor + in.B : 0;
  for (int64_t d0 = 0; d0 < in.D; d0 += blockDim.x) {
    int64_t d = d0 + threadIdx.x;
    float acc = 0.f;
    for (int64_t u0 = 0; u0 < L; u0 += blockDim.x) {
      __syncthreads();
      int64_t u = u0 + threadIdx.x;
      float p;
      s_ds[threadIdx.x] = u < L ? dscore(in, g, b, i, h, n, anchor, u, kvh, &p) : 0.f;
      __syncthreads();
      for (int64_t j = 0; j < blockDim.x && u0 + j < L && d < in.D; ++j) {
        const void* kp;
        int64_t kb, ks;
        key_row(in, b, n, anchor, u0 + j, kvh, false, &kp, &kb, &ks);
        acc += s_ds[j] * d2k_load(kp, kb + d * ks, in.dtype);
      }
    }
    if (d < in.D) d2k_store(dq, row + d, in.dtype, in.scale * acc);
  }
}

// One block per key (key index x over [context 0..S-1 ; draft slots 0..NB-1], kv head, b):
// dk[d] = scale * sum dS q[d], dv[d] = sum P do[d] over the query rows (slot, head of the group)
// that see it. Candidates: context key j -> every slot of every kept block with j < anchor;
// draft slot j -> the B slots of its own block, if kept.
__global__ void attn_bwd_dkv_kernel(AttnInputs in, AttnGradInputs g, void* dk_ctx, void* dv_ctx, void* dk_draft,
                                    void* dv_draft) {
  __shared__ float s_ds[D2K_THREADS];
  __shared__ float s_p[D2K_THREADS];
  __shared__ int64_t s_i[D2K_THREADS];
  __shared__ int64_t s_h[D2K_THREADS];
  int64_t x = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  int64_t NB = in.N * in.B, G = in.Hq / in.Hkv;
  bool is_ctx = x < in.S;
  int64_t j = is_ctx ? x : x - in.S;
  int64_t first_slot = is_ctx ? 0 : (j / in.B) * in.B;
  int64_t n_cand = (is_ctx ? NB : in.B) * G;
  void* dk = is_ctx ? dk_ctx : dk_draft;
  void* dv = is_ctx ? dv_ctx : dv_draft;
  int64_t out_row = ((b * (is_ctx ? in.S : NB) + j) * in.Hkv + kvh) * in.D;
  for (int64_t d0 = 0; d0 < in.D; d0 += blockDim.x) {
    int64_t d = d0 + threadIdx.x;
    float acc_k = 0.f, acc_v = 0.f;
    for (int64_t c0 = 0; c0 < n_cand; c0 += blockDim.x) {
      __syncthreads();
      int64_t c = c0 + threadIdx.x;
      float ds = 0.f, p = 0.f;
      int64_t i = first_slot + c / G, h = kvh * G + c % G;
      if (c < n_cand) {
        int64_t n = i / in.B;
        bool kept = in.keep[b * in.N + n] != 0;
        int64_t anchor = kept ? in.anchors[b * in.N + n] : 0;
        // Key index of this key in the row's list: context j (visible iff j < anchor) or own slot.
        if (kept && (!is_ctx || j < anchor)) {
          int64_t u = is_ctx ? j : anchor + (j - n * in.B);
          ds = dscore(in, g, b, i, h, n, anchor, u, kvh, &p);
        }
      }
      s_ds[threadIdx.x] = ds;
      s_p[threadIdx.x] = p;
      s_i[threadIdx.x] = i;
      s_h[threadIdx.x] = h;
      __syncthreads();
      for (int64_t e = 0; e < blockDim.x && c0 + e < n_cand && d < in.D; ++e) {
        if (s_p[e] == 0.f && s_ds[e] == 0.f) continue;
        acc_k += s_ds[e] * d2k_load(in.q, off4(in.sq, b, s_i[e], s_h[e], d), in.dtype);
        acc_v += s_p[e] * d2k_load(g.dout, off4(g.sdo, b, s_i[e], s_h[e], d), in.dtype);
      }
    }
    if (d < in.D) {
      d2k_store(dk, out_row + d, in.dtype, in.scale * acc_k);
      d2k_store(dv, out_row + d, in.dtype, acc_v);
    }
  }
}

static D2kStrides4 strides4(const int64_t* s) { return D2kStrides4{s[0], s[1], s[2], s[3]}; }

static int make_inputs(AttnInputs* in, const void* q, const int64_t* sq, const void* k_ctx, const int64_t* skc,
                       const void* v_ctx, const int64_t* svc, const void* k_draft, const int64_t* skd,
                       const void* v_draft, const int64_t* svd, int dtype, const int64_t* anchors,
                       const uint8_t* keep, int64_t Bt, int64_t N, int64_t B, int64_t S, int64_t Hq, int64_t Hkv,
                       int64_t D, float scale) {
  if (!q || !k_ctx || !v_ctx || !k_draft || !v_draft || !anchors || !keep || !sq || !skc || !svc || !skd || !svd)
    return d2k_fail(D2K_BAD_ARGUMENT, "varprefix_attention: null pointer");
  if (!d2k_valid_dtype(dtype)) return d2k_fail(D2K_BAD_ARGUMENT, "varprefix_attention: bad dtype code");
  if (Bt < 0 || N < 0 || B < 1 || S < 1 || Hkv < 1 || Hq % Hkv != 0 || D < 1 || Hq > 65535 || Hkv > 65535 ||
      Bt > 65535)
    return d2k_fail(D2K_BAD_ARGUMENT, "varprefix_attention: bad sizes (need B, S, D >= 1, Hq % Hkv == 0)");
  *in = AttnInputs{q, k_ctx, v_ctx, k_draft, v_draft, strides4(sq), strides4(skc), strides4(svc), strides4(skd),
                   strides4(svd), dtype, anchors, keep, Bt, N, B, S, Hq, Hkv, D, scale};
  return D2K_OK;
}

// Forward: o [Bt, NB, Hq, D] contiguous in the inputs' dtype, lse [Bt, Hq, NB] float32.
// Strides are host arrays of 4 element strides; anchors/keep are contiguous [Bt, N].
D2K_EXPORT int d2k_varprefix_attention_fwd(const void* q, const int64_t* sq, const void* k_ctx, const int64_t* skc,
                                           const void* v_ctx, const int64_t* svc, const void* k_draft,
                                           const int64_t* skd, const void* v_draft, const int64_t* svd, int dtype,
                                           const int64_t* anchors, const uint8_t* keep, int64_t Bt, int64_t N,
                                           int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, float scale,
                                           void* o, float* lse, int device, void* stream) {
  AttnInputs in;
  if (int st = make_inputs(&in, q, sq, k_ctx, skc, v_ctx, svc, k_draft, skd, v_draft, svd, dtype, anchors, keep, Bt,
                           N, B, S, Hq, Hkv, D, scale))
    return st;
  if (!o || !lse) return d2k_fail(D2K_BAD_ARGUMENT, "varprefix_attention_fwd: null output");
  if (int st = d2k_set_device(device)) return st;
  if (Bt * N == 0 || Hq == 0) return D2K_OK;
  dim3 grid((unsigned)(N * B), (unsigned)Hq, (unsigned)Bt);
  attn_fwd_kernel<<<grid, D2K_THREADS, 0, (cudaStream_t)stream>>>(in, o, lse);
  return d2k_launch_status("varprefix_attention_fwd");
}

// Backward: dq [Bt, NB, Hq, D], dk/dv_ctx [Bt, S, Hkv, D], dk/dv_draft [Bt, NB, Hkv, D], all
// contiguous in the inputs' dtype; every element written. dout comes with its strides; lse is the
// forward's [Bt, Hq, NB]; delta is float32 scratch of the same shape.
D2K_EXPORT int d2k_varprefix_attention_bwd(const void* dout, const int64_t* sdo, const void* q, const int64_t* sq,
                                           const void* k_ctx, const int64_t* skc, const void* v_ctx,
                                           const int64_t* svc, const void* k_draft, const int64_t* skd,
                                           const void* v_draft, const int64_t* svd, const float* lse, float* delta,
                                           int dtype, const int64_t* anchors, const uint8_t* keep, int64_t Bt,
                                           int64_t N, int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D,
                                           float scale, void* dq, void* dk_ctx, void* dv_ctx, void* dk_draft,
                                           void* dv_draft, int device, void* stream) {
  AttnInputs in;
  if (int st = make_inputs(&in, q, sq, k_ctx, skc, v_ctx, svc, k_draft, skd, v_draft, svd, dtype, anchors, keep, Bt,
                           N, B, S, Hq, Hkv, D, scale))
    return st;
  if (!dout || !sdo || !lse || !delta || !dq || !dk_ctx || !dv_ctx || !dk_draft || !dv_draft)
    return d2k_fail(D2K_BAD_ARGUMENT, "varprefix_attention_bwd: null pointer");
  if (int st = d2k_set_device(device)) return st;
  if (Bt == 0 || Hq == 0) return D2K_OK;
  AttnGradInputs g{dout, strides4(sdo), lse, delta};
  cudaStream_t s = (cudaStream_t)stream;
  if (N > 0) {
    dim3 rows((unsigned)(N * B), (unsigned)Hq, (unsigned)Bt);
    attn_bwd_delta_kernel<<<rows, D2K_THREADS, 0, s>>>(in, g, delta);
    attn_bwd_dq_kernel<<<rows, D2K_THREADS, 0, s>>>(in, g, dq);
  }
  attn_bwd_dkv_kernel<<<dim3((unsigned)(S + N * B), (unsigned)Hkv, (unsigned)Bt), D2K_THREADS, 0, s>>>(
      in, g, dk_ctx, dv_ctx, dk_draft, dv_draft);
  return d2k_launch_status("varprefix_attention_bwd");
}
