// lora_reduce.cu — split-K token reductions of the LoRA backward: a product with a long
// reduction over the M tokens and a small output (gA, gB), as per-chunk f32 partials and a
// fixed-order second pass (DESIGN §2).
//
// Math (L, R addressed through strides; "big" ≤ 2^31 rows, "small" ≤ 64 columns):
//   P[c, i, j] = Σ_{t in chunk c} L[t, i]·R[t, j]      c < chunks, i < big, j < small
//   C[i, j]    = alpha·Σ_{c = 0, 1, .., chunks−1} P[c, i, j]   (+ C[i, j] with accumulate)
//   the chunk sum in index order, then one fma with alpha (and the old C), rounded once.
// The LoRA linear (gy [M, N], x [M, K], su = s·x·Aᵀ and sv = s·gy·B [M, r] saved/computed):
//   gA [r, K] = svᵀ·x           L = x (big = K),              R = sv (small = r), C = Pᵀ
//   gB [n, r] = gy[:, cols]ᵀ·su L = gy[:, cols] (big = n),    R = su (small = r), C = P
//   The output is written through strides (c_rs, c_cs), so gA's transpose costs nothing.
//   The skinny su/sv [M, r] reduce over K/N, not over tokens; they stay with the generic
//   GEMM (lora_matmul.cu): its 64-row tiles already give M/64 = 128 blocks at M = 8192 and
//   they cost 2·M·K·s bytes like any layout (see the Rust module's documentation).
//
// Dtypes: storage f32, bf16 or f16 (suffix), the same for L, R and C; partials and sums in
// f32; C rounded once (nearest even). Kernels:
//   lora_reduce_bwd_<T>      the partials P (out =), workspace [chunks, big, small] f32.
//                            bf16/f16: tensor cores (lf::ldmatrix_x4_trans + lf::mma_m16n8k16);
//                            f32: SIMT fmaf, each partial in token order (the CPU twin of
//                            src/ops/lora_reduce/cpu.rs is bit-identical to it).
//   lora_reduce_sum_bwd_<T>  C (out =), or (out +=) with accumulate: the chunk sums.
//
// FLOPs per call: 2·M·big·small; the second pass chunks·big·small adds.
// bytes per call (s bytes per element): s·M·(big + small) read once from DRAM (the floor:
//   L is read exactly once, block (c, tile) reads its own slab; R, M·small·s, is re-read by
//   every tile from L2), plus the workspace 4·chunks·big·small written and read back
//   (L2-resident: 2.1 MB for GPT-2's gA, 4.7 MB gB, 8.4 MB at the headline), plus
//   s·big·small written.
//   GPT-2 124M c_attn (M = 8192, K = 768, N = 2304, r = 16, bf16):
//     gA: 0.20 GFLOP, 12.6 MB of x (+0.26 MB sv) → floor 3.0–4.3 µs at 4.3–3.0 TB/s;
//     gB: 0.60 GFLOP, 37.7 MB of gy (+0.26 MB su) → floor 8.9–12.7 µs.
//   Headline (M = 8192, K = N = 4096, r = 16, bf16): gA and gB each 1.07 GFLOP and 67 MB
//     (x or gy) → floor 15.7–22.5 µs (the FLOPs take ≤ 2 µs even at mma.sync rates).
//   Expected: 60–75 % of the copy-bandwidth floor (GPT-2: gA ~6 µs, gB ~15 µs; headline
//   ~26 µs each, second pass included) against ~200 µs for each on the 64×64-tile GEMM,
//   which runs 12–64 blocks through 256 dependent, unpipelined k-tiles. Why not 100 %: a
//   block lives for only 2–8 k-tiles, so its pipeline prologue (one DRAM latency) is
//   exposed once per block (hidden only by the 4 co-resident blocks), the workspace
//   round trip adds 10–30 % L2 traffic, and the second pass is a launch of its own
//   (~2 µs). Loads per byte: every L element arrives by one 16-byte cp.async (8 values)
//   and is read from shared memory once per k16 step by one ldmatrix.x4.trans; a 64-row
//   tile of gy is 128 contiguous bytes per token. Not measured on a GPU.
//
// Launch geometry (partials): grid (chunks, ceil(big/64)), 128 threads. Chunk heuristic
//   (src/ops/lora_reduce/mod.rs, `plan`): chunk = clamp(round_up(ceil(M·tiles/528), 64),
//   64, 256) tokens, chunks = ceil(M/chunk), so tiles·chunks comes to ~528 = 4 blocks per
//   SM on 132 SMs or more where M allows (GPT-2 gA: 12 tiles × 43 chunks of 192 = 516
//   blocks; gB: 36 × 32 of 256 = 1152; headline: 64 × 32 = 2048). A block computes its
//   64×small tile over its chunk in k-tiles of 32 tokens: tensor cores: 4 warps, 16 rows
//   each, small rounded up to 16 columns (mma n8 pairs), a 3-stage cp.async pipeline (one
//   barrier per k-tile) into padded shared tiles [32 tokens][72] (row stride 144 B: the 8
//   rows of an ldmatrix hit distinct banks); SIMT f32: 8×4 outputs per thread (rows
//   ty + 8u, columns tx + 16w), 2 stages. ptxas: 128 registers (tensor cores; 4 blocks
//   of 128 threads per SM), 27.6 KB static shared; SIMT 122/101 (sm_80/sm_90), 36.9 KB;
//   second pass 32. Operands whose contiguous dimension is not a multiple of 8 (4 for
//   f32) or whose base is not 16-byte aligned go through an element-wise path into the
//   same tiles.
//   Second pass: 256 threads, one output element per thread (grid-stride), workspace read
//   along its contiguous dimension, chunks added in index order. No atomics: deterministic.
#include "common.cuh"

// Rust twin: `LoraReduceParams` in src/ops/lora_reduce/cuda.rs (a test checks the size).
struct LoraReduceParams {
    const void* l;     // L(t, i) = l[t·l_rs + i·l_cs]
    const void* r;     // R(t, j) = r[t·r_rs + j·r_cs]
    void* c;           // C(i, j) = c[i·c_rs + j·c_cs]
    float* ws;         // P(c, i, j) = ws[(c·big + i)·small + j]
    long long tokens, big, small;
    long long l_rs, l_cs, r_rs, r_cs;
    long long c_rs, c_cs;
    long long chunk, chunks;
    float alpha;
    int accumulate;    // 1: C += result (C read in f32 first)
};

namespace {

constexpr int kThreads = 128;
constexpr int kBig = 64;     // rows of a block's tile (the big dimension)
constexpr int kSmall = 64;   // the most columns (the small dimension)
constexpr int kKt = 32;      // tokens per k-tile
constexpr int kPad = 8;      // row padding (elements) of the shared tiles

// One k-tile of L (kKt × kBig) or R (kKt × kSmall) into shared memory `dst[kKt][ld]`,
// rows t0.., columns j0..j0+width; zero outside [0, tokens) × [0, limit). `vec`: one
// 16-byte cp.async per kV elements (contiguous columns, aligned rows), else element-wise.
template <typename T, int Width, int Ld>
__device__ __forceinline__ void load_tile(T (*dst)[Ld], const T* src, long long rs, long long cs,
                                          long long t0, long long t_end, long long j0,
                                          long long limit, int width, bool vec) {
    constexpr int kV = 16 / (int)sizeof(T);
    const int tid = threadIdx.x;
    if (vec) {
        constexpr int per_row = Width / kV;
        for (int e = tid; e < kKt * per_row; e += kThreads) {
            const int tt = e / per_row, jj = (e % per_row) * kV;
            if (jj >= width) continue;  // columns past `width` are never read
            const long long t = t0 + tt, j = j0 + jj;
            long long left = limit - j;
            left = left < 0 ? 0 : (left > kV ? kV : left);
            const bool in = t < t_end && left > 0;
            const T* s = in ? src + t * rs + j : src;  // a valid, aligned address either way
            lf::cp_async16(&dst[tt][jj], s, in ? (int)(left * (long long)sizeof(T)) : 0);
        }
    } else {
        const bool j_fast = cs == 1;
        for (int e = tid; e < kKt * Width; e += kThreads) {
            const int tt = j_fast ? e / Width : e % kKt;
            const int jj = j_fast ? e % Width : e / kKt;
            if (jj >= width) continue;
            const long long t = t0 + tt, j = j0 + jj;
            dst[tt][jj] = (t < t_end && j < limit) ? src[t * rs + j * cs] : lf::from_f32<T>(0.0f);
        }
    }
}

// Whether an operand takes the 16-byte path: unit column stride, rows a multiple of 16
// bytes apart, a 16-byte-aligned base.
template <typename T>
__device__ __forceinline__ bool vec_ok(const void* p, long long rs, long long cs) {
    constexpr long long kV = 16 / (long long)sizeof(T);
    return cs == 1 && rs % kV == 0 && lf::aligned16(p);
}

// ---- Tensor cores: 4 warps × 16 rows, up to 64 columns (8 n8 tiles), 3 stages ----
constexpr int kTcStages = 3;

template <typename T>
__device__ void partials_tc(const LoraReduceParams& p) {
    __shared__ __align__(16) T ls[kTcStages][kKt][kBig + kPad];    // ls[s][t][i]
    __shared__ __align__(16) T rsm[kTcStages][kKt][kSmall + kPad]; // rsm[s][t][j]
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, tq = lane & 3, q = lane / 8, row8 = lane % 8;
    const long long chunk = blockIdx.x, i0 = (long long)blockIdx.y * kBig;
    const long long t0 = chunk * p.chunk;
    const long long t_end = t0 + p.chunk < p.tokens ? t0 + p.chunk : p.tokens;
    const int nk = (int)((t_end - t0 + kKt - 1) / kKt);
    const int npairs = (int)((p.small + 15) / 16);  // active 16-column groups (uniform)
    const int width = npairs * 16;
    const T* l = static_cast<const T*>(p.l);
    const T* r = static_cast<const T*>(p.r);
    const bool l_vec = vec_ok<T>(p.l, p.l_rs, p.l_cs);
    const bool r_vec = vec_ok<T>(p.r, p.r_rs, p.r_cs);
    auto load = [&](int kt) {
        const int s = kt % kTcStages;
        const long long tk = t0 + (long long)kt * kKt;
        load_tile<T, kBig, kBig + kPad>(ls[s], l, p.l_rs, p.l_cs, tk, t_end, i0, p.big, kBig,
                                        l_vec);
        load_tile<T, kSmall, kSmall + kPad>(rsm[s], r, p.r_rs, p.r_cs, tk, t_end, 0, p.small,
                                            width, r_vec);
    };
    float acc[8][4];
    LF_UNROLL
    for (int ni = 0; ni < 8; ++ni)
        LF_UNROLL
        for (int v = 0; v < 4; ++v) acc[ni][v] = 0.0f;
    LF_UNROLL
    for (int s = 0; s < kTcStages - 1; ++s) {
        if (s < nk) load(s);
        lf::cp_async_commit();
    }
    const int wm = warp * 16;
    for (int kt = 0; kt < nk; ++kt) {
        lf::cp_async_wait<kTcStages - 2>();  // this thread's copies of k-tile kt landed
        __syncthreads();  // everyone's landed; everyone is done with the stage reloaded below
        if (kt + kTcStages - 1 < nk) load(kt + kTcStages - 1);
        lf::cp_async_commit();
        const int s = kt % kTcStages;
        LF_UNROLL
        for (int ks = 0; ks < kKt; ks += 16) {
            // A = Lᵀ (16 rows i × 16 tokens): matrices (i +0, t +0), (+8, +0), (+0, +8),
            // (+8, +8), stored token-major, so .trans yields the row-major fragment.
            unsigned af[4];
            lf::ldmatrix_x4_trans(af, &ls[s][ks + (q >> 1) * 8 + row8][wm + (q & 1) * 8]);
            LF_UNROLL
            for (int np = 0; np < 4; ++np) {
                if (np < npairs) {
                    // B = R (16 tokens × 16 columns): (t +0, j +0), (+8, +0), (+0, +8), (+8, +8).
                    unsigned bf[4];
                    lf::ldmatrix_x4_trans(bf, &rsm[s][ks + (q & 1) * 8 + row8][np * 16 + (q >> 1) * 8]);
                    const unsigned b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    lf::mma_m16n8k16<T>(acc[2 * np], af, b0, acc[2 * np]);
                    lf::mma_m16n8k16<T>(acc[2 * np + 1], af, b1, acc[2 * np + 1]);
                }
            }
        }
    }
    // No copy is in flight here: the groups committed after the last k-tile's are empty.
    float* ws = p.ws + ((lf::u64)chunk * (lf::u64)p.big) * (lf::u64)p.small;
    LF_UNROLL
    for (int ni = 0; ni < 8; ++ni) {
        if (ni < 2 * npairs) {
            LF_UNROLL
            for (int v = 0; v < 4; ++v) {
                const long long i = i0 + wm + g + (v >= 2 ? 8 : 0);
                const long long j = ni * 8 + 2 * tq + (v & 1);
                if (i < p.big && j < p.small) ws[i * p.small + j] = acc[ni][v];
            }
        }
    }
}

// ---- SIMT (f32): 8×4 outputs per thread, 2 stages ----
constexpr int kSimtStages = 2;

template <typename T>
__device__ void partials_simt(const LoraReduceParams& p) {
    __shared__ __align__(16) T ls[kSimtStages][kKt][kBig + kPad];
    __shared__ __align__(16) T rsm[kSimtStages][kKt][kSmall + kPad];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const long long chunk = blockIdx.x, i0 = (long long)blockIdx.y * kBig;
    const long long t0 = chunk * p.chunk;
    const long long t_end = t0 + p.chunk < p.tokens ? t0 + p.chunk : p.tokens;
    const int nk = (int)((t_end - t0 + kKt - 1) / kKt);
    const int ngroups = (int)((p.small + 15) / 16);
    const int width = ngroups * 16;
    const T* l = static_cast<const T*>(p.l);
    const T* r = static_cast<const T*>(p.r);
    const bool l_vec = vec_ok<T>(p.l, p.l_rs, p.l_cs);
    const bool r_vec = vec_ok<T>(p.r, p.r_rs, p.r_cs);
    auto load = [&](int kt) {
        const int s = kt % kSimtStages;
        const long long tk = t0 + (long long)kt * kKt;
        load_tile<T, kBig, kBig + kPad>(ls[s], l, p.l_rs, p.l_cs, tk, t_end, i0, p.big, kBig,
                                        l_vec);
        load_tile<T, kSmall, kSmall + kPad>(rsm[s], r, p.r_rs, p.r_cs, tk, t_end, 0, p.small,
                                            width, r_vec);
    };
    float acc[8][4];
    LF_UNROLL
    for (int u = 0; u < 8; ++u)
        LF_UNROLL
        for (int w = 0; w < 4; ++w) acc[u][w] = 0.0f;
    if (nk > 0) load(0);
    lf::cp_async_commit();
    for (int kt = 0; kt < nk; ++kt) {
        lf::cp_async_wait<0>();
        __syncthreads();  // k-tile kt landed for all; stage (kt + 1) % 2 is free again
        if (kt + 1 < nk) load(kt + 1);
        lf::cp_async_commit();
        const int s = kt % kSimtStages;
        for (int kk = 0; kk < kKt; ++kk) {  // tokens in order: each partial is a token-order fma chain
            float lv[8], rv[4];
            LF_UNROLL
            for (int u = 0; u < 8; ++u) lv[u] = lf::to_f32(ls[s][kk][ty + 8 * u]);
            LF_UNROLL
            for (int w = 0; w < 4; ++w) rv[w] = lf::to_f32(rsm[s][kk][tx + 16 * w]);
            LF_UNROLL
            for (int u = 0; u < 8; ++u)
                LF_UNROLL
                for (int w = 0; w < 4; ++w)
                    if (w < ngroups) acc[u][w] = fmaf(lv[u], rv[w], acc[u][w]);
        }
    }
    // No copy is in flight here: the last group committed is empty.
    float* ws = p.ws + ((lf::u64)chunk * (lf::u64)p.big) * (lf::u64)p.small;
    LF_UNROLL
    for (int u = 0; u < 8; ++u)
        LF_UNROLL
        for (int w = 0; w < 4; ++w) {
            const long long i = i0 + ty + 8 * u, j = tx + 16 * w;
            if (i < p.big && j < p.small) ws[i * p.small + j] = acc[u][w];
        }
}

// ---- The second pass: chunk sums in index order ----
constexpr int kSumThreads = 256;

template <typename T>
__device__ void chunk_sums(const LoraReduceParams& p) {
    const lf::u64 n = (lf::u64)p.big * (lf::u64)p.small;
    const lf::u64 plane = n;
    T* c = static_cast<T*>(p.c);
    for (lf::u64 e = lf::global_thread(); e < n; e += lf::grid_stride()) {
        const float* w = p.ws + e;
        float s = 0.0f;
        long long k = 0;
        // Four loads in flight, added strictly in chunk order.
        for (; k + 4 <= p.chunks; k += 4) {
            const float v0 = w[(lf::u64)k * plane], v1 = w[(lf::u64)(k + 1) * plane];
            const float v2 = w[(lf::u64)(k + 2) * plane], v3 = w[(lf::u64)(k + 3) * plane];
            s += v0;
            s += v1;
            s += v2;
            s += v3;
        }
        for (; k < p.chunks; ++k) s += w[(lf::u64)k * plane];
        const long long i = (long long)(e / (lf::u64)p.small), j = (long long)(e % (lf::u64)p.small);
        T* out = c + i * p.c_rs + j * p.c_cs;
        // One fma with the old value, or one product: the CPU twin does the same.
        const float v = p.accumulate ? fmaf(p.alpha, s, lf::to_f32(*out)) : p.alpha * s;
        *out = lf::from_f32<T>(v);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads) lora_reduce_bwd_f32(const LoraReduceParams p) {
    partials_simt<float>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads) lora_reduce_bwd_bf16(const LoraReduceParams p) {
    partials_tc<bf16>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads) lora_reduce_bwd_f16(const LoraReduceParams p) {
    partials_tc<f16>(p);
}
extern "C" __global__ void __launch_bounds__(kSumThreads)
    lora_reduce_sum_bwd_f32(const LoraReduceParams p) {
    chunk_sums<float>(p);
}
extern "C" __global__ void __launch_bounds__(kSumThreads)
    lora_reduce_sum_bwd_bf16(const LoraReduceParams p) {
    chunk_sums<bf16>(p);
}
extern "C" __global__ void __launch_bounds__(kSumThreads)
    lora_reduce_sum_bwd_f16(const LoraReduceParams p) {
    chunk_sums<f16>(p);
}
