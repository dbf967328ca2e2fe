// attention.cu — causal multi-head self-attention from GPT-2's fused c_attn output, forward
// and backward, one block per (query or key row, head, batch); simple and deterministic.
//
// Math (the CPU reference is src/ops/attention/cpu.rs; per batch b and head h, rows i, j of
// the head's q, k, v [T, hd] taken from columns h·hd.. of the q, k and v blocks of qkv;
// scale = 1/√hd):
//   forward:   s_ij = (q_i · k_j)·scale                       for j ≤ i (causal)
//              m_i = max_j s_ij;  e_ij = exp(s_ij − m_i);  z_i = Σ_j e_ij
//              P_ij = e_ij / z_i  (0 for j > i)              (out =) P, saved in f32
//              y_i = Σ_{j≤i} P_ij v_j                         (out =) y [B, T, C], columns h·hd..
//   backward (kernel attention_bwd, per query row i):
//              dP_ij = gy_i · v_j;  D_i = Σ_{j≤i} dP_ij P_ij
//              dS_ij = P_ij (dP_ij − D_i)·scale               (out =) dS scratch, f32
//              dq_i = Σ_{j≤i} dS_ij k_j                       (out =) dqkv[:, :, 0..C]
//   backward (kernel attention_dkv_bwd, per key row j, after it):
//              dk_j = Σ_{i≥j} dS_ij q_i                       (out =) dqkv[:, :, C..2C]
//              dv_j = Σ_{i≥j} P_ij gy_i                       (out =) dqkv[:, :, 2C..3C]
// The forward saves P (not the logsumexp): the backward then needs no exponentials. Every
// sum runs in a fixed order (dot products and the sums over rows serially in index order,
// the max and z reductions over the block as a fixed tree), no atomics: results are
// bitwise identical run to run and do not depend on the grid.
//
// Shapes: qkv [B, T, 3C], y and gy [B, T, C], P and dS [B, H, T, T] (only j ≤ i written),
// dqkv [B, T, 3C]; hd = C / H.
//
// Dtypes: qkv, y, gy and dqkv bf16, f16 or f32 (the suffix); P and dS stored in f32; all
// math and accumulation in f32; outputs rounded once (nearest even).
//
// FLOPs and bytes per call (s bytes per element, causal halves counted): forward
// ≈ 2·B·H·T²·hd FLOPs (scores and P·v), backward ≈ 4·B·H·T²·hd; bytes: the forward
// reads qkv and writes y, the backward reads qkv and gy and writes dqkv (s·B·T·C·11 in
// all) plus P (4·B·H·T², written once, read twice) and dS (written once, read once),
// plus k/v rows re-read from L2 once per query row. Headline (bf16, B = 8, T = 128, C = 256,
// H = 4, hd = 64): 0.07 GFLOP forward + 0.13 backward (all f32 FMAs on CUDA cores, no
// tensor cores: ~3 µs at an H100's ~67 TFLOP/s f32) and ~6 MB of activations + ~10 MB
// of P/dS (~5 µs at ~3 TB/s): a floor of ~5 µs for forward + backward. This simple
// kernel is latency- and L2-bound (k/v re-reads, serial dot products, one block per row)
// and will be well above it. Not measured on a GPU.
//
// Launch geometry: every kernel grid (T, H, B), 128 threads. attention_fwd and
// attention_bwd: block (i, h, b) owns query row i; thread x handles keys
// j = x, x + 128, … ≤ i (scores, P, dP, dS), the row's max and sums are reduced over the
// block in 512 B of static shared memory, then thread x writes output columns
// e = x, x + 128, … < hd. attention_dkv_bwd: block (j, h, b) owns key row j; thread x owns
// columns e = x, x + 128, … < hd of dk_j and dv_j and loops over i = j … T−1 in order.
#include "common.cuh"

// Rust twin: `AttentionParams` in src/ops/attention/cuda.rs (a test checks the size).
struct AttentionParams {
    const void* qkv;  // [B, T, 3C]
    const void* gy;   // [B, T, C] (backward)
    void* out;        // y [B, T, C] (forward) or dqkv [B, T, 3C] (backward)
    float* p;         // P [B, H, T, T], written by the forward, read by the backward
    float* ds;        // dS [B, H, T, T] scratch, written by attention_bwd, read by attention_dkv_bwd
    long long b, t, c, h;
    float scale;      // 1/√hd
    int pad;
};

namespace {

constexpr int kThreads = 128;

enum class Red { Max, Sum };

// A block reduction over kThreads partials in a fixed tree order; every thread gets the
// result. `red` is the block's shared buffer.
template <Red R>
__device__ __forceinline__ float block_reduce(float v, float* red) {
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) {
            const float a = red[threadIdx.x], b = red[threadIdx.x + s];
            red[threadIdx.x] = R == Red::Max ? fmaxf(a, b) : a + b;
        }
        __syncthreads();
    }
    const float r = red[0];
    __syncthreads();  // red may be reused by the next reduction
    return r;
}

template <typename T>
__device__ __forceinline__ void forward(const AttentionParams& p) {
    __shared__ float red[kThreads];
    const long long i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const long long t = p.t, c = p.c, hd = p.c / p.h, ld = 3 * p.c;
    const T* qkv = static_cast<const T*>(p.qkv);
    const T* q = qkv + (b * t + i) * ld + h * hd;
    const T* kbase = qkv + b * t * ld + c + h * hd;
    const T* vbase = qkv + b * t * ld + 2 * c + h * hd;
    float* prow = p.p + ((b * p.h + h) * t + i) * t;
    float m = -3.402823466e+38f;  // -FLT_MAX: row i has at least key 0
    for (long long j = threadIdx.x; j <= i; j += kThreads) {
        const T* k = kbase + j * ld;
        float s = 0.0f;
        for (long long e = 0; e < hd; ++e) s += lf::to_f32(q[e]) * lf::to_f32(k[e]);
        s *= p.scale;
        prow[j] = s;
        m = fmaxf(m, s);
    }
    m = block_reduce<Red::Max>(m, red);
    float z = 0.0f;
    for (long long j = threadIdx.x; j <= i; j += kThreads) {
        const float w = expf(prow[j] - m);
        prow[j] = w;
        z += w;
    }
    z = block_reduce<Red::Sum>(z, red);
    const float inv = 1.0f / z;
    for (long long j = threadIdx.x; j < t; j += kThreads) prow[j] = j <= i ? prow[j] * inv : 0.0f;
    __syncthreads();  // the P row is visible to the whole block
    T* y = static_cast<T*>(p.out) + (b * t + i) * c + h * hd;
    for (long long e = threadIdx.x; e < hd; e += kThreads) {
        float acc = 0.0f;
        for (long long j = 0; j <= i; ++j) acc += prow[j] * lf::to_f32(vbase[j * ld + e]);
        y[e] = lf::from_f32<T>(acc);
    }
}

template <typename T>
__device__ __forceinline__ void backward_dq(const AttentionParams& p) {
    __shared__ float red[kThreads];
    const long long i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const long long t = p.t, c = p.c, hd = p.c / p.h, ld = 3 * p.c;
    const T* qkv = static_cast<const T*>(p.qkv);
    const T* gy = static_cast<const T*>(p.gy) + (b * t + i) * c + h * hd;
    const T* kbase = qkv + b * t * ld + c + h * hd;
    const T* vbase = qkv + b * t * ld + 2 * c + h * hd;
    const long long row = ((b * p.h + h) * t + i) * t;
    const float* prow = p.p + row;
    float* dsrow = p.ds + row;
    float dsum = 0.0f;
    for (long long j = threadIdx.x; j <= i; j += kThreads) {
        const T* v = vbase + j * ld;
        float dp = 0.0f;
        for (long long e = 0; e < hd; ++e) dp += lf::to_f32(gy[e]) * lf::to_f32(v[e]);
        dsrow[j] = dp;
        dsum += dp * prow[j];
    }
    dsum = block_reduce<Red::Sum>(dsum, red);
    for (long long j = threadIdx.x; j <= i; j += kThreads)
        dsrow[j] = prow[j] * (dsrow[j] - dsum) * p.scale;
    __syncthreads();  // the dS row is visible to the whole block
    T* dq = static_cast<T*>(p.out) + (b * t + i) * ld + h * hd;
    for (long long e = threadIdx.x; e < hd; e += kThreads) {
        float acc = 0.0f;
        for (long long j = 0; j <= i; ++j) acc += dsrow[j] * lf::to_f32(kbase[j * ld + e]);
        dq[e] = lf::from_f32<T>(acc);
    }
}

template <typename T>
__device__ __forceinline__ void backward_dkv(const AttentionParams& p) {
    const long long j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const long long t = p.t, c = p.c, hd = p.c / p.h, ld = 3 * p.c;
    const T* qbase = static_cast<const T*>(p.qkv) + b * t * ld + h * hd;
    const T* gybase = static_cast<const T*>(p.gy) + b * t * c + h * hd;
    const long long bh = (b * p.h + h) * t;
    T* dk = static_cast<T*>(p.out) + (b * t + j) * ld + c + h * hd;
    T* dv = dk + c;
    for (long long e = threadIdx.x; e < hd; e += kThreads) {
        float acck = 0.0f, accv = 0.0f;
        for (long long i = j; i < t; ++i) {
            const long long pij = (bh + i) * t + j;
            acck += p.ds[pij] * lf::to_f32(qbase[i * ld + e]);
            accv += p.p[pij] * lf::to_f32(gybase[i * c + e]);
        }
        dk[e] = lf::from_f32<T>(acck);
        dv[e] = lf::from_f32<T>(accv);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) attention_fwd_f32(const AttentionParams p) { forward<float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_fwd_bf16(const AttentionParams p) { forward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_fwd_f16(const AttentionParams p) { forward<f16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_bwd_f32(const AttentionParams p) { backward_dq<float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_bwd_bf16(const AttentionParams p) { backward_dq<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_bwd_f16(const AttentionParams p) { backward_dq<f16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_dkv_bwd_f32(const AttentionParams p) { backward_dkv<float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_dkv_bwd_bf16(const AttentionParams p) { backward_dkv<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_dkv_bwd_f16(const AttentionParams p) { backward_dkv<f16>(p); }
