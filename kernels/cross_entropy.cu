// cross_entropy.cu — fused softmax cross-entropy with an ignore index: per-row
// logsumexp and loss, their mean in a fixed order, and the logits gradient.
//
// Math (the CPU reference is src/ops/cross_entropy/cpu.rs: `row_lse`, `loss_sum`,
// `backward`; N rows of ld ≥ V logits of which the first V are the classes and the columns
// V..ld padding (GPT-2's vocabulary padded to a multiple of 64 for the LM head's GEMMs; ld
// = V without padding), targets t[r] ∈ 0..V or the ignore index −100 (checked on the
// host), n_valid = the number of non-ignored rows, counted on the host; j runs over 0..V
// only: a padding column is never read into a max, a sum or a loss, whatever it holds):
//   cross_entropy_fwd:      m[r] = max_j x[r, j];  s[r] = Σ_j exp(x[r, j] − m[r])
//                           lse[r] = m[r] + ln s[r]                             (lse =)
//                           loss[r] = lse[r] − x[r, t[r]], 0 for an ignored row (losses =)
//   cross_entropy_mean_fwd: one block: L = (Σ_r loss[r]) / n_valid, 0 when n_valid = 0
//                           (PyTorch gives NaN there), stored in f32 for every T (as
//                           under PyTorch's autocast: an f16 loss could not carry a loss
//                           scale of 2^16 back)                                   (out =)
//   cross_entropy_bwd:      c = gy / n_valid (gy: the incoming gradient of L, a device
//                           f32 scalar, read on the device; 0 when n_valid = 0)
//                           gx[r, j] = c·(exp(x[r, j] − lse[r]) − [j = t[r]]) for j < V,
//                           gx[r, j] = 0 exactly for V ≤ j < ld (the padding: its GEMM
//                           gradients gwte[j] = Σ_r gx[r, j]·x_r are then 0 too), and 0
//                           for the whole of an ignored row                       (gx =)
//   cross_entropy_fused_fwd: forward and gradient in one pass over each row, for training,
//                           where the backward's seed gy (1, or the loss scale S) is a
//                           device scalar known before the forward: lse[r] and loss[r] as
//                           in cross_entropy_fwd (lse not stored), then gx[r, ·] as in
//                           cross_entropy_bwd from the same lse and c      (losses =, gx =)
//                           — the same operations, so the same bits as fwd then bwd.
//                           gx may be x itself (in place: each thread reads an element
//                           before it writes it, x[t] is read before a barrier), so the
//                           logits' buffer becomes their gradient.
// Reductions in a fixed order (no atomics): thread k of a block takes, in order, its head
// element (k < the row's unaligned head), the 16-byte vectors k, k + 256, … of the aligned
// middle and its tail element, keeping an online-softmax state (running max m and
// Σ exp(x − m), rescaled by exp(m_old − m_new) once per vector); then a warp butterfly
// (__shfl_xor_sync, 16 → 1) of the states, merged symmetrically so both lanes agree to the
// bit, and the 8 warp states in warp order. So a result does not depend on the grid, two
// runs give the same bits, and the fused kernel and fwd then bwd run the same code
// (row_lse, row_grad): the same bits. The max/sum over a row and the mean are f32 like
// the CPU's, in another order (the tests compare within tolerances); c = f32(gy)/
// f32(n_valid) equals the CPU's f32(gy/n_valid in f64) exactly. Without a seed given up
// front the gradient is recomputed in the backward from the saved lse (the forward cannot
// know gy); with one, the fused kernel writes it at once and the logits need not live
// until the backward.
//
// Shapes: x [N, ld] row-major (any 1 ≤ V ≤ ld; GPT-2: V = 50257, ld = Vp = 50304);
// targets [N] i32; lse, losses [N] f32 (device scratch, lse kept for the backward); gy []
// and out [] f32; gx [N, ld] T.
//
// Dtypes: x and gx bf16, f16 or f32 (the suffix); the loss (out) and its gradient gy f32;
// compute and accumulate f32; targets i32; lse and losses f32.
//
// Vectors: row r starts at byte s·r·ld mod 16; each row has a scalar head of
// (W − offset/s) mod W elements (W = 16/s), aligned 16-byte vectors and a scalar tail
// (< W), over the first V columns. Padded (ld = 50304, a multiple of 64) every row is
// aligned: no head; the logsumexp and the gradient read ⌊V/8⌋ = 6282 bf16 vectors and a
// 1-element tail, the gradient writes those and then 47 scalar zeros into the padding
// columns (one thread each). Unpadded (ld = V = 50257, odd) the rows sit at varying
// offsets, heads included. The gradient row shares the logits row's offset (same dtype and
// stride, or in place), so its stores are vectors too (checked; scalar otherwise).
//
// FLOPs and bytes per call (s bytes per element), GPT-2 124M, bf16, N = 8192, V = 50257,
// ld = Vp = 50304 (s·N·V = 823.4 MB read per pass, s·N·Vp = 824.2 MB written: the padding
// adds 0.09 % to the writes and nothing to the reads; floors at the measured copy
// bandwidth, ~3.0 TB/s H100 / ~4.3 TB/s H200):
//   fwd: ~5·N·V FLOPs + N·V exp; ONE read of x (the online softmax): 823 MB → 0.27 ms H100
//     / 0.19 ms H200 (it read x twice before).
//   bwd: ~3·N·V FLOPs + N·V exp; reads x, writes gx: 1.65 GB → 0.55 ms / 0.38 ms.
//   fused: both: two reads of x (the second hits L2 only when the rows in flight fit:
//     ~1000 resident rows × 100 KB do not, so count it from DRAM) + one write: 2.47 GB →
//     0.82 ms H100 / 0.57 ms H200 (before: 3 reads + 1 write, 3.29 GB, with 2-byte loads).
//   The padding's point is downstream: the [N, Vp] gradient's 16-byte-aligned rows let the
//   LM head's backward GEMMs (gx = glogits·wte, gwte = glogitsᵀ·x) take the
//   tensor-core kernel's cp.async loads instead of its element-wise fallback.
//   Predicted ≥ 85 % of the floor (~0.97 ms H100 / ~0.68 ms H200 fused): ≤ 32 registers →
//   8 blocks = 64 warps per SM, each thread a 16-byte load per iteration: ≥ 32 KB in flight
//   per SM (vs ~25 KB needed); one block merge (2 barriers) per row of ~25 vector
//   iterations per thread (6282 vectors / 256 threads). The exps are not free: ~22
//   instructions per element over both passes ≈ 0.3 ms of issue on 132 SMs, under the
//   memory time but not by much on an H200.
//   In place, no second [N, Vp] buffer (824 MB) at all. The mean kernel reads 4·N bytes.
//   Not measured on a GPU.
//
// Launch geometry: fwd, fused_fwd and bwd: 256 threads per block, one block per row in a
// grid-stride loop over rows, grid = min(N, the launcher's cap); threads stride over the
// row's vectors (coalesced: a warp reads 512 contiguous bytes). mean_fwd: one block of 256
// threads. Static shared memory: 16 floats (the warps' states). Known gap: a small N
// leaves SMs idle (one block per row).
#include "common.cuh"

// Rust twin: `CrossEntropyParams` in src/ops/cross_entropy/cuda.rs (a test checks the size).
struct CrossEntropyParams {
    const void* x;        // logits [rows, v]
    const int* targets;   // [rows], class ids or the ignore index (< 0)
    float* lse;           // [rows]: written by fwd, read by bwd
    float* losses;        // [rows]: written by fwd, read by mean_fwd
    const float* gy;      // bwd: the scalar gradient of the loss (f32)
    void* out;            // mean_fwd: the loss scalar (f32); bwd: gx [rows, v] (T)
    long long rows, v;    // rows; classes per row (the first v columns)
    long long n_valid;    // non-ignored rows
    long long ld;         // row stride of x and gx (elements, ≥ v): columns v..ld are padding
};

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The block-wide sum (max when `is_max`) of one value per thread, in a fixed order; every
// thread gets the result. `red` holds kWarps floats; the block must call it together.
__device__ __forceinline__ float block_reduce(float v, float* red, bool is_max) {
LF_UNROLL
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, w) : v + w;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
LF_UNROLL
    for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();  // red may be reused at once
    return r;
}

// A running (max m, Σ exp(x − m)) of some logits: the online softmax's state.
struct MaxSum {
    float m, s;
};

// The state of the union of two sets: the larger max, each sum rescaled to it (a sum whose
// max is the larger is kept as is: ·exp(0) = ·1 exactly). Symmetric to the bit
// (merge(a, b) = merge(b, a)), so both lanes of a butterfly step agree.
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == __uint_as_float(0xff800000u)) return {m, 0.0f};  // both empty (−inf)
    const float sa = a.m == m ? a.s : a.s * expf(a.m - m);
    const float sb = b.m == m ? b.s : b.s * expf(b.m - m);
    return {m, sa + sb};
}

// The block-wide merge of one state per thread in a fixed order (warp butterfly, then the 8
// warps in order); every thread gets the result. `red` holds 2·kWarps floats.
__device__ __forceinline__ MaxSum block_merge(MaxSum v, float* red) {
LF_UNROLL
    for (int o = 16; o > 0; o >>= 1) {
        const MaxSum w = {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
        v = merge(v, w);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        red[warp] = v.m;
        red[kWarps + warp] = v.s;
    }
    __syncthreads();
    MaxSum r = {red[0], red[kWarps]};
LF_UNROLL
    for (int w = 1; w < kWarps; ++w) r = merge(r, {red[w], red[kWarps + w]});
    __syncthreads();  // red may be reused at once
    return r;
}

// Visits a row of v logits at `xr` as this thread's share: with `vec`, the scalar head up
// to the first 16-byte boundary (< W elements: the odd stride V leaves each row at its own
// offset), the aligned middle as 16-byte vectors (thread k: vectors k, k + 256, …; f_vec(j)
// for the W elements from j), and the scalar tail; without `vec`, every element by f_one(j).
template <typename T, typename One, typename Vec>
__device__ __forceinline__ void for_row(const T* xr, long long v, bool vec, One f_one, Vec f_vec) {
    constexpr int W = lf::vec16<T>::n;
    long long head = v, nv = 0;
    if (vec) {
        const int mis = (int)((reinterpret_cast<unsigned long long>(xr) & 15ull) / sizeof(T));
        head = mis == 0 ? 0 : (W - mis < v ? W - mis : v);
        nv = (v - head) / W;
    }
    for (long long j = threadIdx.x; j < head; j += kThreads) f_one(j);
    for (long long k = threadIdx.x; k < nv; k += kThreads) f_vec(head + k * W);
    for (long long j = head + nv * W + threadIdx.x; j < v; j += kThreads) f_one(j);
}

// The row's logsumexp (every thread gets it): one pass of the online softmax (each thread's
// running max and rescaled sum of exp, a vector at a time), then one fixed-order block merge.
template <typename T>
__device__ __forceinline__ float row_lse(const T* xr, long long v, float* red) {
    constexpr int W = lf::vec16<T>::n;
    MaxSum st = {__uint_as_float(0xff800000u), 0.0f};  // (−inf, 0): no logits yet
    for_row(
        xr, v, true,
        [&](long long j) {
            const float a = lf::to_f32(xr[j]);
            const float m = fmaxf(st.m, a);
            st.s = (st.m == m ? st.s : st.s * expf(st.m - m)) + expf(a - m);
            st.m = m;
        },
        [&](long long j) {
            float a[W];
            lf::load16(xr + j, a);
            float m = st.m;
LF_UNROLL
            for (int e = 0; e < W; ++e) m = fmaxf(m, a[e]);
            float s = st.m == m ? st.s : st.s * expf(st.m - m);
LF_UNROLL
            for (int e = 0; e < W; ++e) s += expf(a[e] - m);
            st = {m, s};
        });
    st = block_merge(st, red);
    return st.m + logf(st.s);
}

// One row's gradient over its ld columns: c·(softmax − onehot) in the first v (zeros for
// the whole of an ignored row: t outside 0..v), vectorised where x and g share their
// offset within 16 bytes (always: the same row of buffers of the same dtype, or in place);
// then exactly 0 in the padding columns v..ld, which are never read (they may hold
// anything, NaN included): ld − v < 64 scalar stores, one per thread.
template <typename T>
__device__ __forceinline__ void row_grad(const T* xr, T* gr, long long v, long long ld, int t,
                                         float lse, float c) {
    constexpr int W = lf::vec16<T>::n;
    const bool vec = ((reinterpret_cast<unsigned long long>(xr) ^
                       reinterpret_cast<unsigned long long>(gr)) & 15ull) == 0;
    const bool ignored = t < 0 || t >= v;
    for_row(
        xr, v, vec,
        [&](long long j) {
            if (ignored) {
                gr[j] = lf::from_f32<T>(0.0f);
            } else {
                const float e = expf(lf::to_f32(xr[j]) - lse);
                gr[j] = lf::from_f32<T>((j == t ? e - 1.0f : e) * c);
            }
        },
        [&](long long j) {
            float a[W];
            if (ignored) {
LF_UNROLL
                for (int e = 0; e < W; ++e) a[e] = 0.0f;
            } else {
                lf::load16(xr + j, a);
LF_UNROLL
                for (int e = 0; e < W; ++e) {
                    const float x = expf(a[e] - lse);
                    a[e] = (j + e == t ? x - 1.0f : x) * c;
                }
            }
            lf::store16(gr + j, a);
        });
    for (long long j = v + threadIdx.x; j < ld; j += kThreads) gr[j] = lf::from_f32<T>(0.0f);
}

// c = gy / n_valid, 0 when no row counts.
__device__ __forceinline__ float grad_coef(const CrossEntropyParams& p) {
    return p.n_valid > 0 ? p.gy[0] / (float)p.n_valid : 0.0f;
}

// Per row: lse and the loss (lse kept for the backward).
template <typename T>
__device__ __forceinline__ void forward(const CrossEntropyParams& p) {
    __shared__ float red[2 * kWarps];
    const T* x = static_cast<const T*>(p.x);
    for (long long row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* xr = x + row * p.ld;
        const float lse = row_lse(xr, p.v, red);
        if (threadIdx.x == 0) {
            const int t = p.targets[row];
            p.lse[row] = lse;
            p.losses[row] = (t >= 0 && t < p.v) ? lse - lf::to_f32(xr[t]) : 0.0f;
        }
    }
}

// Forward and gradient in one pass over each row (its later reads mostly from L2): the
// loss and, for a backward seeded with gy (given before the forward), the gradient into
// out — the same operations as forward then backward, so the same bits.
template <typename T>
__device__ __forceinline__ void fused(const CrossEntropyParams& p) {
    __shared__ float red[2 * kWarps];
    const T* x = static_cast<const T*>(p.x);
    T* gx = static_cast<T*>(p.out);
    const float c = grad_coef(p);
    for (long long row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const T* xr = x + row * p.ld;
        const float lse = row_lse(xr, p.v, red);
        const int t = p.targets[row];
        if (threadIdx.x == 0) p.losses[row] = (t >= 0 && t < p.v) ? lse - lf::to_f32(xr[t]) : 0.0f;
        __syncthreads();  // x[t] is read before anyone overwrites it (gx may be x itself)
        row_grad(xr, gx + row * p.ld, p.v, p.ld, t, lse, c);
    }
}

__device__ __forceinline__ void mean(const CrossEntropyParams& p) {
    __shared__ float red[kWarps];
    float s = 0.0f;
    for (long long r = threadIdx.x; r < p.rows; r += kThreads) s += p.losses[r];
    s = block_reduce(s, red, false);
    if (threadIdx.x == 0) {
        static_cast<float*>(p.out)[0] = p.n_valid > 0 ? s / (float)p.n_valid : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void backward(const CrossEntropyParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* gx = static_cast<T*>(p.out);
    const float c = grad_coef(p);
    for (long long row = blockIdx.x; row < p.rows; row += gridDim.x)
        row_grad(x + row * p.ld, gx + row * p.ld, p.v, p.ld, p.targets[row], p.lse[row], c);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) cross_entropy_fwd_f32(const CrossEntropyParams p) { forward<float>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_fwd_bf16(const CrossEntropyParams p) { forward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_fwd_f16(const CrossEntropyParams p) { forward<f16>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_fused_fwd_f32(const CrossEntropyParams p) { fused<float>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_fused_fwd_bf16(const CrossEntropyParams p) { fused<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_fused_fwd_f16(const CrossEntropyParams p) { fused<f16>(p); }

// One mean kernel for every logits dtype: it reads the f32 losses and writes the f32 loss.
extern "C" __global__ void __launch_bounds__(256) cross_entropy_mean_fwd_f32(const CrossEntropyParams p) { mean(p); }

extern "C" __global__ void __launch_bounds__(256) cross_entropy_bwd_f32(const CrossEntropyParams p) { backward<float>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_bwd_bf16(const CrossEntropyParams p) { backward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) cross_entropy_bwd_f16(const CrossEntropyParams p) { backward<f16>(p); }
