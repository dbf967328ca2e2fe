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
// in f32; C rounded once (nearest even). Three kernels:
//   lora_matmul_fwd_<T>        SIMT: f32 FMAs on CUDA cores (the f32 path; any dtype).
//   lora_matmul_tc128_fwd_<T>  tensor cores, bf16/f16, 128×128×32 tiles, 8 warps.
//   lora_matmul_tc64_fwd_<T>   tensor cores, bf16/f16, 64×64×32 tiles, 4 warps.
//
// FLOPs per call: 2·M·N·(K + K2). Bytes (s = 2 per element): s·(M·(K+K2) + N·(K+K2) + M·N)
// compulsory (+ M·N read when accumulating); a 128×128 tile re-reads A N/128 times and B
// M/128 times, from L2 thanks to the rasterization below.
// Floors at ~800 TFLOP/s (DESIGN §9: the measured cuBLAS-class bf16 rate of an H100/H200;
// 990 TFLOP/s is the dense wgmma peak) and ~3.0–4.3 TB/s:
//   headline (bf16, M 8192, K = N = 4096, r 16): one product 2·8192·4096·4112 = 276 GFLOP
//     (the forward y and the backward gx together: 552 GFLOP), 168 MB → 0.345 ms per
//     product (0.69 ms the pair) at 800 TFLOP/s; compute-bound (AI ≈ 1600 FLOP/B).
//   GPT-2 124M step, M = 8192 tokens, LoRA r 16 on the four block linears (lm_head: none):
//     GEMM             forward y [M,N] (K+r)     backward gx [M,K] (N+r)   bytes   floor
//     c_attn 768→2304   29.6 GFLOP  1152 tiles    29.2 GFLOP  384 tiles     54 MB   37 µs
//     attn.c_proj 768   9.9 GFLOP    384 tiles     9.9 GFLOP  384 tiles     26 MB   12 µs
//     mlp.c_fc 768→3072 39.5 GFLOP  1536 tiles    38.9 GFLOP  384 tiles     68 MB   49 µs
//     mlp.c_proj 3072→768 38.9 GFLOP 384 tiles    39.5 GFLOP 1536 tiles     68 MB   49 µs
//     lm_head 768→50304 633 GFLOP  25152 tiles   633 GFLOP    384 tiles    914 MB  791 µs
//     (lm_head: the vocabulary V = 50257 padded to Vp = 50304 = 393·128, a multiple of 64,
//     by the model: +0.09 % FLOPs, the same tiles. tiles: 128×128; ×12 layers for the
//     block linears; per step ≈ 2·(12·118 + 633)
//     GFLOP ≈ 4.1 TFLOP of y/gx GEMMs → a floor of ~5.1 ms.) The skinny products (s·u,
//     s·v: N = r; gA, gB: M = r or N = r) are bandwidth-bound: 2·s·M·K bytes, e.g. x of
//     12 MiB at the GPT-2 shape → ~4 µs at 3 TB/s; they take the 64×64 tile (issue 12
//     item 3 gives them split-K).
// Expected fraction (a design estimate, not measured on a GPU): 0.5–0.65 of the 800
//   TFLOP/s floor at the headline and the large step GEMMs, i.e. ~0.6× cuBLAS, because
//   * mma.sync m16n8k16 on an H100 peaks at ~60–70 % of the wgmma rate (~600–660 TFLOP/s),
//     and a CUTLASS-sm80-style kernel reaches ~85–90 % of that with a 3-stage cp.async
//     pipeline, ldmatrix from conflict-free swizzled tiles and one barrier per k-tile;
//   * occupancy (ptxas, nvcc 13.0): tc128 uses 170 registers × 256 threads and 48 KiB
//     of dynamic shared memory → 1 block (8 warps) per SM (registers bind: 2 blocks would
//     need ≤ 128, which spills); the 3 stages in flight, not extra warps, hide the load
//     latency. tc64: 123 (sm_90) – 127 (sm_80) registers × 128 threads, 24 KiB → 4 blocks per SM;
//   * shared-memory bandwidth is the tight spot: per k16 step a 64×32 warp tile loads
//     4 ldmatrix.x4 of A + 2 of B = 3 KiB for 16 mma = 64 KFLOP, 0.047 B/FLOP; at the
//     mma.sync rate (~2700 FLOP/clk/SM) that is ~126 B/clk of the 128 B/clk an SM's
//     shared memory delivers, so the tile is at the edge (a 64×64 warp tile, 0.031 B/FLOP,
//     is the next step if a GPU run shows LSU-bound mma issue);
//   * waves: the 384-tile products (attn.c_proj, the gx of c_attn/c_fc/lm_head) are 2.9
//     waves of 132 SMs at 1 block/SM (~3 % tail loss); the lm_head's 393 tile columns are
//     full (50304 = 393·128).
//   An operand that is not 16-byte loadable (below: a stride that is not a multiple of 8
//   elements) takes the fallback loader (element loads staged in registers, latency
//   exposed): ~0.2–0.3 of the floor. The unpadded vocabulary did that to the lm_head's
//   backward (glogits with row stride 50257: gx = glogits·wte and, under full
//   fine-tuning, gwte = glogitsᵀ·x, ~3 ms each instead of ~0.8 ms) and to its forward's
//   epilogue (ldc 50257); with the padded stride 50304 all three lm_head products load
//   every operand by cp.async and store vectors (the host twin `tc_path` in
//   src/ops/lora_matmul/cuda.rs, checked at these shapes by a planning test).
//
// Launch geometry:
//   SIMT: grid (ceil(N/64), ceil(M/64)), 256 threads (16×16, 4×4 outputs each, k-tile 16).
//   Tensor cores: a 1-D grid of ceil(M/BM)·ceil(N/BN) blocks (≤ 2^31 − 1), rasterized:
//     block b → tile-row groups of 8 (kGroupM), the tile-row fastest inside a group, so
//     the blocks in flight share B's column panel and A's 8 row panels in L2 (the lm_head
//     forward streams wte once per 1024 rows instead of once per tile-row).
//     tc128: BM = BN = 128, 8 warps as 2×4 of 64×32 (4×4 mma tiles each), 48 KiB dynamic
//       shared memory = 3 stages × (128×32 + 32×128) × 2 B (no opt-in needed).
//     tc64: BM = BN = 64, 4 warps as 2×2 of 32×32 (2×4 mma tiles), 24 KiB.
//   Heuristic (src/ops/lora_matmul/cuda.rs `tc_config`): tc128 when M > 64, N > 64 and the
//     128×128 grid has ≥ 132 tiles (one wave of an H100/H200); tc64 otherwise.
//   Pipeline: kStages = 3 k-tiles of 32 in flight by lf::cp_async16 (one commit group per
//     k-tile); per k-tile cp_async_wait<1> + ONE __syncthreads, then the prefetch of k-tile
//     kt + 2 into the stage freed by iteration kt − 1, then 2 × (ldmatrix + mma) steps.
//     The reduction runs ceil(K/32) base k-tiles of A/B then ceil(K2/32) extension k-tiles
//     of A2/B2 (skipped by blocks whose columns miss [b2_n0, b2_n1)), each zero-filled
//     past its extent: the LoRA term is fused along the reduction.
//   Shared tiles: per operand a K layout ([rows][32], A k-contiguous or B = W0ᵀ) or an O
//     layout ([32][rows], A m-contiguous or B n-contiguous = W0), XOR-swizzled per 16-byte
//     chunk; read by lf::ldmatrix_x4 (K) or lf::ldmatrix_x4_trans (O): every layout of
//     the step (x·W0ᵀ, gy·W0, the transposed-operand products) loads without
//     transposing stores and without bank conflicts.
//   Edges: every 16-byte chunk is a cp.async with src_bytes = 0..16 (zero fill past M, N,
//     K, K2 and outside B2's columns), so aligned operands (16-byte-aligned base, strides
//     multiples of 8 elements, for B2 in the O layout b2_n0 a multiple of 8) have no
//     element-wise path. Other operands take a correct fallback: element loads into
//     registers, bounds-checked, stored into the same swizzled layout. The choice is
//     `tc_mode` below, per operand at run time; its host twin is `TcLoad::of` in
//     src/ops/lora_matmul/cuda.rs (keep the two in step).
//   Epilogue: after the last wait and a barrier, the accumulators are staged in f32
//     through the pipeline's shared memory (tc128 in two 64-row slices of 33 KiB), then
//     each thread writes 8 consecutive outputs: alpha·acc + bias + C (accumulate) rounded
//     once to T, one 16-byte store where C (ldc a multiple of 8) and bias are aligned,
//     element-wise otherwise; rows ≥ M and columns ≥ N are not written.
//   No atomics; every output is one thread's fixed-order sum: deterministic.
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

// ---- Tensor cores: a 3-stage cp.async pipeline over XOR-swizzled shared tiles ----
//
// Every operand of the reduction is seen as X(o, p) = x[(o − o_lo)·os + p·ks] for the
// outer index o (A: the row i, B: the column j) in [o_lo, o_hi) and p < kext, zero
// elsewhere. A k-tile of X (ROWS outer × 32 k) is stored in one of two layouts, chosen
// per operand so that a 16-byte chunk of shared memory is 8 consecutive elements in
// global memory:
//   K layout  [ROWS][32]: row o, 4 chunks along k      (A k-contiguous, B = W0ᵀ)
//   O layout  [32][ROWS]: row p, ROWS/8 chunks along o (A m-contiguous, B n-contiguous = W0)
// Chunks are XOR-swizzled so that the 8 row addresses of one ldmatrix phase hit 8
// different 16-byte bank groups: K layout chunk c of row r at c ^ ((r >> 1) & 3) (two
// 64-byte rows per 128-byte bank line), O layout at c ^ (r & 7). Fragments come from
// ldmatrix_x4 (K layout) or ldmatrix_x4_trans (O layout); no layout needs transposing
// stores.
constexpr int kBK = 32;     // k-tile depth
constexpr int kStages = 3;  // cp.async pipeline depth
constexpr int kVec = 8;     // bf16/f16 values per 16 bytes
constexpr int kGroupM = 8;  // rasterization: tile-rows per group (L2 reuse of B's panel)
constexpr int kEpiPad = 4;  // f32 padding per staged row of C

// How the k-tiles of one operand come in: bit 0 = O layout (else K layout), bit 1 = the
// register-staged fallback (element loads, plain shared stores) instead of cp.async.
enum { kModeO = 1, kModeSlow = 2 };

// An operand as the loader sees it (built from the kernel parameters at each use, so the
// fields stay in the parameter bank instead of registers).
struct TcOperand {
    const void* ptr;
    long long os, ks;          // strides of o and p (elements)
    long long o_lo, o_hi;      // the outer range that holds values
    long long kext;            // the reduction extent
};

__device__ __forceinline__ int tc_mode(const void* ptr, long long os, long long ks,
                                       long long o_lo) {
    if (ks == 1 && os % kVec == 0 && lf::aligned16(ptr)) return 0;
    if (os == 1 && ks % kVec == 0 && o_lo % kVec == 0 && lf::aligned16(ptr)) return kModeO;
    return kModeSlow | ((os == 1 && ks != 1) ? kModeO : 0);
}

// The four operands: 0 = A (o = i), 1 = B (o = j), 2 = A2, 3 = B2 (values in the columns
// [b2_n0, b2_n1) only).
__device__ __forceinline__ TcOperand tc_operand(const LoraMatmulParams& p, int which) {
    switch (which) {
        case 0: return {p.a, p.a_rs, p.a_cs, 0, p.m, p.k};
        case 1: return {p.b, p.b_cs, p.b_rs, 0, p.n, p.k};
        case 2: return {p.a2, p.a2_rs, p.a2_cs, 0, p.m, p.k2};
        default: return {p.b2, p.b2_cs, p.b2_rs, p.b2_n0, p.b2_n1, p.k2};
    }
}

__device__ __forceinline__ int tc_mode(const LoraMatmulParams& p, int which) {
    const TcOperand x = tc_operand(p, which);
    return tc_mode(x.ptr, x.os, x.ks, x.o_lo);
}

// Element offsets of chunk c of row r in the two swizzled layouts.
__device__ __forceinline__ int swz_k(int r, int c) { return r * kBK + ((c ^ ((r >> 1) & 3)) * kVec); }
template <int ROWS>
__device__ __forceinline__ int swz_o(int r, int c) { return r * ROWS + ((c ^ (r & 7)) * kVec); }

__device__ __forceinline__ int clamp8(long long v) {
    return v <= 0 ? 0 : (v >= kVec ? kVec : (int)v);
}

// One k-tile (outer o0.., reduction p0..) of X into the shared tile s.
template <typename T, int ROWS, int THREADS>
__device__ __forceinline__ void tc_load_tile(const LoraMatmulParams& prm, int which, int mode,
                                             T* s, long long o0, long long p0) {
    const TcOperand x = tc_operand(prm, which);
    const int tid = threadIdx.x;
    const T* base = static_cast<const T*>(x.ptr);
    if (mode == 0) {
        constexpr int kCpr = kBK / kVec;
        static_assert(ROWS * kCpr % THREADS == 0, "whole chunks per thread");
        LF_UNROLL
        for (int it = 0; it < ROWS * kCpr / THREADS; ++it) {
            const int e = tid + it * THREADS, r = e / kCpr, c = e % kCpr;
            const long long o = o0 + r, p = p0 + c * kVec;
            const int n = (o >= x.o_lo && o < x.o_hi) ? clamp8(x.kext - p) : 0;
            const T* src = n > 0 ? base + (o - x.o_lo) * x.os + p : base;
            lf::cp_async16(s + swz_k(r, c), src, n * (int)sizeof(T));
        }
    } else if (mode == kModeO) {
        constexpr int kCpr = ROWS / kVec;
        static_assert(kBK * kCpr % THREADS == 0, "whole chunks per thread");
        LF_UNROLL
        for (int it = 0; it < kBK * kCpr / THREADS; ++it) {
            const int e = tid + it * THREADS, r = e / kCpr, c = e % kCpr;
            const long long o = o0 + c * kVec, p = p0 + r;
            const int n = (p < x.kext && o >= x.o_lo) ? clamp8(x.o_hi - o) : 0;
            const T* src = n > 0 ? base + (o - x.o_lo) + p * x.ks : base;
            lf::cp_async16(s + swz_o<ROWS>(r, c), src, n * (int)sizeof(T));
        }
    } else {
        // Fallback (an operand that is not 16-byte loadable: misaligned base, a stride that
        // is not a multiple of 8, neither stride 1): element loads into registers, bounds
        // checked, stored into the same swizzled layout; consecutive threads walk the
        // operand's contiguous dimension.
        const bool olay = mode & kModeO;
        for (int e = tid; e < ROWS * kBK; e += THREADS) {
            const int r = olay ? e % ROWS : e / kBK;  // outer
            const int kk = olay ? e / ROWS : e % kBK;  // reduction
            const long long o = o0 + r, p = p0 + kk;
            T v = lf::from_f32<T>(0.0f);
            if (o >= x.o_lo && o < x.o_hi && p < x.kext) v = base[(o - x.o_lo) * x.os + p * x.ks];
            if (olay)
                s[swz_o<ROWS>(kk, r / kVec) + r % kVec] = v;
            else
                s[swz_k(r, kk / kVec) + kk % kVec] = v;
        }
    }
}

template <int BM_, int BN_, int WARPS_M, int WARPS_N>
struct TcCfg {
    static constexpr int BM = BM_, BN = BN_;
    static constexpr int kThreads = WARPS_M * WARPS_N * 32;
    static constexpr int WN_COUNT = WARPS_N;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;             // mma tiles per warp
    static constexpr int kStageElems = (BM + BN) * kBK;
    static constexpr int kSmemBytes = kStages * kStageElems * 2;
    // The epilogue stages C in f32 through the pipeline's shared memory, in kPasses
    // slices of BM / kPasses rows when the whole tile does not fit.
    static constexpr int kLds = BN + kEpiPad;
    static constexpr int kPasses = BM * kLds * 4 <= kSmemBytes ? 1 : 2;
    static_assert(BM / kPasses * kLds * 4 <= kSmemBytes, "the staged C tile must fit");
    static_assert(MI % kPasses == 0 && NI % 2 == 0, "warp tile shape");
};
using TcLarge = TcCfg<128, 128, 2, 4>;  // 256 threads, 64×32 per warp, 48 KiB
using TcSmall = TcCfg<64, 64, 2, 2>;    // 128 threads, 32×32 per warp, 24 KiB
static_assert(TcLarge::kSmemBytes == 48 * 1024, "no opt-in above 48 KiB");

// The products of one k-tile (shared tiles sa, sb in layouts a_o, b_o) into acc.
template <typename T, class C>
__device__ __forceinline__ void tc_mma_tile(const T* sa, const T* sb, bool a_o, bool b_o,
                                            float (&acc)[C::MI][C::NI][4], int wm, int wn,
                                            int lane) {
    const int q = lane >> 3, r8 = lane & 7;
    LF_UNROLL
    for (int ks = 0; ks < kBK; ks += 16) {
        unsigned af[C::MI][4], bf[C::NI][2];
        LF_UNROLL
        for (int mi = 0; mi < C::MI; ++mi) {
            // matrices: (m +0, k +0), (m +8, k +0), (m +0, k +8), (m +8, k +8)
            if (!a_o)
                lf::ldmatrix_x4(af[mi], sa + swz_k(wm + mi * 16 + r8 + (q & 1) * 8,
                                                   ks / kVec + (q >> 1)));
            else
                lf::ldmatrix_x4_trans(af[mi], sa + swz_o<C::BM>(ks + (q >> 1) * 8 + r8,
                                                                (wm + mi * 16) / kVec + (q & 1)));
        }
        LF_UNROLL
        for (int np = 0; np < C::NI / 2; ++np) {
            // matrices: (n +0, k +0), (n +0, k +8), (n +8, k +0), (n +8, k +8)
            unsigned r[4];
            if (!b_o)
                lf::ldmatrix_x4(r, sb + swz_k(wn + np * 16 + r8 + (q >> 1) * 8,
                                              ks / kVec + (q & 1)));
            else
                lf::ldmatrix_x4_trans(r, sb + swz_o<C::BN>(ks + (q & 1) * 8 + r8,
                                                           (wn + np * 16) / kVec + (q >> 1)));
            bf[2 * np][0] = r[0];
            bf[2 * np][1] = r[1];
            bf[2 * np + 1][0] = r[2];
            bf[2 * np + 1][1] = r[3];
        }
        LF_UNROLL
        for (int mi = 0; mi < C::MI; ++mi)
            LF_UNROLL
            for (int ni = 0; ni < C::NI; ++ni)
                lf::mma_m16n8k16<T>(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    }
}

// Eight f32 values of one output row chunk: alpha·acc (+ bias) (+ C), rounded once.
template <typename T>
__device__ __forceinline__ void tc_store8(const LoraMatmulParams& p, long long i, long long j,
                                          const float* v, bool vec) {
    T* c = static_cast<T*>(p.c) + i * p.ldc + j;
    const T* bias = static_cast<const T*>(p.bias);
    if (vec && j + kVec <= p.n) {
        float x[kVec];
        LF_UNROLL
        for (int u = 0; u < kVec; ++u) x[u] = p.alpha * v[u];
        if (bias) {
            uint4 raw;
            lf::copy16(&raw, bias + j);
            const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
            LF_UNROLL
            for (int u = 0; u < 4; ++u) {
                x[2 * u] += lf::unpack_lo<T>(w[u]);
                x[2 * u + 1] += lf::unpack_hi<T>(w[u]);
            }
        }
        if (p.accumulate) {
            uint4 raw;
            lf::copy16(&raw, c);
            const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
            LF_UNROLL
            for (int u = 0; u < 4; ++u) {
                x[2 * u] += lf::unpack_lo<T>(w[u]);
                x[2 * u + 1] += lf::unpack_hi<T>(w[u]);
            }
        }
        uint4 out;
        out.x = lf::pack2(lf::from_f32<T>(x[0]), lf::from_f32<T>(x[1]));
        out.y = lf::pack2(lf::from_f32<T>(x[2]), lf::from_f32<T>(x[3]));
        out.z = lf::pack2(lf::from_f32<T>(x[4]), lf::from_f32<T>(x[5]));
        out.w = lf::pack2(lf::from_f32<T>(x[6]), lf::from_f32<T>(x[7]));
        lf::copy16(c, &out);
    } else {
        for (int u = 0; u < kVec && j + u < p.n; ++u) {
            float x = p.alpha * v[u];
            if (bias) x += lf::to_f32(bias[j + u]);
            if (p.accumulate) x += lf::to_f32(c[u]);
            c[u] = lf::from_f32<T>(x);
        }
    }
}

template <typename T, class C>
__device__ void gemm_tc(const LoraMatmulParams& p) {
    LF_DYNAMIC_SMEM(T, smem);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wr = warp / C::WN_COUNT, wc = warp % C::WN_COUNT;
    const int wm = wr * C::WM, wn = wc * C::WN;

    // Rasterization: groups of kGroupM tile-rows; inside a group the tile-row runs
    // fastest, so consecutive blocks share B's column panel (and A's rows) in L2.
    const long long tiles_m = (p.m + C::BM - 1) / C::BM, tiles_n = (p.n + C::BN - 1) / C::BN;
    const long long pid = blockIdx.x;
    const long long per_group = kGroupM * tiles_n;
    const long long first_m = (pid / per_group) * kGroupM;
    const long long group_rows =
        tiles_m - first_m < kGroupM ? tiles_m - first_m : (long long)kGroupM;
    const long long local = pid % per_group;
    const long long i0 = (first_m + local % group_rows) * C::BM;
    const long long j0 = (local / group_rows) * C::BN;

    // How each operand's k-tiles come in (kModeO / kModeSlow bits).
    const int mode_a = tc_mode(p, 0), mode_b = tc_mode(p, 1);
    const int mode_a2 = tc_mode(p, 2), mode_b2 = tc_mode(p, 3);
    // Base k-tiles, then extension k-tiles (none when this block's columns miss the
    // adapter's): ceil(K/32) + ceil(K2/32), each zero-filled past its extent.
    const int kt_base = (int)((p.k + kBK - 1) / kBK);
    const bool ext = p.k2 > 0 && p.b2_n0 < p.b2_n1 && j0 < p.b2_n1 && j0 + C::BN > p.b2_n0;
    const int kt_total = kt_base + (ext ? (int)((p.k2 + kBK - 1) / kBK) : 0);

    auto stage_a = [&](int s) { return smem + s * C::kStageElems; };
    auto stage_b = [&](int s) { return smem + s * C::kStageElems + C::BM * kBK; };
    auto load = [&](int kt, int s) {
        if (kt < kt_base) {
            tc_load_tile<T, C::BM, C::kThreads>(p, 0, mode_a, stage_a(s), i0, (long long)kt * kBK);
            tc_load_tile<T, C::BN, C::kThreads>(p, 1, mode_b, stage_b(s), j0, (long long)kt * kBK);
        } else {
            const long long p0 = (long long)(kt - kt_base) * kBK;
            tc_load_tile<T, C::BM, C::kThreads>(p, 2, mode_a2, stage_a(s), i0, p0);
            tc_load_tile<T, C::BN, C::kThreads>(p, 3, mode_b2, stage_b(s), j0, p0);
        }
    };

    float acc[C::MI][C::NI][4];
    LF_UNROLL
    for (int mi = 0; mi < C::MI; ++mi)
        LF_UNROLL
        for (int ni = 0; ni < C::NI; ++ni)
            LF_UNROLL
            for (int u = 0; u < 4; ++u) acc[mi][ni][u] = 0.0f;

    // Prologue: kStages − 1 k-tiles in flight (one commit group each, empty past the end).
    LF_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < kt_total) load(s, s);
        lf::cp_async_commit();
    }
    // Main loop, one barrier per k-tile: the wait makes this thread's copies of k-tile kt
    // land, the barrier makes everyone's visible and tells every warp that the stage read
    // in iteration kt − 1 is free, which the prefetch of kt + kStages − 1 then refills.
    for (int kt = 0; kt < kt_total; ++kt) {
        lf::cp_async_wait<kStages - 2>();
        __syncthreads();
        const int pre = kt + kStages - 1;
        if (pre < kt_total) load(pre, pre % kStages);
        lf::cp_async_commit();
        const int s = kt % kStages;
        const bool in_base = kt < kt_base;
        const bool a_o = ((in_base ? mode_a : mode_a2) & kModeO) != 0;
        const bool b_o = ((in_base ? mode_b : mode_b2) & kModeO) != 0;
        tc_mma_tile<T, C>(stage_a(s), stage_b(s), a_o, b_o, acc, wm, wn, lane);
    }

    // Epilogue: the pipeline's shared memory, once every warp is done with it, stages C
    // in f32; then each thread writes 8 consecutive outputs with one 16-byte store where
    // C (and bias) allow it, bias and accumulation fused, rounding once. No copy is in
    // flight: the groups committed after the last k-tile's are empty (the simulator fails
    // a thread that exits with a copy pending, and proves this barrier load-bearing).
    __syncthreads();
    float* st = reinterpret_cast<float*>(smem);
    const int g = lane >> 2, t = lane & 3;
    constexpr int kMiPass = C::MI / C::kPasses, kRowsWarp = C::WM / C::kPasses;
    constexpr int kRows = C::BM / C::kPasses;
    const bool vec = lf::aligned16(p.c) && p.ldc % kVec == 0 &&
                     (p.bias == nullptr || lf::aligned16(p.bias));
    LF_UNROLL
    for (int pass = 0; pass < C::kPasses; ++pass) {
        if (pass > 0) __syncthreads();  // the previous slice has been read
        LF_UNROLL
        for (int ml = 0; ml < kMiPass; ++ml)
            LF_UNROLL
            for (int ni = 0; ni < C::NI; ++ni)
                LF_UNROLL
                for (int h = 0; h < 2; ++h) {
                    const int sr = wr * kRowsWarp + ml * 16 + g + 8 * h;
                    const int sc = wn + ni * 8 + 2 * t;
                    st[sr * C::kLds + sc] = acc[pass * kMiPass + ml][ni][2 * h];
                    st[sr * C::kLds + sc + 1] = acc[pass * kMiPass + ml][ni][2 * h + 1];
                }
        __syncthreads();
        for (int e = tid; e < kRows * (C::BN / kVec); e += C::kThreads) {
            const int sr = e / (C::BN / kVec), c8 = (e % (C::BN / kVec)) * kVec;
            const int row = (sr / kRowsWarp) * C::WM + pass * kRowsWarp + sr % kRowsWarp;
            const long long i = i0 + row, j = j0 + c8;
            if (i >= p.m || j >= p.n) continue;
            tc_store8<T>(p, i, j, st + sr * C::kLds + c8, vec);
        }
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
extern "C" __global__ void __launch_bounds__(TcLarge::kThreads)
    lora_matmul_tc128_fwd_bf16(const LoraMatmulParams p) {
    gemm_tc<bf16, TcLarge>(p);
}
extern "C" __global__ void __launch_bounds__(TcLarge::kThreads)
    lora_matmul_tc128_fwd_f16(const LoraMatmulParams p) {
    gemm_tc<f16, TcLarge>(p);
}
extern "C" __global__ void __launch_bounds__(TcSmall::kThreads)
    lora_matmul_tc64_fwd_bf16(const LoraMatmulParams p) {
    gemm_tc<bf16, TcSmall>(p);
}
extern "C" __global__ void __launch_bounds__(TcSmall::kThreads)
    lora_matmul_tc64_fwd_f16(const LoraMatmulParams p) {
    gemm_tc<f16, TcSmall>(p);
}
