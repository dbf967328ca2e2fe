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
// Tensor-core path (namespace tc: bf16 and f16 at hd = 64 and 128; f32 and every other hd
// keep the SIMT kernels above, the launcher picks), FlashAttention-2:
//   forward  attention_tc{64,128}_fwd: one block per 64 query rows, warp w owning rows 16w …
//            16w + 15; K/V tiles of BC keys (64 at hd 64, 32 at hd 128) double-buffered by
//            cp.async into XOR-swizzled shared memory; S = Q·Kᵀ and O += P·V by mma m16n8k16
//            (Q A-fragments by ldmatrix once, K as the "col" B operand by ldmatrix, V by
//            ldmatrix.trans), P repacked from the S accumulators into A fragments (rounded to
//            the storage type: the one rounding the SIMT path does not have); online softmax
//            in the log2 domain (s·scale·log2 e, exp2f), row max across the quad by
//            __shfl_xor_sync, the row sum kept per thread and reduced across the quad once at
//            the end; causal: key tiles past the block's last row never loaded, only tiles
//            that cross a warp's diagonal masked; query blocks scheduled longest first
//            (block x computes query block ⌈T/64⌉ − 1 − x).          (out =) y, lse as above
//   backward attention_delta_bwd:  D_i = Σ_e gy_ie·y_ie (16-byte loads, 8 threads per row,
//                                  a fixed xor tree)                  (out =) delta
//            attention_tc{64,128}_dkv_bwd: one block per 64 keys, warp w owning keys 16w …;
//                                  query tiles of BQ rows (64 at hd 64, 16 at hd 128) from
//                                  the diagonal on, double-buffered; Sᵀ = K·Qᵀ, dPᵀ = V·gyᵀ,
//                                  P from lse, dSᵀ = Pᵀ(dPᵀ − D), dv += Pᵀ·gy, dk += dSᵀ·q
//                                  in registers                       (out =) dqkv[.., C..3C]
//            attention_tc{64,128}_dq_bwd: one block per 64 query rows (longest first), K/V
//                                  tiles as the forward; S, dP, dS recomputed, dq += dS·k
//                                  (no atomics: dq has its own pass)  (out =) dqkv[.., 0..C]
//   P and dS enter their mma rounded to bf16/f16 (as in FlashAttention-2); every other value
//   is f32. Fixed orders: the mma k-steps in order, the quad reductions by one xor tree,
//   tiles in order: bitwise identical run to run.
// Tensor-core cost at the headline (B 8, H 12, T 1024, hd 64, causal), per layer:
//   forward: 4·B·H·T²·hd/2 = 12.9 GFLOP useful (13.7 executed: the 16 diagonal 64×64 tiles
//   of each head are computed whole); DRAM ≈ 51 MB (qkv 37.7 MB, y 12.6, lse 0.4; K/V re-read
//   per query block from L2). Floor at ~800 TFLOP/s (dense mma.sync on an H100/H200,
//   DESIGN §9): 16 µs compute vs ~15 µs DRAM at 3.35 TB/s: balanced, compute the larger.
//   Predicted ~0.75× FlashAttention-2 (PyTorch SDPA, ~300 TFLOP/s causal hd 64 on an H100):
//   ~230 TFLOP/s, ~56 µs. Why: the same algorithm and fragments, but 64×64 tiles (FA2: 128
//   query rows per block at hd 64) so each K/V byte in shared memory feeds half the mma, one
//   cp.async group per K+V tile (FA2 waits for K and V separately), and 2 barriers per tile.
//   backward: FA2 counts 2.5× the forward (5 GEMMs: S, dP, dV, dK, dQ); here dq has its own
//   pass recomputing S and dP, so 7 GEMMs: 7·B·H·T²·hd/2·2 = 45.1 GFLOP (3.5× forward),
//   + D (25 MB read); DRAM ≈ 25 (delta) + 76 (dkv: qkv, gy, lse, D, dk, dv) + 63 (dq) MB
//   ≈ 165 MB ≈ 49 µs at 3.35 TB/s (L2 catches part of the dq pass's re-read). Floor 56 µs
//   at 800 TFLOP/s. Predicted ~0.65× FA2's backward time (its ~200 TFLOP/s counted on 5
//   GEMMs ≈ 160 µs; ours ≈ 45.1 GFLOP at ~190 TFLOP/s ≈ 240 µs): 7/5 of its work, no
//   atomics to pay for, and the dkv kernel's B operands (Q, gy, both layouts) are
//   re-read from shared memory by all 4 warps.
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
// Tensor-core kernels: 128 threads = 4 warps, __launch_bounds__(128); grids (⌈T/64⌉, H, B)
// (delta: (⌈T/16⌉, H, B)); dynamic shared memory (elements of 2 bytes, rows of hd swizzled):
//   fwd  Q [64, hd] + 2 × (K, V) [BC, hd]                   hd 64: 40 KiB, hd 128: 48 KiB
//   dq   2 × (K, V) [BC, hd], stage 1 aliasing Q, gy [64, hd] hd 64: 32 KiB, hd 128: 48 KiB
//   dkv  K, V [64, hd] + 2 × (Q, gy) [BQ, hd]               hd 64: 48 KiB, hd 128: 48 KiB
// (never above the 48 KiB default: no opt-in).
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

// ---- Tensor-core path (bf16/f16, hd ∈ {64, 128}): FlashAttention-2 -----------------------
namespace tc {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBM = 64;        // query rows (forward, dq) or keys (dkv) per block: 16 per warp
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

// The element offset of 16-byte chunk `ch` of row `r` in a [rows, HD] tile: XOR-swizzled by
// the row's low 3 bits, so the 8 row addresses of one ldmatrix 8×8 matrix (same logical
// chunk, 8 consecutive rows) fall in 8 distinct 16-byte bank groups, and a cp.async of 8
// consecutive chunks of a row too.
template <int HD>
__device__ __forceinline__ int sw(int r, int ch) {
    return r * HD + ((ch ^ (r & 7)) << 3);
}

// Issues the cp.async copies of rows r0 … r0 + ROWS − 1 of one head (row stride `stride`
// elements, columns 0 … HD − 1 of `src`) into the swizzled tile `sm`; rows ≥ t zero-filled.
// The caller commits.
template <typename T, int HD, int ROWS>
__device__ __forceinline__ void load_async(T* sm, const T* src, long long stride, long long r0,
                                           long long t) {
    constexpr int kChunks = HD / 8;
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
        const int r = idx / kChunks, ch = idx % kChunks;
        const long long row = r0 + r;
        const bool in = row < t;
        lf::cp_async16(sm + sw<HD>(r, ch), in ? src + row * stride + ch * 8 : src, in ? 16 : 0);
    }
}

// The A fragment (16×16, rows r0 … r0 + 15, columns 16·ks …) of a swizzled tile.
template <typename T, int HD>
__device__ __forceinline__ void load_a(unsigned a[4], const T* sm, int r0, int ks) {
    const int lane = threadIdx.x & 31, j = lane >> 3;
    lf::ldmatrix_x4(a, sm + sw<HD>(r0 + (j & 1) * 8 + (lane & 7), ks * 2 + (j >> 1)));
}

// The "col" B fragments of two n-tiles (rows n0 … n0 + 15 of the tile are the n index, the
// columns 16·ks … the k index): b[0..1] for rows n0 …, b[2..3] for rows n0 + 8 ….
template <typename T, int HD>
__device__ __forceinline__ void load_b(unsigned b[4], const T* sm, int n0, int ks) {
    const int lane = threadIdx.x & 31, j = lane >> 3;
    lf::ldmatrix_x4(b, sm + sw<HD>(n0 + (j >> 1) * 8 + (lane & 7), ks * 2 + (j & 1)));
}

// The B fragments of two n-tiles where the tile's rows k0 … k0 + 15 are the k index and its
// columns the n index (chunk d = columns 8d …, and d + 1), by ldmatrix.trans: b[0..1] for
// columns 8d …, b[2..3] for 8(d + 1) ….
template <typename T, int HD>
__device__ __forceinline__ void load_bt(unsigned b[4], const T* sm, int k0, int d) {
    const int lane = threadIdx.x & 31, j = lane >> 3;
    lf::ldmatrix_x4_trans(b, sm + sw<HD>(k0 + (j & 1) * 8 + (lane & 7), d + (j >> 1)));
}

// The A fragment of k-step kk of a 16×N product held as mma accumulators acc[N/8][4] (the
// C layout of n-tiles 2kk and 2kk + 1 is the A layout of one 16×16 k-step), rounded to T.
template <typename T>
__device__ __forceinline__ void repack(unsigned a[4], const float x0[4], const float x1[4]) {
    a[0] = lf::pack2(lf::from_f32<T>(x0[0]), lf::from_f32<T>(x0[1]));
    a[1] = lf::pack2(lf::from_f32<T>(x0[2]), lf::from_f32<T>(x0[3]));
    a[2] = lf::pack2(lf::from_f32<T>(x1[0]), lf::from_f32<T>(x1[1]));
    a[3] = lf::pack2(lf::from_f32<T>(x1[2]), lf::from_f32<T>(x1[3]));
}

// acc[N/8][4] += A (16 × HD, the A fragments a[HD/16]) · Bᵀ for B the rows n0 … n0 + N − 1
// of the swizzled tile `sm` [·, HD] (S = Q·Kᵀ and its relatives).
template <typename T, int HD, int N>
__device__ __forceinline__ void gemm_abt(float acc[N / 8][4], const unsigned (*a)[4],
                                         const T* sm, int n0) {
    LF_UNROLL
    for (int ks = 0; ks < HD / 16; ++ks) {
        LF_UNROLL
        for (int nt = 0; nt < N / 8; nt += 2) {
            unsigned b[4];
            load_b<T, HD>(b, sm, n0 + nt * 8, ks);
            lf::mma_m16n8k16<T>(acc[nt], a[ks], b, acc[nt]);
            lf::mma_m16n8k16<T>(acc[nt + 1], a[ks], b + 2, acc[nt + 1]);
        }
    }
}

// acc[HD/8][4] += X (16 × K, as accumulators x[K/8][4], rounded to T) · B for B the rows
// 0 … K − 1 of the swizzled tile `sm` [K, HD] (O += P·V and its relatives).
template <typename T, int HD, int K>
__device__ __forceinline__ void gemm_xb(float acc[HD / 8][4], const float (*x)[4], const T* sm) {
    LF_UNROLL
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a[4];
        repack<T>(a, x[2 * kk], x[2 * kk + 1]);
        LF_UNROLL
        for (int d = 0; d < HD / 8; d += 2) {
            unsigned b[4];
            load_bt<T, HD>(b, sm, kk * 16, d);
            lf::mma_m16n8k16<T>(acc[d], a, b, acc[d]);
            lf::mma_m16n8k16<T>(acc[d + 1], a, b + 2, acc[d + 1]);
        }
    }
}

// Stores a packed pair at `p` (4-byte aligned).
template <typename T>
__device__ __forceinline__ void store_pair(T* p, unsigned v) {
#if defined(LORAFUSE_SIM)
    memcpy(p, &v, 4);
#else
    *reinterpret_cast<unsigned*>(p) = v;
#endif
}

// Stores the warp's 16 × HD accumulators (times `mul`, rounded once) into rows r0 … r0 + 15
// (< t) of `dst` (row stride `stride`), staged through the warp's own swizzled rows
// `stage` [16, HD] of shared memory so that global stores are 16 bytes wide.
template <typename T, int HD>
__device__ __forceinline__ void store_rows(const float acc[HD / 8][4], float mul, T* stage,
                                           T* dst, long long stride, long long r0, long long t) {
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    __syncwarp();  // the warp's earlier reads of `stage` are done
    LF_UNROLL
    for (int d = 0; d < HD / 8; ++d) {
        const unsigned lo = lf::pack2(lf::from_f32<T>(acc[d][0] * mul), lf::from_f32<T>(acc[d][1] * mul));
        const unsigned hi = lf::pack2(lf::from_f32<T>(acc[d][2] * mul), lf::from_f32<T>(acc[d][3] * mul));
        store_pair(stage + sw<HD>(g, d) + 2 * tq, lo);
        store_pair(stage + sw<HD>(g + 8, d) + 2 * tq, hi);
    }
    __syncwarp();
    constexpr int kChunks = HD / 8;
    LF_UNROLL
    for (int idx = lane; idx < 16 * kChunks; idx += 32) {
        const int r = idx / kChunks, ch = idx % kChunks;
        if (r0 + r < t) lf::copy16(dst + (r0 + r) * stride + ch * 8, stage + sw<HD>(r, ch));
    }
}

// Trap on a launch whose geometry is not this instantiation's (the launcher never makes one).
template <int HD, int BN>
__device__ __forceinline__ void check(const AttentionParams& p) {
    if (p.c / p.h != HD || p.c % p.h != 0 || p.br != kBM || p.bc != BN || blockDim.x != kThreads)
        __trap();
}

// Forward: one block per 64 query rows (longest first), key tiles of BC rows double-buffered.
// Shared: Q [64, HD], then 2 stages × (K [BC, HD], V [BC, HD]).
template <typename T, int HD, int BC>
__device__ __forceinline__ void forward(const AttentionParams& p) {
    check<HD, BC>(p);
    LF_DYNAMIC_SMEM(T, sm);
    T* qs = sm;
    T* kv = qs + kBM * HD;
    const long long t = p.t, c = p.c, ldg = 3 * c;
    const long long qb = (long long)gridDim.x - 1 - blockIdx.x;  // longest first
    const long long i0 = qb * kBM, h = blockIdx.y, b = blockIdx.z;
    const T* base = static_cast<const T*>(p.qkv) + b * t * ldg + h * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const long long kend = i0 + kBM < t ? i0 + kBM : t;  // keys 0 … kend − 1
    const int ntiles = (int)((kend + BC - 1) / BC);
    const long long rw = i0 + warp * 16;     // the warp's first row
    const long long row[2] = {rw + g, rw + g + 8};
    load_async<T, HD, kBM>(qs, base, ldg, i0, t);
    load_async<T, HD, BC>(kv, base + c, ldg, 0, t);
    load_async<T, HD, BC>(kv + BC * HD, base + 2 * c, ldg, 0, t);
    lf::cp_async_commit();
    const float sl2 = p.scale * kLog2e;
    unsigned qf[HD / 16][4];
    float o[HD / 8][4];
    LF_UNROLL
    for (int d = 0; d < HD / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};  // per row: log2-domain max, partial sum
    for (int n = 0; n < ntiles; ++n) {
        if (n + 1 < ntiles) {
            T* nk = kv + ((n + 1) & 1) * 2 * BC * HD;
            load_async<T, HD, BC>(nk, base + c, ldg, (long long)(n + 1) * BC, t);
            load_async<T, HD, BC>(nk + BC * HD, base + 2 * c, ldg, (long long)(n + 1) * BC, t);
            lf::cp_async_commit();
            lf::cp_async_wait<1>();
        } else {
            lf::cp_async_wait<0>();
        }
        __syncthreads();  // stage n & 1 (and Q, the first time) is in for every thread
        const T* ks = kv + (n & 1) * 2 * BC * HD;
        const T* vs = ks + BC * HD;
        if (n == 0) {
            LF_UNROLL
            for (int k = 0; k < HD / 16; ++k) load_a<T, HD>(qf[k], qs, warp * 16, k);
        }
        float s[BC / 8][4];
        LF_UNROLL
        for (int nt = 0; nt < BC / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
        gemm_abt<T, HD, BC>(s, qf, ks, 0);
        const long long j0 = (long long)n * BC;
        const bool diag = j0 + BC - 1 > rw;  // some key of the tile is above some row's diagonal
        float mt[2] = {neg_inf(), neg_inf()};
        LF_UNROLL
        for (int nt = 0; nt < BC / 8; ++nt) {
            LF_UNROLL
            for (int e = 0; e < 4; ++e) {
                const long long j = j0 + nt * 8 + 2 * tq + (e & 1);
                float v = s[nt][e] * sl2;
                if (diag && j > row[e >> 1]) v = neg_inf();
                s[nt][e] = v;
                mt[e >> 1] = fmaxf(mt[e >> 1], v);
            }
        }
        float alpha[2];
        LF_UNROLL
        for (int r = 0; r < 2; ++r) {
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
            // Key 0 is below every row's diagonal, so the max is finite from the first tile on;
            // α = 0 on the first tile (m = −inf).
            const float mn = fmaxf(m[r], mt[r]);
            alpha[r] = exp2f(m[r] - mn);
            m[r] = mn;
            l[r] *= alpha[r];
        }
        LF_UNROLL
        for (int nt = 0; nt < BC / 8; ++nt) {
            LF_UNROLL
            for (int e = 0; e < 4; ++e) {
                const float pe = exp2f(s[nt][e] - m[e >> 1]);  // 0 where masked
                s[nt][e] = pe;
                l[e >> 1] += pe;
            }
        }
        LF_UNROLL
        for (int d = 0; d < HD / 8; ++d) {
            o[d][0] *= alpha[0];
            o[d][1] *= alpha[0];
            o[d][2] *= alpha[1];
            o[d][3] *= alpha[1];
        }
        gemm_xb<T, HD, BC>(o, s, vs);
        __syncthreads();  // every warp is done with stage n & 1: the next iteration refills it
    }
    LF_UNROLL
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (tq == 0 && row[r] < t) p.lse[(b * p.h + h) * t + row[r]] = m[r] * kLn2 + logf(l[r]);
    }
    const float inv[2] = {1.0f / l[0], 1.0f / l[1]};
    LF_UNROLL
    for (int d = 0; d < HD / 8; ++d) {
        o[d][0] *= inv[0];
        o[d][1] *= inv[0];
        o[d][2] *= inv[1];
        o[d][3] *= inv[1];
    }
    // The warp's own Q rows (read by this warp only) stage the output.
    store_rows<T, HD>(o, 1.0f, qs + warp * 16 * HD, static_cast<T*>(p.out) + b * t * c + h * HD,
                      c, rw, t);
}

// D_i = Σ_e gy_ie·y_ie: one row per 8 threads (16-byte loads, chunks in order, then a fixed
// xor tree), 16 rows per block; hd a multiple of 8.
template <typename T>
__device__ __forceinline__ void delta(const AttentionParams& p) {
    const int hd = (int)(p.c / p.h);
    if (hd % 8 != 0 || blockDim.x != kThreads) __trap();
    const long long t = p.t, c = p.c, h = blockIdx.y, b = blockIdx.z;
    const long long i = (long long)blockIdx.x * 16 + threadIdx.x / 8;
    const int part = threadIdx.x % 8;
    float sum = 0.0f;
    if (i < t) {
        const T* y = static_cast<const T*>(p.y) + (b * t + i) * c + h * hd;
        const T* gy = static_cast<const T*>(p.gy) + (b * t + i) * c + h * hd;
        for (int ch = part; ch < hd / 8; ch += 8) {
            alignas(16) T yv[8];
            alignas(16) T gv[8];
            lf::copy16(yv, y + ch * 8);
            lf::copy16(gv, gy + ch * 8);
            LF_UNROLL
            for (int e = 0; e < 8; ++e) sum += lf::to_f32(yv[e]) * lf::to_f32(gv[e]);
        }
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (i < t && part == 0) p.delta[(b * p.h + h) * t + i] = sum;
}

// dq: one block per 64 query rows (longest first), key tiles of BC rows double-buffered.
// Shared: stage 0 (K, V [BC, HD]), then a region holding Q, gy [64, HD] at the start (read
// into registers) and stage 1 after.
template <typename T, int HD, int BC>
__device__ __forceinline__ void backward_dq(const AttentionParams& p) {
    check<HD, BC>(p);
    LF_DYNAMIC_SMEM(T, sm);
    T* const st1 = sm + 2 * BC * HD;  // stage s at sm + s·2·BC·HD
    T* qs = st1;
    T* gs = qs + kBM * HD;
    const long long t = p.t, c = p.c, ldg = 3 * c;
    const long long qb = (long long)gridDim.x - 1 - blockIdx.x;
    const long long i0 = qb * kBM, h = blockIdx.y, b = blockIdx.z, bh = (b * p.h + h) * t;
    const T* base = static_cast<const T*>(p.qkv) + b * t * ldg + h * HD;
    const T* gybase = static_cast<const T*>(p.gy) + b * t * c + h * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const long long kend = i0 + kBM < t ? i0 + kBM : t;
    const int ntiles = (int)((kend + BC - 1) / BC);
    const long long rw = i0 + warp * 16;
    const long long row[2] = {rw + g, rw + g + 8};
    load_async<T, HD, kBM>(qs, base, ldg, i0, t);
    load_async<T, HD, kBM>(gs, gybase, c, i0, t);
    lf::cp_async_commit();
    load_async<T, HD, BC>(sm, base + c, ldg, 0, t);
    load_async<T, HD, BC>(sm + BC * HD, base + 2 * c, ldg, 0, t);
    lf::cp_async_commit();
    float lse2[2], dd[2];
    LF_UNROLL
    for (int r = 0; r < 2; ++r) {
        const bool in = row[r] < t;
        lse2[r] = in ? p.lse[bh + row[r]] * kLog2e : 0.0f;
        dd[r] = in ? p.delta[bh + row[r]] : 0.0f;
    }
    lf::cp_async_wait<1>();
    __syncthreads();  // Q and gy are in
    unsigned qf[HD / 16][4], gf[HD / 16][4];
    LF_UNROLL
    for (int k = 0; k < HD / 16; ++k) {
        load_a<T, HD>(qf[k], qs, warp * 16, k);
        load_a<T, HD>(gf[k], gs, warp * 16, k);
    }
    __syncthreads();  // every warp holds its Q, gy: the region may take stage 1
    const float sl2 = p.scale * kLog2e;
    float dq[HD / 8][4];
    LF_UNROLL
    for (int d = 0; d < HD / 8; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;
    for (int n = 0; n < ntiles; ++n) {
        if (n + 1 < ntiles) {
            T* nk = sm + ((n + 1) & 1) * 2 * BC * HD;
            load_async<T, HD, BC>(nk, base + c, ldg, (long long)(n + 1) * BC, t);
            load_async<T, HD, BC>(nk + BC * HD, base + 2 * c, ldg, (long long)(n + 1) * BC, t);
            lf::cp_async_commit();
            lf::cp_async_wait<1>();
        } else {
            lf::cp_async_wait<0>();
        }
        __syncthreads();  // stage n & 1 is in
        const T* ks = sm + (n & 1) * 2 * BC * HD;
        const T* vs = ks + BC * HD;
        float s[BC / 8][4], dp[BC / 8][4];
        LF_UNROLL
        for (int nt = 0; nt < BC / 8; ++nt)
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = dp[nt][0] = dp[nt][1] = dp[nt][2] =
                dp[nt][3] = 0.0f;
        gemm_abt<T, HD, BC>(s, qf, ks, 0);
        gemm_abt<T, HD, BC>(dp, gf, vs, 0);
        const long long j0 = (long long)n * BC;
        const bool diag = j0 + BC - 1 > rw;
        LF_UNROLL
        for (int nt = 0; nt < BC / 8; ++nt) {
            LF_UNROLL
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const long long j = j0 + nt * 8 + 2 * tq + (e & 1);
                const float pe = diag && j > row[r] ? 0.0f : exp2f(s[nt][e] * sl2 - lse2[r]);
                s[nt][e] = pe * (dp[nt][e] - dd[r]);  // dS / scale
            }
        }
        gemm_xb<T, HD, BC>(dq, s, ks);
        __syncthreads();  // every warp is done with stage n & 1
    }
    store_rows<T, HD>(dq, p.scale, sm + warp * 16 * HD,
                      static_cast<T*>(p.out) + b * t * ldg + h * HD, ldg, rw, t);
}

// dk, dv: one block per 64 keys (the first key block has the most query tiles and the lowest
// index), query tiles of BQ rows from the diagonal on, double-buffered. Shared: K, V [64, HD],
// then 2 stages × (Q [BQ, HD], gy [BQ, HD]). Warp w owns keys 16w … 16w + 15 of the block:
// Sᵀ = K·Qᵀ, dPᵀ = V·gyᵀ, dV += Pᵀ·gy, dK += dSᵀ·Q, all in its registers.
template <typename T, int HD, int BQ>
__device__ __forceinline__ void backward_dkv(const AttentionParams& p) {
    check<HD, BQ>(p);
    LF_DYNAMIC_SMEM(T, sm);
    T* ks = sm;
    T* vs = ks + kBM * HD;
    T* const st0 = vs + kBM * HD;  // stage s at st0 + s·2·BQ·HD
    const long long t = p.t, c = p.c, ldg = 3 * c;
    const long long j0 = (long long)blockIdx.x * kBM, h = blockIdx.y, b = blockIdx.z;
    const long long bh = (b * p.h + h) * t;
    const T* base = static_cast<const T*>(p.qkv) + b * t * ldg + h * HD;
    const T* gybase = static_cast<const T*>(p.gy) + b * t * c + h * HD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const long long kw = j0 + warp * 16;  // the warp's first key
    const long long key[2] = {kw + g, kw + g + 8};
    const int ntiles = (int)((t - j0 + BQ - 1) / BQ);  // query tiles j0, j0 + BQ, … < t
    load_async<T, HD, kBM>(ks, base + c, ldg, j0, t);
    load_async<T, HD, kBM>(vs, base + 2 * c, ldg, j0, t);
    load_async<T, HD, BQ>(st0, base, ldg, j0, t);
    load_async<T, HD, BQ>(st0 + BQ * HD, gybase, c, j0, t);
    lf::cp_async_commit();
    const float sl2 = p.scale * kLog2e;
    float dk[HD / 8][4], dv[HD / 8][4];
    LF_UNROLL
    for (int d = 0; d < HD / 8; ++d)
        dk[d][0] = dk[d][1] = dk[d][2] = dk[d][3] = dv[d][0] = dv[d][1] = dv[d][2] = dv[d][3] = 0.0f;
    for (int n = 0; n < ntiles; ++n) {
        const long long i0 = j0 + (long long)n * BQ;
        if (n + 1 < ntiles) {
            T* nq = st0 + ((n + 1) & 1) * 2 * BQ * HD;
            load_async<T, HD, BQ>(nq, base, ldg, i0 + BQ, t);
            load_async<T, HD, BQ>(nq + BQ * HD, gybase, c, i0 + BQ, t);
            lf::cp_async_commit();
            lf::cp_async_wait<1>();
        } else {
            lf::cp_async_wait<0>();
        }
        // lse and D of the thread's query columns 8nt + 2tq (+1); 0 past t (never used there).
        float lse2[BQ / 8][2], dd[BQ / 8][2];
        LF_UNROLL
        for (int nt = 0; nt < BQ / 8; ++nt) {
            LF_UNROLL
            for (int e = 0; e < 2; ++e) {
                const long long i = i0 + nt * 8 + 2 * tq + e;
                lse2[nt][e] = i < t ? p.lse[bh + i] * kLog2e : 0.0f;
                dd[nt][e] = i < t ? p.delta[bh + i] : 0.0f;
            }
        }
        __syncthreads();  // stage n & 1 (and K, V the first time) is in
        const T* qs = st0 + (n & 1) * 2 * BQ * HD;
        const T* gs = qs + BQ * HD;
        // Warp-uniform: a tile wholly above the warp's keys' diagonal contributes nothing.
        if (i0 + BQ - 1 >= kw) {
            float s[BQ / 8][4], dp[BQ / 8][4];
            LF_UNROLL
            for (int nt = 0; nt < BQ / 8; ++nt)
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = dp[nt][0] = dp[nt][1] = dp[nt][2] =
                    dp[nt][3] = 0.0f;
            {
                unsigned kf[HD / 16][4];
                LF_UNROLL
                for (int k = 0; k < HD / 16; ++k) load_a<T, HD>(kf[k], ks, warp * 16, k);
                gemm_abt<T, HD, BQ>(s, kf, qs, 0);
            }
            {
                unsigned vf[HD / 16][4];
                LF_UNROLL
                for (int k = 0; k < HD / 16; ++k) load_a<T, HD>(vf[k], vs, warp * 16, k);
                gemm_abt<T, HD, BQ>(dp, vf, gs, 0);
            }
            LF_UNROLL
            for (int nt = 0; nt < BQ / 8; ++nt) {
                LF_UNROLL
                for (int e = 0; e < 4; ++e) {
                    const long long i = i0 + nt * 8 + 2 * tq + (e & 1);
                    const float pe = i < key[e >> 1] || i >= t
                                         ? 0.0f
                                         : exp2f(s[nt][e] * sl2 - lse2[nt][e & 1]);
                    s[nt][e] = pe;
                    dp[nt][e] = pe * (dp[nt][e] - dd[nt][e & 1]);  // dSᵀ / scale
                }
            }
            gemm_xb<T, HD, BQ>(dv, s, gs);
            gemm_xb<T, HD, BQ>(dk, dp, qs);
        }
        __syncthreads();  // every warp is done with stage n & 1
    }
    // The warp's own K and V rows (read by this warp only) stage dk and dv.
    T* out = static_cast<T*>(p.out) + b * t * ldg + h * HD;
    store_rows<T, HD>(dk, p.scale, ks + warp * 16 * HD, out + c, ldg, kw, t);
    store_rows<T, HD>(dv, 1.0f, vs + warp * 16 * HD, out + 2 * c, ldg, kw, t);
}

}  // namespace tc

extern "C" __global__ void __launch_bounds__(128) attention_fwd_f32(const AttentionParams p) { forward<float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_fwd_bf16(const AttentionParams p) { forward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_fwd_f16(const AttentionParams p) { forward<f16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_bwd_f32(const AttentionParams p) { backward_dq<float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_bwd_bf16(const AttentionParams p) { backward_dq<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_bwd_f16(const AttentionParams p) { backward_dq<f16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_dkv_bwd_f32(const AttentionParams p) { backward_dkv<float>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_dkv_bwd_bf16(const AttentionParams p) { backward_dkv<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_dkv_bwd_f16(const AttentionParams p) { backward_dkv<f16>(p); }

// Tensor-core instantiations: hd 64 (key/query tiles of 64) and hd 128 (tiles of 32 for the
// forward and dq, 16 for dkv, to fit 48 KiB of shared memory).
extern "C" __global__ void __launch_bounds__(128) attention_tc64_fwd_bf16(const AttentionParams p) { tc::forward<bf16, 64, 64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc128_fwd_bf16(const AttentionParams p) { tc::forward<bf16, 128, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_delta_bwd_bf16(const AttentionParams p) { tc::delta<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc64_dq_bwd_bf16(const AttentionParams p) { tc::backward_dq<bf16, 64, 64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc128_dq_bwd_bf16(const AttentionParams p) { tc::backward_dq<bf16, 128, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc64_dkv_bwd_bf16(const AttentionParams p) { tc::backward_dkv<bf16, 64, 64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc128_dkv_bwd_bf16(const AttentionParams p) { tc::backward_dkv<bf16, 128, 16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc64_fwd_f16(const AttentionParams p) { tc::forward<f16, 64, 64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc128_fwd_f16(const AttentionParams p) { tc::forward<f16, 128, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_delta_bwd_f16(const AttentionParams p) { tc::delta<f16>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc64_dq_bwd_f16(const AttentionParams p) { tc::backward_dq<f16, 64, 64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc128_dq_bwd_f16(const AttentionParams p) { tc::backward_dq<f16, 128, 32>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc64_dkv_bwd_f16(const AttentionParams p) { tc::backward_dkv<f16, 64, 64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc128_dkv_bwd_f16(const AttentionParams p) { tc::backward_dkv<f16, 128, 16>(p); }
