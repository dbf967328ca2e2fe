// attention.cu — causal multi-head self-attention from GPT-2's fused c_attn output, forward
// and backward, flash-attention style: tiled, online softmax, only the per-row logsumexp
// saved (no [T, T] tensor anywhere), deterministic (no atomics, fixed summation orders).
//
// Math (the CPU reference is src/ops/attention/cpu.rs; per batch b and head h, rows i, j of
// the head's q, k, v [T, hd] taken from columns h·hd.. of the q, k and v blocks of qkv;
// scale = 1/√hd; BR = 32 rows per block, BC ∈ {32, 16, 8} rows per inner tile):
//   forward (attention_fwd, one block per tile of BR query rows; key tiles j0 = 0, BC, …
//   up to the tile's last row, in order):
//              s_ij = (q_i · k_j)·scale for j ≤ i, −inf above the diagonal
//              per key tile: m' = max(m, max_j s_ij);  α = exp(m − m');  e_ij = exp(s_ij − m')
//                            l = l·α + Σ_j e_ij;  O_i = O_i·α + Σ_j e_ij v_j;  m = m'
//              (m starts at −inf, l and O at 0: the first tile's α is 0)
//              y_i = O_i / l                                  (out =) y [B, T, C], columns h·hd..
//              lse_i = m + ln l                               (out =) lse [B, H, T], f32
//   backward, from qkv, y, gy and lse (P recomputed, P_ij = exp(s_ij − lse_i), 0 for j > i):
//     attention_bwd (one block per query tile; key tiles 0 … its causal limit, in order):
//              D_i = Σ_e gy_ie·y_ie                          (out =) delta [B, H, T] scratch, f32
//              dP_ij = gy_i · v_j;  dS_ij = P_ij (dP_ij − D_i)·scale
//              dq_i = Σ_{j≤i} dS_ij k_j                       (out =) dqkv[:, :, 0..C]
//     attention_dkv_bwd (one block per key tile of BR rows, after it; query tiles of BC rows
//     from its own to the last, in order; P, dP, dS by the same formulas and, per element,
//     the same operations, so the same values):
//              dv_j = Σ_{i≥j} P_ij gy_i                       (out =) dqkv[:, :, 2C..3C]
//              dk_j = Σ_{i≥j} dS_ij q_i                       (out =) dqkv[:, :, C..2C]
// D_i = Σ_j P_ij dP_ij of the textbook backward (= gy_i · y_i), from the rounded y the tape
// keeps. Every sum runs in a fixed order that does not depend on the grid: dot products
// over e in index order, the row max/sum of a tile over its keys in order by one thread per
// row, the sums over j (or i) tile by tile and within a tile in order. No atomics: results
// are bitwise identical run to run.
//
// Shapes: qkv [B, T, 3C], y and gy [B, T, C], lse and delta [B, H, T] (f32), dqkv
// [B, T, 3C]; hd = C / H ≤ 128 (16 lanes × 8 register columns per thread; the launcher
// rejects more).
//
// Dtypes: qkv, y, gy and dqkv bf16, f16 or f32 (the suffix); tiles held in shared memory as
// f32 (converted once on load); lse and delta f32; all math and accumulation in f32
// (expf, logf); outputs rounded once (nearest even).
//
// FLOPs and bytes per call (s bytes per element; causal halves counted, the diagonal tiles'
// masked half not): forward ≈ 2·B·H·T²·hd FLOPs (scores, P·v) + B·H·T²/2 exponentials;
// backward ≈ 7·B·H·T²·hd (the minimum is 4: dP, dq, dk, dv; the scores are recomputed in both
// kernels and dP in both) + B·H·T² exponentials. DRAM bytes: the forward reads qkv and writes
// y (s·4·B·T·C) and lse (4·B·H·T); the backward reads qkv, y, gy, lse and writes dqkv and
// delta (s·8·B·T·C + 12·B·H·T); k/v (forward, attention_bwd) and q/gy (attention_dkv_bwd)
// tiles are re-read once per block along the causal band, ≈ T/(2·BR) times each (L2).
// Saved for the backward: lse, 4·B·H·T bytes, where the previous kernels saved P,
// 4·B·H·T² (and the backward allocated a second [B, H, T, T] f32 for dS).
// Headline (bf16, GPT-2 124M: B = 8, T = 1024, C = 768, H = 12, hd = 64), per layer:
// 12.9 GFLOP forward + 45 GFLOP backward, all f32 FMAs on CUDA cores (no tensor cores):
// ~0.19 + 0.67 ms at an H100's ~67 TFLOP/s f32; DRAM 50 MB forward + 102 MB backward
// (~17 + 34 µs at ~3 TB/s), so compute-bound: a floor of ~0.9 ms for forward + backward.
// Memory saved per layer: P 403 MB → lse 0.39 MB (and the 403 MB dS scratch is gone).
// Not measured on a GPU.
//
// Launch geometry: every kernel grid (⌈T/BR⌉, H, B), 128 threads = 8 (ty) × 16 (tx),
// __launch_bounds__(128); BC chosen per kernel on the host (src/ops/attention/cuda.rs): the
// largest of 32, 16, 8 whose dynamic shared memory fits 48 KiB, passed with BR in the
// parameters. A thread owns the register micro-tile of rows r = ty + 8a (a < 4) of its
// block's BR rows × columns tx + 16b (b < 2, < BC) of the inner tile for the scores (the
// inner tile's rows read with an odd shared stride hd|1: no bank conflicts), and rows r ×
// head columns tx + 16g (g < 8, < hd) for the accumulators (O, dq, or dk and dv), which stay
// in registers across the loop. The per-row softmax statistics of the forward are kept by
// thread r < BR. Shared memory (f32; ld = hd|1, lp = BC + 1):
//   attention_fwd      Q [BR, ld], K, V [BC, ld], S/P [BR, lp], α, l [BR]
//   attention_bwd      Q, gy [BR, ld], K, V [BC, ld], dS [BR, lp], lse, D [BR]
//   attention_dkv_bwd  K, V [BR, ld], Q, gy [BC, ld], Pᵀ, dSᵀ [BR, lp], lse, D [BC]
// At hd = 64 (BC = 32 for all three): 29.4, 37.8 and 42.0 KB; at hd = 128 (BC = 16, 8, 8):
// 35.5, 42.7 and 43.6 KB.
#include "common.cuh"

// Rust twin: `AttentionParams` in src/ops/attention/cuda.rs (a test checks the size).
struct AttentionParams {
    const void* qkv;  // [B, T, 3C]
    const void* y;    // [B, T, C]: the forward's output (backward)
    const void* gy;   // [B, T, C] (backward)
    void* out;        // y [B, T, C] (forward) or dqkv [B, T, 3C] (backward)
    float* lse;       // [B, H, T]: written by the forward, read by the backward
    float* delta;     // [B, H, T]: D, written by attention_bwd, read by attention_dkv_bwd
    long long b, t, c, h;
    float scale;      // 1/√hd
    int br;           // rows of the tile a block owns: must be kBR
    int bc;           // rows of the tiles it loops over: 32, 16 or 8
    int pad;
};

namespace {

constexpr int kThreads = 128;
constexpr int kTY = 8, kTX = 16;    // the thread grid
constexpr int kBR = 32;             // rows a block owns
constexpr int kRows = kBR / kTY;    // rows per thread (4)
constexpr int kCols = kBR / kTX;    // inner-tile columns per thread (2; BC ≤ 32)
constexpr int kGroups = 8;          // head columns per thread: hd ≤ kTX·kGroups = 128
static_assert(kTY * kTX == kThreads, "thread grid");

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// A launch whose geometry is not the kernel's traps (the launcher never makes one).
__device__ __forceinline__ void check(const AttentionParams& p) {
    const long long hd = p.c / p.h;
    if (p.br != kBR || (p.bc != 32 && p.bc != 16 && p.bc != 8) || hd < 1 ||
        hd > kTX * kGroups)
        __trap();
}

// Rows r0 … r0 + rows − 1 (zero past t) of one head, columns 0 … hd − 1 of `src` (row
// stride `stride`), into `sm` [rows, ld] as f32: consecutive threads read consecutive
// columns (coalesced).
template <typename T>
__device__ __forceinline__ void load_tile(float* sm, int ld, const T* src, long long stride,
                                          long long r0, int rows, long long t, int hd) {
    for (int idx = threadIdx.x; idx < rows * hd; idx += kThreads) {
        const int r = idx / hd, e = idx - r * hd;
        const long long row = r0 + r;
        sm[r * ld + e] = row < t ? lf::to_f32(src[row * stride + e]) : 0.0f;
    }
}

// The score micro-tile: acc[a][b] += Σ_e x[ty + 8a][e]·w[tx + 16b][e], e in order, for x
// the block's own rows and w the n rows of the inner tile (columns past n repeat row n − 1
// and are ignored by the caller).
__device__ __forceinline__ void dots(float acc[kRows][kCols], const float* x, const float* w,
                                     int ld, int hd, int n) {
    const int ty = threadIdx.x / kTX, tx = threadIdx.x % kTX;
    int wr[kCols];
    LF_UNROLL
    for (int b = 0; b < kCols; ++b) wr[b] = imin(tx + kTX * b, n - 1) * ld;
    for (int e = 0; e < hd; ++e) {
        float xv[kRows], wv[kCols];
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) xv[a] = x[(ty + kTY * a) * ld + e];
        LF_UNROLL
        for (int b = 0; b < kCols; ++b) wv[b] = w[wr[b] + e];
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) {
            LF_UNROLL
            for (int b = 0; b < kCols; ++b) acc[a][b] += xv[a] * wv[b];
        }
    }
}

// The accumulator micro-tile: acc[a][g] += Σ_{c<n} pm[ty + 8a][c]·w[c][tx + 16g], c in
// order, for pm [BR, lp] (P or dS) and w [n, ld] (v, k, gy or q). Columns past hd repeat
// column hd − 1 and are never stored; groups wholly past hd are skipped (block-uniform).
__device__ __forceinline__ void accumulate(float acc[kRows][kGroups], const float* pm, int lp,
                                           const float* w, int ld, int hd, int n) {
    const int ty = threadIdx.x / kTX, tx = threadIdx.x % kTX;
    int col[kGroups];
    LF_UNROLL
    for (int g = 0; g < kGroups; ++g) col[g] = imin(tx + kTX * g, hd - 1);
    for (int c = 0; c < n; ++c) {
        float pv[kRows];
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) pv[a] = pm[(ty + kTY * a) * lp + c];
        LF_UNROLL
        for (int g = 0; g < kGroups; ++g) {
            if (kTX * g >= hd) break;
            const float wv = w[c * ld + col[g]];
            LF_UNROLL
            for (int a = 0; a < kRows; ++a) acc[a][g] += pv[a] * wv;
        }
    }
}

// Stores the accumulator micro-tile, rounded once, into rows r0 + ty + 8a (< t) of `dst`
// (row stride `stride`), columns tx + 16g (< hd).
template <typename T>
__device__ __forceinline__ void store(const float acc[kRows][kGroups], T* dst, long long stride,
                                      long long r0, long long t, int hd) {
    const int ty = threadIdx.x / kTX, tx = threadIdx.x % kTX;
    LF_UNROLL
    for (int a = 0; a < kRows; ++a) {
        const long long row = r0 + ty + kTY * a;
        if (row >= t) continue;
        LF_UNROLL
        for (int g = 0; g < kGroups; ++g) {
            const int e = tx + kTX * g;
            if (e < hd) dst[row * stride + e] = lf::from_f32<T>(acc[a][g]);
        }
    }
}

template <typename T>
__device__ __forceinline__ void forward(const AttentionParams& p) {
    check(p);
    LF_DYNAMIC_SMEM(float, sm);
    const int hd = (int)(p.c / p.h), ld = hd | 1, bc = p.bc, lp = bc + 1;
    const long long t = p.t, c = p.c, ldg = 3 * p.c;
    const long long i0 = (long long)blockIdx.x * kBR, h = blockIdx.y, b = blockIdx.z;
    float* qs = sm;                  // [BR, ld]
    float* ks = qs + kBR * ld;       // [BC, ld]
    float* vs = ks + bc * ld;        // [BC, ld]
    float* ps = vs + bc * ld;        // [BR, lp]: scores, then e_ij
    float* alpha = ps + kBR * lp;    // [BR]
    float* lsum = alpha + kBR;       // [BR]: the final l
    const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
    const T* base = static_cast<const T*>(p.qkv) + b * t * ldg + h * hd;
    load_tile(qs, ld, base, ldg, i0, kBR, t, hd);
    float o[kRows][kGroups] = {};
    float m = neg_inf(), l = 0.0f;  // row tid's running max and sum (tid < BR)
    const long long last = (i0 + kBR < t ? i0 + kBR : t) - 1;  // the tile's last row
    for (long long j0 = 0; j0 <= last; j0 += bc) {
        load_tile(ks, ld, base + c, ldg, j0, bc, t, hd);
        load_tile(vs, ld, base + 2 * c, ldg, j0, bc, t, hd);
        __syncthreads();  // Q (first time), K and V are in
        float s[kRows][kCols] = {};
        dots(s, qs, ks, ld, hd, bc);
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) {
            const int r = ty + kTY * a;
            LF_UNROLL
            for (int bb = 0; bb < kCols; ++bb) {
                const int cc = tx + kTX * bb;
                if (cc < bc) ps[r * lp + cc] = j0 + cc <= i0 + r ? s[a][bb] * p.scale : neg_inf();
            }
        }
        __syncthreads();  // the scores are in
        if (tid < kBR) {
            // Row tid: every row has key 0 unmasked, so m is finite after the first tile.
            float* row = ps + tid * lp;
            float mt = neg_inf();
            for (int cc = 0; cc < bc; ++cc) mt = fmaxf(mt, row[cc]);
            const float mn = fmaxf(m, mt);
            const float al = expf(m - mn);  // 0 on the first tile (m = −inf)
            float sum = 0.0f;
            for (int cc = 0; cc < bc; ++cc) {
                const float e = expf(row[cc] - mn);  // 0 for a masked score
                row[cc] = e;
                sum += e;
            }
            l = l * al + sum;
            m = mn;
            alpha[tid] = al;
        }
        __syncthreads();  // e_ij and α are in
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) {
            const float al = alpha[ty + kTY * a];
            LF_UNROLL
            for (int g = 0; g < kGroups; ++g) o[a][g] *= al;
        }
        accumulate(o, ps, lp, vs, ld, hd, bc);
        __syncthreads();  // K, V and P may be overwritten
    }
    if (tid < kBR) {
        const long long i = i0 + tid;
        if (i < t) p.lse[(b * p.h + h) * t + i] = m + logf(l);
        lsum[tid] = l;
    }
    __syncthreads();
    LF_UNROLL
    for (int a = 0; a < kRows; ++a) {
        const float lr = lsum[ty + kTY * a];
        LF_UNROLL
        for (int g = 0; g < kGroups; ++g) o[a][g] = o[a][g] / lr;
    }
    store(o, static_cast<T*>(p.out) + b * t * c + h * hd, c, i0, t, hd);
}

template <typename T>
__device__ __forceinline__ void backward_dq(const AttentionParams& p) {
    check(p);
    LF_DYNAMIC_SMEM(float, sm);
    const int hd = (int)(p.c / p.h), ld = hd | 1, bc = p.bc, lp = bc + 1;
    const long long t = p.t, c = p.c, ldg = 3 * p.c;
    const long long i0 = (long long)blockIdx.x * kBR, h = blockIdx.y, b = blockIdx.z;
    const long long bh = (b * p.h + h) * t;
    float* qs = sm;                 // [BR, ld]
    float* gs = qs + kBR * ld;      // [BR, ld]
    float* ks = gs + kBR * ld;      // [BC, ld]
    float* vs = ks + bc * ld;       // [BC, ld]
    float* dss = vs + bc * ld;      // [BR, lp]
    float* lses = dss + kBR * lp;   // [BR]
    float* dsm = lses + kBR;        // [BR]: D
    const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
    const T* base = static_cast<const T*>(p.qkv) + b * t * ldg + h * hd;
    const T* gybase = static_cast<const T*>(p.gy) + b * t * c + h * hd;
    load_tile(qs, ld, base, ldg, i0, kBR, t, hd);
    load_tile(gs, ld, gybase, c, i0, kBR, t, hd);
    if (tid < kBR) lses[tid] = i0 + tid < t ? p.lse[bh + i0 + tid] : 0.0f;
    __syncthreads();  // gy is in
    if (tid < kBR) {
        const long long i = i0 + tid;
        float d = 0.0f;
        if (i < t) {
            const T* y = static_cast<const T*>(p.y) + (b * t + i) * c + h * hd;
            for (int e = 0; e < hd; ++e) d += gs[tid * ld + e] * lf::to_f32(y[e]);
            p.delta[bh + i] = d;
        }
        dsm[tid] = d;  // visible after the loop's first barrier
    }
    float dq[kRows][kGroups] = {};
    const long long last = (i0 + kBR < t ? i0 + kBR : t) - 1;
    for (long long j0 = 0; j0 <= last; j0 += bc) {
        load_tile(ks, ld, base + c, ldg, j0, bc, t, hd);
        load_tile(vs, ld, base + 2 * c, ldg, j0, bc, t, hd);
        __syncthreads();  // K and V (and D, lse the first time) are in
        float s[kRows][kCols] = {}, dp[kRows][kCols] = {};
        dots(s, qs, ks, ld, hd, bc);
        dots(dp, gs, vs, ld, hd, bc);
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) {
            const int r = ty + kTY * a;
            LF_UNROLL
            for (int bb = 0; bb < kCols; ++bb) {
                const int cc = tx + kTX * bb;
                if (cc >= bc) continue;
                float ds = 0.0f;
                if (j0 + cc <= i0 + r) {
                    const float pij = expf(s[a][bb] * p.scale - lses[r]);
                    ds = pij * (dp[a][bb] - dsm[r]) * p.scale;
                }
                dss[r * lp + cc] = ds;
            }
        }
        __syncthreads();  // dS is in
        accumulate(dq, dss, lp, ks, ld, hd, bc);
        __syncthreads();  // K, V and dS may be overwritten
    }
    store(dq, static_cast<T*>(p.out) + b * t * ldg + h * hd, ldg, i0, t, hd);
}

template <typename T>
__device__ __forceinline__ void backward_dkv(const AttentionParams& p) {
    check(p);
    LF_DYNAMIC_SMEM(float, sm);
    const int hd = (int)(p.c / p.h), ld = hd | 1, bc = p.bc, lp = bc + 1;
    const long long t = p.t, c = p.c, ldg = 3 * p.c;
    const long long j0 = (long long)blockIdx.x * kBR, h = blockIdx.y, b = blockIdx.z;
    const long long bh = (b * p.h + h) * t;
    float* ks = sm;                 // [BR, ld]
    float* vs = ks + kBR * ld;      // [BR, ld]
    float* qs = vs + kBR * ld;      // [BC, ld]
    float* gs = qs + bc * ld;       // [BC, ld]
    float* pt = gs + bc * ld;       // [BR, lp]: Pᵀ
    float* dst = pt + kBR * lp;     // [BR, lp]: dSᵀ
    float* lses = dst + kBR * lp;   // [BC]
    float* dsm = lses + bc;         // [BC]: D
    const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
    const T* base = static_cast<const T*>(p.qkv) + b * t * ldg + h * hd;
    const T* gybase = static_cast<const T*>(p.gy) + b * t * c + h * hd;
    load_tile(ks, ld, base + c, ldg, j0, kBR, t, hd);
    load_tile(vs, ld, base + 2 * c, ldg, j0, kBR, t, hd);
    float dk[kRows][kGroups] = {}, dv[kRows][kGroups] = {};
    // BC divides BR, so the query tile holding key j0 starts at j0.
    for (long long i0 = j0; i0 < t; i0 += bc) {
        load_tile(qs, ld, base, ldg, i0, bc, t, hd);
        load_tile(gs, ld, gybase, c, i0, bc, t, hd);
        if (tid < bc) {
            const bool in = i0 + tid < t;
            lses[tid] = in ? p.lse[bh + i0 + tid] : 0.0f;
            dsm[tid] = in ? p.delta[bh + i0 + tid] : 0.0f;
        }
        __syncthreads();  // Q, gy, lse and D (and K, V the first time) are in
        float s[kRows][kCols] = {}, dp[kRows][kCols] = {};
        dots(s, ks, qs, ld, hd, bc);
        dots(dp, vs, gs, ld, hd, bc);
        LF_UNROLL
        for (int a = 0; a < kRows; ++a) {
            const int r = ty + kTY * a;
            LF_UNROLL
            for (int bb = 0; bb < kCols; ++bb) {
                const int cc = tx + kTX * bb;
                if (cc >= bc) continue;
                const long long i = i0 + cc;
                float pij = 0.0f, ds = 0.0f;
                if (j0 + r <= i && i < t) {
                    pij = expf(s[a][bb] * p.scale - lses[cc]);
                    ds = pij * (dp[a][bb] - dsm[cc]) * p.scale;
                }
                pt[r * lp + cc] = pij;
                dst[r * lp + cc] = ds;
            }
        }
        __syncthreads();  // Pᵀ and dSᵀ are in
        accumulate(dv, pt, lp, gs, ld, hd, bc);
        accumulate(dk, dst, lp, qs, ld, hd, bc);
        __syncthreads();  // Q, gy, Pᵀ and dSᵀ may be overwritten
    }
    T* out = static_cast<T*>(p.out) + b * t * ldg + h * hd;
    store(dk, out + c, ldg, j0, t, hd);
    store(dv, out + 2 * c, ldg, j0, t, hd);
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
