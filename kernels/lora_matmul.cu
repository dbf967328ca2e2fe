// lora_matmul.cu — the fused LoRA GEMM: one tiled matrix product whose reduction runs over
// the base operands and then over a rank-r extension, in any layout the LoRA linear's
// forward and backward need (DESIGN §2).
//
// Math (one kernel for every product; A, B, A2, B2 addressed through strides):
//   C[i, j] = alpha · ( Σ_{p<K} A[i, p]·B[p, j]  +  Σ_{q<K2} A2[i, q]·B2[q, j] )
//             (+ bias[j]) (+ C[i, j] when accumulate)     (out =), or (out +=) with accumulate
//   B2[q, j] is zero outside the columns [b2_n0, b2_n1) (an adapter over part of the
//   outputs) and reads b2 at column j − b2_n0 inside them.
// The LoRA linear (x [M,K], W0 [N,K], A [r,K], B [n,r] over columns n0..n0+n, scale s):
//   forward   su = s·x·Aᵀ                 [M, r]  (A = x, B = Aᵀ, alpha = s)
//             y  = [x | su]·[W0 | B]ᵀ + b [M, N]  (K2 = r: the fused extension)
//   backward  sv = s·gy[:, cols]·B        [M, r]
//             gx = [gy | sv]·[W0 ; A]     [M, K]  (K2 = r)
//             gB = gy[:, cols]ᵀ·su        [n, r]  (reduction over the M tokens)
//             gA = svᵀ·x                  [r, K]
//   (and gW0 = gyᵀ·x only when W0 trains). Every product is this kernel with other strides.
//
// Dtypes: storage f32, bf16 or f16 (suffix), the same for every operand and C; accumulate
// in f32; C rounded once (nearest even). Two variants:
//   lora_matmul_fwd_<T>     SIMT: f32 FMAs on CUDA cores (the f32 path; any dtype).
//   lora_matmul_tc_fwd_<T>  tensor cores, bf16/f16: fragments by lf::ldmatrix_x4, products
//                           by lf::mma_m16n8k16 (ldmatrix / mma.sync on sm_80+; the
//                           simulator's shuffle implementations on the CPU).
// FLOPs per call: 2·M·N·(K + K2). Bytes (s per element, no reuse beyond a tile):
//   s·(M·(K+K2) + N·(K+K2) + M·N) ideal; the 64×64 tiles re-read A N/64 times and B M/64
//   times from L2. Headline (bf16, M = 8192, K = N = 4096, r = 16): 552 GFLOP → at ~800
//   TFLOP/s (an H100's dense bf16 rate) a floor of ~0.69 ms; the LoRA extension adds 0.4 %
//   of the FLOPs and no extra pass over x or y. The skinny products (su, sv: N = r;
//   gA, gB: M = r or N = r) are bandwidth-bound: 2·s·M·K bytes, e.g. x of 64 MiB → ~22 µs.
// Launch geometry: grid (ceil(N/64), ceil(M/64)), one 64×64 tile of C per block; SIMT 256
//   threads (16×16, 4×4 outputs each, k-tile 16), tensor cores 128 threads (4 warps in
//   2×2, 32×32 each = 2×4 mma tiles, k-tile 32, 4 ldmatrix.x4 per 8 mma). Tiles come in by
//   16-byte vector loads where the operand allows (a k-tile inside the base reduction, the
//   contiguous dimension a multiple of 8 elements, a 16-byte-aligned pointer), else element
//   by element with bounds checks (zero fill), so any M, N, K, K2, stride and alignment is
//   accepted. No atomics: deterministic. Not yet measured on a GPU; known gaps against
//   cuBLAS: no cp.async pipelining of the next k-tile, 64×64 tiles, no split-K for the
//   reductions over M (gA, gB).
#include "common.cuh"

// Rust twin: `LoraMatmulParams` in src/ops/lora_matmul/cuda.rs (a test checks the size).
struct LoraMatmulParams {
    const void* a;     // A(i, p) = a[i·a_rs + p·a_cs]
    const void* b;     // B(p, j) = b[p·b_rs + j·b_cs]
    const void* a2;    // A2(i, q) = a2[i·a2_rs + q·a2_cs]; unused when k2 = 0
    const void* b2;    // B2(q, j) = b2[q·b2_rs + (j − b2_n0)·b2_cs] for j in [b2_n0, b2_n1)
    void* c;           // C(i, j) = c[i·ldc + j]
    const void* bias;  // bias[j], or null
    long long m, n, k, k2;
    long long a_rs, a_cs, b_rs, b_cs;
    long long a2_rs, a2_cs, b2_rs, b2_cs;
    long long ldc;
    long long b2_n0, b2_n1;
    float alpha;
    int accumulate;    // 1: C += result (C read in f32 first)
};

namespace {

constexpr int kTile = 64;  // BM = BN = 64 for both variants

// A's element (i, kk) of the concatenated reduction [A | A2], as f32; zero outside.
template <typename T>
__device__ __forceinline__ float load_a(const LoraMatmulParams& p, long long i, long long kk) {
    if (i >= p.m) return 0.0f;
    if (kk < p.k) return lf::to_f32(static_cast<const T*>(p.a)[i * p.a_rs + kk * p.a_cs]);
    kk -= p.k;
    if (kk < p.k2) return lf::to_f32(static_cast<const T*>(p.a2)[i * p.a2_rs + kk * p.a2_cs]);
    return 0.0f;
}

// B's element (kk, j) of the concatenated reduction [B ; B2], as f32; zero outside.
template <typename T>
__device__ __forceinline__ float load_b(const LoraMatmulParams& p, long long kk, long long j) {
    if (j >= p.n) return 0.0f;
    if (kk < p.k) return lf::to_f32(static_cast<const T*>(p.b)[kk * p.b_rs + j * p.b_cs]);
    kk -= p.k;
    if (kk < p.k2 && j >= p.b2_n0 && j < p.b2_n1)
        return lf::to_f32(static_cast<const T*>(p.b2)[kk * p.b2_rs + (j - p.b2_n0) * p.b2_cs]);
    return 0.0f;
}

// The epilogue of one element: alpha·acc (+ bias) (+ C), rounded once.
template <typename T>
__device__ __forceinline__ void store_c(const LoraMatmulParams& p, long long i, long long j,
                                        float acc) {
    if (i >= p.m || j >= p.n) return;
    T* c = static_cast<T*>(p.c);
    float v = p.alpha * acc;
    if (p.bias) v += lf::to_f32(static_cast<const T*>(p.bias)[j]);
    if (p.accumulate) v += lf::to_f32(c[i * p.ldc + j]);
    c[i * p.ldc + j] = lf::from_f32<T>(v);
}

// ---- SIMT: 256 threads, 4×4 outputs each ----
constexpr int kSimtThreads = 256;
constexpr int kSimtK = 16;

template <typename T>
__device__ void gemm_simt(const LoraMatmulParams& p) {
    __shared__ float as[kSimtK][kTile + 1];  // as[kk][i]: A tile, k-major
    __shared__ float bs[kSimtK][kTile + 1];  // bs[kk][j]: B tile
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const long long i0 = (long long)blockIdx.y * kTile, j0 = (long long)blockIdx.x * kTile;
    const long long ktot = p.k + p.k2;
    // Load order: along the operand's contiguous dimension for coalescing.
    const bool a_k_fast = p.a_cs == 1, b_j_fast = p.b_cs == 1;
    float acc[4][4] = {};
    for (long long k0 = 0; k0 < ktot; k0 += kSimtK) {
        for (int e = tid; e < kSimtK * kTile; e += kSimtThreads) {
            const int r = a_k_fast ? e / kSimtK : e % kTile;
            const int kk = a_k_fast ? e % kSimtK : e / kTile;
            as[kk][r] = load_a<T>(p, i0 + r, k0 + kk);
        }
        for (int e = tid; e < kSimtK * kTile; e += kSimtThreads) {
            const int cidx = b_j_fast ? e % kTile : e / kSimtK;
            const int kk = b_j_fast ? e / kTile : e % kSimtK;
            bs[kk][cidx] = load_b<T>(p, k0 + kk, j0 + cidx);
        }
        __syncthreads();
        for (int kk = 0; kk < kSimtK; ++kk) {
            float av[4], bv[4];
            for (int u = 0; u < 4; ++u) av[u] = as[kk][ty + 16 * u];
            for (int u = 0; u < 4; ++u) bv[u] = bs[kk][tx + 16 * u];
            for (int u = 0; u < 4; ++u)
                for (int w = 0; w < 4; ++w) acc[u][w] = fmaf(av[u], bv[w], acc[u][w]);
        }
        __syncthreads();
    }
    for (int u = 0; u < 4; ++u)
        for (int w = 0; w < 4; ++w) store_c<T>(p, i0 + ty + 16 * u, j0 + tx + 16 * w, acc[u][w]);
}

// ---- Tensor cores: 128 threads = 4 warps (2×2), each a 32×32 sub-tile ----
constexpr int kTcThreads = 128;
constexpr int kTcK = 32;
constexpr int kTcPad = 8;  // row padding: fragment reads of 8 rows hit different banks

// 16-byte vector loads of a tile: 8 storage values at once where the operand allows it
// (a k-tile wholly inside the base reduction, the contiguous dimension aligned to 8
// elements and the pointer to 16 bytes). Everything else goes element by element.
constexpr int kVec = 8;  // bf16/f16 values per 16 bytes

template <typename T>
__device__ __forceinline__ void load_tiles_tc(const LoraMatmulParams& p, long long i0, long long j0,
                                              long long k0, T (*as)[kTcK + kTcPad],
                                              T (*bs)[kTcK + kTcPad], bool a_vec, bool b_vec_k,
                                              bool b_vec_j) {
    const int tid = threadIdx.x;
    const bool in_base = k0 + kTcK <= p.k;
    if (in_base && a_vec) {
        // A(i, k0..k0+32) is contiguous: 4 vectors per row, 256 per tile.
        for (int e = tid; e < kTile * (kTcK / kVec); e += kTcThreads) {
            const int r = e / (kTcK / kVec), kk = (e % (kTcK / kVec)) * kVec;
            if (i0 + r < p.m)
                lf::copy16(&as[r][kk], static_cast<const T*>(p.a) + (i0 + r) * p.a_rs + k0 + kk);
            else
                for (int v = 0; v < kVec; ++v) as[r][kk + v] = lf::from_f32<T>(0.0f);
        }
    } else {
        const bool a_k_fast = p.a_cs == 1;
        for (int e = tid; e < kTcK * kTile; e += kTcThreads) {
            const int r = a_k_fast ? e / kTcK : e % kTile;
            const int kk = a_k_fast ? e % kTcK : e / kTile;
            as[r][kk] = lf::from_f32<T>(load_a<T>(p, i0 + r, k0 + kk));
        }
    }
    if (in_base && b_vec_k) {
        // B(k0..k0+32, j) is contiguous (B = W0ᵀ of the forward): copied as is.
        for (int e = tid; e < kTile * (kTcK / kVec); e += kTcThreads) {
            const int c = e / (kTcK / kVec), kk = (e % (kTcK / kVec)) * kVec;
            if (j0 + c < p.n)
                lf::copy16(&bs[c][kk], static_cast<const T*>(p.b) + (j0 + c) * p.b_cs + k0 + kk);
            else
                for (int v = 0; v < kVec; ++v) bs[c][kk + v] = lf::from_f32<T>(0.0f);
        }
    } else if (in_base && b_vec_j && j0 + kTile <= p.n) {
        // B(k, j0..j0+64) is contiguous (W0 in gx = gy·W0): vector loads, transposed into
        // the k-contiguous tile.
        for (int e = tid; e < kTcK * (kTile / kVec); e += kTcThreads) {
            const int kk = e / (kTile / kVec), c = (e % (kTile / kVec)) * kVec;
            T v[kVec];
            lf::copy16(v, static_cast<const T*>(p.b) + (k0 + kk) * p.b_rs + j0 + c);
            for (int u = 0; u < kVec; ++u) bs[c + u][kk] = v[u];
        }
    } else {
        const bool b_j_fast = p.b_cs == 1;
        for (int e = tid; e < kTcK * kTile; e += kTcThreads) {
            const int cidx = b_j_fast ? e % kTile : e / kTcK;
            const int kk = b_j_fast ? e / kTile : e % kTcK;
            bs[cidx][kk] = lf::from_f32<T>(load_b<T>(p, k0 + kk, j0 + cidx));
        }
    }
}

template <typename T>
__device__ void gemm_tc(const LoraMatmulParams& p) {
    __shared__ __align__(16) T as[kTile][kTcK + kTcPad];  // as[i][kk]: A tile, k contiguous
    __shared__ __align__(16) T bs[kTile][kTcK + kTcPad];  // bs[j][kk]: B tile, k contiguous
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const long long i0 = (long long)blockIdx.y * kTile, j0 = (long long)blockIdx.x * kTile;
    const long long ktot = p.k + p.k2;
    const bool a_vec = p.a_cs == 1 && p.a_rs % kVec == 0 && lf::aligned16(p.a);
    const bool b_vec_k = p.b_rs == 1 && p.b_cs % kVec == 0 && lf::aligned16(p.b);
    const bool b_vec_j = p.b_cs == 1 && p.b_rs % kVec == 0 && lf::aligned16(p.b);
    float acc[2][4][4] = {};
    for (long long k0 = 0; k0 < ktot; k0 += kTcK) {
        load_tiles_tc<T>(p, i0, j0, k0, as, bs, a_vec, b_vec_k, b_vec_j);
        __syncthreads();
        for (int ks = 0; ks < kTcK; ks += 16) {
            // Fragments by ldmatrix: lane l addresses row l % 8 of matrix l / 8.
            const int q = lane / 8, row8 = lane % 8;
            unsigned af[2][4], bf[4][2];
            for (int mi = 0; mi < 2; ++mi)  // matrices: (rows +0, k +0), (+8, +0), (+0, +8), (+8, +8)
                lf::ldmatrix_x4(af[mi], &as[wm + mi * 16 + row8 + (q & 1) * 8][ks + (q >> 1) * 8]);
            for (int np = 0; np < 2; ++np) {  // columns +0..15: (n +0, k +0), (+0, +8), (+8, +0), (+8, +8)
                unsigned r[4];
                lf::ldmatrix_x4(r, &bs[wn + np * 16 + row8 + (q >> 1) * 8][ks + (q & 1) * 8]);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
            for (int mi = 0; mi < 2; ++mi)
                for (int ni = 0; ni < 4; ++ni)
                    lf::mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
        }
        __syncthreads();
    }
    for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
            for (int q = 0; q < 4; ++q) {
                const long long i = i0 + wm + mi * 16 + g + (q >= 2 ? 8 : 0);
                const long long j = j0 + wn + ni * 8 + 2 * t + (q & 1);
                store_c<T>(p, i, j, acc[mi][ni][q]);
            }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kSimtThreads)
    lora_matmul_fwd_f32(const LoraMatmulParams p) {
    gemm_simt<float>(p);
}
extern "C" __global__ void __launch_bounds__(kSimtThreads)
    lora_matmul_fwd_bf16(const LoraMatmulParams p) {
    gemm_simt<bf16>(p);
}
extern "C" __global__ void __launch_bounds__(kSimtThreads)
    lora_matmul_fwd_f16(const LoraMatmulParams p) {
    gemm_simt<f16>(p);
}
extern "C" __global__ void __launch_bounds__(kTcThreads)
    lora_matmul_tc_fwd_bf16(const LoraMatmulParams p) {
    gemm_tc<bf16>(p);
}
extern "C" __global__ void __launch_bounds__(kTcThreads)
    lora_matmul_tc_fwd_f16(const LoraMatmulParams p) {
    gemm_tc<f16>(p);
}
