// layer_norm.cu — LayerNorm over the last dimension: the forward (saving the row
// statistics) and the backward (input gradient and the gamma/beta gradients).
//
// Math (the CPU reference is src/ops/layer_norm/cpu.rs; rows r < R, channels j < C):
//   forward:   mean[r] = (Σ_j x[r, j]) / C
//              var[r]  = (Σ_j (x[r, j] − mean[r])²) / C            (biased, two passes)
//              rstd[r] = 1 / √(var[r] + eps)
//              y[r, j] = (x[r, j] − mean[r])·rstd[r]·gamma[j] + beta[j]      (y =)
//              mean, rstd saved in f32 for the backward                  (out =)
//   backward (llm.c's layernorm_backward), with n = (x − mean)·rstd, d = gamma·gy:
//              gx[r, j]   = (d − mean_C(d) − n·mean_C(d·n))·rstd[r]          (gx =)
//              ggamma[j]  = Σ_r gy[r, j]·n[r, j]                          (ggamma =)
//              gbeta[j]   = Σ_r gy[r, j]                                  (gbeta =)
//   The row sums of the forward and of gx are warp reductions (each lane sums its
//   channels j ≡ lane mod 32 in order, then a fixed xor-shuffle tree), so they differ
//   from the CPU's serial sums by f32 rounding (tests: rel-L2 tolerances). ggamma and
//   gbeta are summed in the reference's order (`cpu::backward_params`): the rows in chunks
//   of 32 (kChunkRows), each chunk in row order; chunk k's sum added, in chunk order, into
//   lane k mod 32; the 32 lanes combined by the xor tree of distances 16, 8, 4, 2, 1 — all
//   with __fadd_rn / __fmul_rn (no FMA). layer_norm_bwd writes the chunk sums (partials =),
//   layer_norm_params_bwd combines them (ggamma =, gbeta =): gbeta equals the CPU reference
//   bit for bit, and ggamma would for identical mean/rstd. No atomics: every result is
//   deterministic and independent of the grid.
//
// Shapes: x, y, gy, gx [R, C] row-major (R = the product of the leading dims); gamma, beta,
// ggamma, gbeta [C]; mean, rstd [R] f32; partials [2, K, C] f32 (scratch).
//
// Dtypes: x, gamma, beta, y, gy and the gradients all f32, bf16 or f16 (the suffix); mean
// and rstd f32; compute and accumulate in f32; each output rounded once (nearest even).
//
// FLOPs and bytes per call (s bytes per element) at GPT-2 124M's shape, bf16, R = 8·1024,
// C = 768 (floors at the measured copy bandwidth, ~3.0 TB/s H100 / ~4.3 TB/s H200):
//   forward ~8·R·C FLOPs; reads x once (the row stays in registers) and γ, β (1.5 KB each,
//   L1/L2), writes y, mean, rstd: 2·s·R·C + 8·R = 25.2 MB → 8.4 µs H100 / 5.9 µs H200.
//   Predicted ≥ 85 % of that (~9.9 µs / ~6.9 µs; the scalar kernel before: ~50–65 %):
//   16-byte loads (a warp reads 512 contiguous bytes per instruction), 64 registers →
//   4 blocks = 32 warps per SM, each warp with its whole row (1.5 KB) in flight: ~48 KB of
//   loads in flight per SM against the ~25 KB Little's law asks (3.35 TB/s × ~1 µs / 132
//   SMs); the statistics are two 5-step xor-shuffle trees per row, no barrier, no
//   shared memory; 1024 blocks ≈ 1.9 waves of 528 (the second nearly full).
//   backward ~20·R·C FLOPs; reads x, gy once and writes gx: 3·s·R·C = 37.7 MB → 12.6 µs
//   H100 / 8.8 µs H200 (the floor), with or without the parameter sums:
//   - gx only (LoRA: γ, β frozen), one warp per row in registers: predicted ≥ 85 % (104–128
//     registers, the fused path sharing the kernel → 2 blocks = 16 warps per SM, 3 KB per
//     warp in flight: ~48 KB per SM).
//   - gx and the parameter sums, rows in registers (full fine-tuning at GPT-2's shapes):
//     one pass, backward_fused. A block per 32-row chunk (K = 256 blocks ≈ one wave of 2 per
//     SM) loads each row once, stages gy·n and gy in shared memory (2 × 8 × C f32 =
//     48 KiB at C = 768) and sums them per channel in row order; + 2·2·4·K·C = 3.1 MB of
//     chunk sums written and read back (L2). Predicted ~75–80 % of the floor (~16 µs H100):
//     the two barriers per 8 rows stall a block between its loads and its sums, and the
//     other block of the SM covers the gap only in part. The design before 2026-12-04 read x
//     and gy a second time in separate chunk-sum blocks (256-row chunks): ~50–60 %.
//   - otherwise (scalar rows, or only the parameter sums): the gx blocks as above beside
//     chunk-sum blocks that read x and gy again, one thread per channel per chunk
//     (K·⌈C/256⌉ units of 32 dependent additions; kBatch = 8 rows of loads in flight).
//   layer_norm_params_bwd: one warp per channel reads its K chunk sums (lane l: chunks l,
//   l + 32, …; 8 loads at K = 256) and combines the lanes: C warps, ~1–2 µs.
//   Not measured on a GPU.
//
// Launch geometry: 256-thread blocks of 8 warps.
//   layer_norm_fwd: one warp per row, grid-stride over rows (grid = min(ceil(R/8), the
//     launcher's cap)). The row in registers when C is a multiple of W = 16/s (4 f32,
//     8 bf16/f16), C ≤ 1024 and x, y, γ, β are 16-byte aligned (then every row is): lane l
//     holds the vectors l, l + 32, … (≤ 32 f32 values per lane); otherwise the scalar
//     path (lanes stride over the channels, three passes over the row from L1/L2).
//   layer_norm_bwd: fused (the parameter `fused`: gx and the sums wanted, the row in
//     registers): grid = min(K, the cap) blocks, each taking chunks k (grid-stride) 8 rows at
//     a time, dynamic shared memory 2 × 8 × C f32 (the opt-in above 48 KiB, C ≤ 1024).
//     Otherwise grid = chan_blocks + row_blocks. The first chan_blocks blocks take the
//     (chunk, 256-channel group) units k·G + g in a grid-stride loop (G = ⌈C/256⌉), one
//     thread per channel summing the chunk's ≤ 32 rows in order (coalesced across the
//     warp); the others compute gx, one warp per row as the forward (register or scalar
//     path, the same test), skipped when gx is not wanted (row_blocks = 0).
//   layer_norm_params_bwd: one warp per channel (grid-stride, ⌈C/8⌉ blocks up to the cap)
//     combines the K chunk sums (lanes, then the xor tree) and rounds once.
#include "common.cuh"

// Rust twin: `LayerNormParams` in src/ops/layer_norm/cuda.rs (a test checks the size).
struct LayerNormParams {
    const void* x;      // x [R, C]
    const void* gamma;  // gamma [C]
    const void* beta;   // beta [C] (forward)
    void* y;            // y [R, C] (forward)
    float* mean;        // mean [R] (written by the forward, read by the backward)
    float* rstd;        // rstd [R]
    const void* gy;     // gy [R, C] (backward)
    void* gx;           // gx [R, C] (backward; null when row_blocks = 0)
    void* ggamma;       // ggamma [C] (backward)
    void* gbeta;        // gbeta [C] (backward)
    long long rows, c;
    long long row_blocks;  // backward: blocks computing gx (the rest the chunk sums)
    float* partials;       // backward: [2, chunks, C] f32 chunk sums of ggamma, then gbeta
    long long chunks;      // backward: K = ⌈rows / kChunkRows⌉
    float eps;
    int fused;             // backward: 1 = every block runs backward_fused (gx and chunk sums)
};

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows per chunk of the parameter sums: fixed (the CPU reference sums in the same chunks),
// so the result does not depend on the grid. Rust twin: `cpu::ROW_CHUNK`.
constexpr long long kChunkRows = 32;

// The sum over the warp: every lane ends with the same value (a + b = b + a exactly).
__device__ __forceinline__ float warp_sum(float v) {
LF_UNROLL
    for (int k = 16; k > 0; k >>= 1) v += __shfl_xor_sync(0xffffffffu, v, k);
    return v;
}

// Whether a row of C values of T can be held in registers as 16-byte vectors: C a
// multiple of W = lf::vec16<T>::n (so every row starts 16-byte aligned when the base does)
// and at most 32 lanes × kRegValues values.
constexpr int kRegValues = 32;  // f32 values per lane for a row (C ≤ 1024)
template <typename T>
__device__ __forceinline__ bool row_in_registers(long long c, const void* a, const void* b,
                                                 const void* d, const void* e) {
    return c % lf::vec16<T>::n == 0 && c <= 32 * kRegValues && lf::aligned16(a) &&
           lf::aligned16(b) && lf::aligned16(d) && lf::aligned16(e);
}

// The forward, row in registers: lane l holds the vectors l, l + 32, … of the row (a warp
// reads 512 contiguous bytes per load instruction), sums, then the squared deviations from
// the registers, then y; gamma and beta are read per row (from L1/L2).
template <typename T>
__device__ void forward_vec(const LayerNormParams& p) {
    constexpr int W = lf::vec16<T>::n, NV = kRegValues / W;
    const int lane = threadIdx.x & 31;
    const long long warp = threadIdx.x >> 5;
    const T* gamma = static_cast<const T*>(p.gamma);
    const T* beta = static_cast<const T*>(p.beta);
    const int nvec = (int)(p.c / W);
    const float n = (float)p.c;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < p.rows;
         row += (long long)gridDim.x * kWarps) {
        const T* x = static_cast<const T*>(p.x) + row * p.c;
        T* y = static_cast<T*>(p.y) + row * p.c;
        float v[NV][W];
        float s = 0.0f;
LF_UNROLL
        for (int i = 0; i < NV; ++i) {
            const int q = lane + 32 * i;
            if (q < nvec) lf::load16(x + q * W, v[i]);
        }
LF_UNROLL
        for (int i = 0; i < NV; ++i) {
            if (lane + 32 * i < nvec) {
LF_UNROLL
                for (int e = 0; e < W; ++e) s += v[i][e];
            }
        }
        const float m = warp_sum(s) / n;
        float ss = 0.0f;
LF_UNROLL
        for (int i = 0; i < NV; ++i) {
            if (lane + 32 * i < nvec) {
LF_UNROLL
                for (int e = 0; e < W; ++e) {
                    const float d = v[i][e] - m;
                    ss += d * d;
                }
            }
        }
        const float r = 1.0f / sqrtf(warp_sum(ss) / n + p.eps);
LF_UNROLL
        for (int i = 0; i < NV; ++i) {
            const int q = lane + 32 * i;
            if (q < nvec) {
                float g[W], b[W];
                lf::load16(gamma + q * W, g);
                lf::load16(beta + q * W, b);
LF_UNROLL
                for (int e = 0; e < W; ++e) v[i][e] = (v[i][e] - m) * r * g[e] + b[e];
                lf::store16(y + q * W, v[i]);
            }
        }
        if (lane == 0) {
            p.mean[row] = m;
            p.rstd[row] = r;
        }
    }
}

// The scalar forward (any C, any alignment): three passes over the row from global memory
// (the second and third from L1/L2), lanes striding over the channels.
template <typename T>
__device__ void forward_scalar(const LayerNormParams& p) {
    const int lane = threadIdx.x & 31;
    const long long warp = threadIdx.x >> 5;
    const T* gamma = static_cast<const T*>(p.gamma);
    const T* beta = static_cast<const T*>(p.beta);
    const float n = (float)p.c;
    for (long long row = (long long)blockIdx.x * kWarps + warp; row < p.rows;
         row += (long long)gridDim.x * kWarps) {
        const T* x = static_cast<const T*>(p.x) + row * p.c;
        T* y = static_cast<T*>(p.y) + row * p.c;
        float s = 0.0f;
        for (long long j = lane; j < p.c; j += 32) s += lf::to_f32(x[j]);
        const float m = warp_sum(s) / n;
        float v = 0.0f;
        for (long long j = lane; j < p.c; j += 32) {
            const float d = lf::to_f32(x[j]) - m;
            v += d * d;
        }
        const float r = 1.0f / sqrtf(warp_sum(v) / n + p.eps);
        for (long long j = lane; j < p.c; j += 32) {
            const float o = (lf::to_f32(x[j]) - m) * r * lf::to_f32(gamma[j]) + lf::to_f32(beta[j]);
            y[j] = lf::from_f32<T>(o);
        }
        if (lane == 0) {
            p.mean[row] = m;
            p.rstd[row] = r;
        }
    }
}

template <typename T>
__device__ void forward(const LayerNormParams& p) {
    if (row_in_registers<T>(p.c, p.x, p.y, p.gamma, p.beta)) {
        forward_vec<T>(p);
    } else {
        forward_scalar<T>(p);
    }
}

// gx of one row in registers (as forward_vec; one warp): x and d = gamma·gy held per lane,
// the two row sums, then gx. With Stage, also the reference's products gy·n and gy of the
// row (f32, __fmul_rn / __fsub_rn as cpu::backward_params) into the staging rows sgn, sg.
template <typename T, bool Stage>
__device__ __forceinline__ void row_gx_vec(const LayerNormParams& p, long long row, float* sgn, float* sg) {
    constexpr int W = lf::vec16<T>::n, NV = kRegValues / W;
    static_assert(W % 4 == 0, "16-byte staging stores");
    const int lane = threadIdx.x & 31;
    const T* gamma = static_cast<const T*>(p.gamma);
    const int nvec = (int)(p.c / W);
    const float n = (float)p.c;
    const T* x = static_cast<const T*>(p.x) + row * p.c;
    const T* gy = static_cast<const T*>(p.gy) + row * p.c;
    T* gx = static_cast<T*>(p.gx) + row * p.c;
    const float m = p.mean[row], r = p.rstd[row];
    float xv[NV][W], dv[NV][W];
LF_UNROLL
    for (int i = 0; i < NV; ++i) {
        const int q = lane + 32 * i;
        if (q < nvec) {
            lf::load16(x + q * W, xv[i]);
            lf::load16(gy + q * W, dv[i]);
        }
    }
    float sd = 0.0f, sdn = 0.0f;
LF_UNROLL
    for (int i = 0; i < NV; ++i) {
        const int q = lane + 32 * i;
        if (q < nvec) {
            float g[W];
            lf::load16(gamma + q * W, g);
            if constexpr (Stage) {
LF_UNROLL
                for (int e = 0; e < W; e += 4) {
                    float pn[4];
LF_UNROLL
                    for (int f = 0; f < 4; ++f)
                        pn[f] = __fmul_rn(dv[i][e + f], __fmul_rn(__fsub_rn(xv[i][e + f], m), r));
                    *reinterpret_cast<float4*>(sgn + q * W + e) = make_float4(pn[0], pn[1], pn[2], pn[3]);
                    *reinterpret_cast<float4*>(sg + q * W + e) =
                        make_float4(dv[i][e], dv[i][e + 1], dv[i][e + 2], dv[i][e + 3]);
                }
            }
LF_UNROLL
            for (int e = 0; e < W; ++e) {
                const float d = g[e] * dv[i][e];
                dv[i][e] = d;
                sd += d;
                sdn += d * ((xv[i][e] - m) * r);
            }
        }
    }
    const float mean_d = warp_sum(sd) / n, mean_dn = warp_sum(sdn) / n;
LF_UNROLL
    for (int i = 0; i < NV; ++i) {
        const int q = lane + 32 * i;
        if (q < nvec) {
LF_UNROLL
            for (int e = 0; e < W; ++e) xv[i][e] = (dv[i][e] - mean_d - (xv[i][e] - m) * r * mean_dn) * r;
            lf::store16(gx + q * W, xv[i]);
        }
    }
}

// gx, row in registers: one warp per row, `block` counts the blocks of this role, `nblocks`.
template <typename T>
__device__ void backward_x_vec(const LayerNormParams& p, long long block, long long nblocks) {
    const long long warp = threadIdx.x >> 5;
    for (long long row = block * kWarps + warp; row < p.rows; row += nblocks * kWarps)
        row_gx_vec<T, false>(p, row, nullptr, nullptr);
}

// gx, scalar (any C, any alignment): one warp per row, lanes striding over the channels.
template <typename T>
__device__ void backward_x_scalar(const LayerNormParams& p, long long block, long long nblocks) {
    const int lane = threadIdx.x & 31;
    const long long warp = threadIdx.x >> 5;
    const T* gamma = static_cast<const T*>(p.gamma);
    const float n = (float)p.c;
    for (long long row = block * kWarps + warp; row < p.rows; row += nblocks * kWarps) {
        const T* x = static_cast<const T*>(p.x) + row * p.c;
        const T* gy = static_cast<const T*>(p.gy) + row * p.c;
        T* gx = static_cast<T*>(p.gx) + row * p.c;
        const float m = p.mean[row], r = p.rstd[row];
        float sd = 0.0f, sdn = 0.0f;
        for (long long j = lane; j < p.c; j += 32) {
            const float d = lf::to_f32(gamma[j]) * lf::to_f32(gy[j]);
            sd += d;
            sdn += d * ((lf::to_f32(x[j]) - m) * r);
        }
        const float mean_d = warp_sum(sd) / n, mean_dn = warp_sum(sdn) / n;
        for (long long j = lane; j < p.c; j += 32) {
            const float d = lf::to_f32(gamma[j]) * lf::to_f32(gy[j]);
            const float o = (d - mean_d - (lf::to_f32(x[j]) - m) * r * mean_dn) * r;
            gx[j] = lf::from_f32<T>(o);
        }
    }
}

// The chunk sums of ggamma and gbeta: unit u = k·G + g sums rows k·256 … of channels
// g·256 + threadIdx.x in row order (the reference's operations) into partials. The rows are
// loaded kBatch at a time before their (dependent) additions, so each thread has 2·kBatch
// loads in flight instead of 2.
constexpr int kBatch = 8;
template <typename T>
__device__ void backward_chunks(const LayerNormParams& p, long long block, long long nblocks) {
    const T* x = static_cast<const T*>(p.x);
    const T* gy = static_cast<const T*>(p.gy);
    const long long groups = (p.c + kThreads - 1) / kThreads;
    for (long long u = block; u < p.chunks * groups; u += nblocks) {
        const long long k = u / groups, j = (u % groups) * kThreads + threadIdx.x;
        if (j >= p.c) continue;
        const long long r0 = k * kChunkRows;
        const long long r1 = r0 + kChunkRows < p.rows ? r0 + kChunkRows : p.rows;
        float gg = 0.0f, gb = 0.0f;
        long long row = r0;
        for (; row + kBatch <= r1; row += kBatch) {
            float g[kBatch], xv[kBatch];
LF_UNROLL
            for (int i = 0; i < kBatch; ++i) {
                g[i] = lf::to_f32(gy[(row + i) * p.c + j]);
                xv[i] = lf::to_f32(x[(row + i) * p.c + j]);
            }
LF_UNROLL
            for (int i = 0; i < kBatch; ++i) {
                const float nrm = __fmul_rn(__fsub_rn(xv[i], p.mean[row + i]), p.rstd[row + i]);
                gg = __fadd_rn(gg, __fmul_rn(g[i], nrm));
                gb = __fadd_rn(gb, g[i]);
            }
        }
        for (; row < r1; ++row) {
            const float g = lf::to_f32(gy[row * p.c + j]);
            const float nrm = __fmul_rn(__fsub_rn(lf::to_f32(x[row * p.c + j]), p.mean[row]), p.rstd[row]);
            gg = __fadd_rn(gg, __fmul_rn(g, nrm));
            gb = __fadd_rn(gb, g);
        }
        p.partials[k * p.c + j] = gg;
        p.partials[(p.chunks + k) * p.c + j] = gb;
    }
}

// One pass over x and gy for gx and the chunk sums (row path in registers, both wanted): the
// block takes chunks k (grid-stride), 8 rows at a time, one per warp. A warp loads its row,
// writes the reference's products gy·n and gy (f32) into the staging rows of shared memory
// and computes gx as backward_x_vec; after a barrier, thread t adds the staged rows in row
// order into its channels t, t + 256, … (≤ 4 of them: C ≤ 1024); a second barrier frees the
// staging for the next 8 rows. Shared: 2 × 8 × C f32 (48 KiB at C = 768).
constexpr int kChanPerThread = 32 * kRegValues / kThreads;  // 4
template <typename T>
__device__ void backward_fused(const LayerNormParams& p) {
    if (!row_in_registers<T>(p.c, p.x, p.gy, p.gx, p.gamma)) __trap();  // the launcher checks it
    LF_DYNAMIC_SMEM(float, stage);
    float* sgn = stage;                // [8][C]: gy·n of the round's rows
    float* sg = stage + kWarps * p.c;  // [8][C]: gy
    const int warp = (int)(threadIdx.x >> 5);
    for (long long k = blockIdx.x; k < p.chunks; k += gridDim.x) {
        const long long r0 = k * kChunkRows;
        const long long r1 = r0 + kChunkRows < p.rows ? r0 + kChunkRows : p.rows;
        float gg[kChanPerThread], gb[kChanPerThread];
LF_UNROLL
        for (int u = 0; u < kChanPerThread; ++u) gg[u] = gb[u] = 0.0f;
        for (long long base = r0; base < r1; base += kWarps) {
            const long long row = base + warp;
            if (row < r1) row_gx_vec<T, true>(p, row, sgn + warp * p.c, sg + warp * p.c);
            __syncthreads();  // the round's rows are staged
            const int staged = (int)(r1 - base < kWarps ? r1 - base : kWarps);
LF_UNROLL
            for (int u = 0; u < kChanPerThread; ++u) {
                const long long j = threadIdx.x + (long long)kThreads * u;
                if (j < p.c) {
                    for (int w = 0; w < staged; ++w) {
                        gg[u] = __fadd_rn(gg[u], sgn[w * p.c + j]);
                        gb[u] = __fadd_rn(gb[u], sg[w * p.c + j]);
                    }
                }
            }
            __syncthreads();  // the staging is free for the next rows
        }
LF_UNROLL
        for (int u = 0; u < kChanPerThread; ++u) {
            const long long j = threadIdx.x + (long long)kThreads * u;
            if (j < p.c) {
                p.partials[k * p.c + j] = gg[u];
                p.partials[(p.chunks + k) * p.c + j] = gb[u];
            }
        }
    }
}

// ggamma and gbeta from the chunk sums, one warp per channel (grid-stride): lane l adds the
// chunks l, l + 32, … in order, then a fixed xor tree over the lanes (cpu::combine_lanes),
// rounded once.
template <typename T>
__device__ void params(const LayerNormParams& p) {
    T* ggamma = static_cast<T*>(p.ggamma);
    T* gbeta = static_cast<T*>(p.gbeta);
    const int lane = threadIdx.x & 31;
    for (long long j = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5); j < p.c;
         j += (long long)gridDim.x * kWarps) {
        float gg = 0.0f, gb = 0.0f;
        for (long long k = lane; k < p.chunks; k += 32) {
            gg = __fadd_rn(gg, p.partials[k * p.c + j]);
            gb = __fadd_rn(gb, p.partials[(p.chunks + k) * p.c + j]);
        }
LF_UNROLL
        for (int off = 16; off > 0; off >>= 1) {
            gg = __fadd_rn(gg, __shfl_xor_sync(0xffffffffu, gg, off));
            gb = __fadd_rn(gb, __shfl_xor_sync(0xffffffffu, gb, off));
        }
        if (lane == 0) {
            ggamma[j] = lf::from_f32<T>(gg);
            gbeta[j] = lf::from_f32<T>(gb);
        }
    }
}

// The chunk-sum blocks come first: they run longest (256 dependent rows per thread), so
// they start in the first wave and the gx blocks fill the SMs around them.
template <typename T>
__device__ void backward(const LayerNormParams& p) {
    if (p.fused) {
        backward_fused<T>(p);
        return;
    }
    const long long b = blockIdx.x;
    const long long chan_blocks = (long long)gridDim.x - p.row_blocks;
    if (b < chan_blocks) {
        backward_chunks<T>(p, b, chan_blocks);
    } else if (row_in_registers<T>(p.c, p.x, p.gy, p.gx, p.gamma)) {
        backward_x_vec<T>(p, b - chan_blocks, p.row_blocks);
    } else {
        backward_x_scalar<T>(p, b - chan_blocks, p.row_blocks);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) layer_norm_fwd_f32(const LayerNormParams p) { forward<float>(p); }
extern "C" __global__ void __launch_bounds__(256) layer_norm_fwd_bf16(const LayerNormParams p) { forward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) layer_norm_fwd_f16(const LayerNormParams p) { forward<f16>(p); }

extern "C" __global__ void __launch_bounds__(256) layer_norm_bwd_f32(const LayerNormParams p) { backward<float>(p); }
extern "C" __global__ void __launch_bounds__(256) layer_norm_bwd_bf16(const LayerNormParams p) { backward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) layer_norm_bwd_f16(const LayerNormParams p) { backward<f16>(p); }

extern "C" __global__ void __launch_bounds__(256) layer_norm_params_bwd_f32(const LayerNormParams p) { params<float>(p); }
extern "C" __global__ void __launch_bounds__(256) layer_norm_params_bwd_bf16(const LayerNormParams p) { params<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256) layer_norm_params_bwd_f16(const LayerNormParams p) { params<f16>(p); }
