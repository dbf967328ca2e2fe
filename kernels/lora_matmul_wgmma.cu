// lora_matmul_wgmma.cu — the fused LoRA GEMM for Hopper (sm_90a): the K-major products of
// kernels/lora_matmul.cu (the same contract) on wgmma.mma_async fed by TMA through an
// mbarrier pipeline, in a persistent, warp-specialised grid.
//
// Math (lora_matmul.cu's, restricted to K-major operands):
//   C[i, j] = alpha · ( Σ_{p<K} A[i, p]·Bt[j, p]  +  Σ_{q<K2} A2[i, q]·B2t[j − b2_n0, q] )
//             (+ bias[j]) (+ C[i, j] when accumulate)     (out =), or (out +=) with accumulate
//   B2t's rows exist for j in [b2_n0, b2_n1) only (zero elsewhere). The LoRA forward
//   y = [x | s·u]·[W0 | B]ᵀ + b is this product with A = x [M,K], Bt = W0 [N,K], A2 = s·u
//   [M,r], B2t = B [n,r]: every operand row-major along the reduction ("K-major"), which is
//   what TMA boxes and wgmma's non-transposed descriptors read. B and B2 may instead both be
//   contiguous along N ("MN-major", b_mn_major = 1): the backward gx = [gy | s·v]·[W0 ; A]
//   reads W0 [N_out, K_in] and A [r, K_in] along K_in, its N; TMA brings boxes of 64 n ×
//   64 k and wgmma reads them through transposed-B descriptors (imm-trans-b). A and A2 must
//   be K-major; operands TMA cannot address stay on the sm_80 kernel (see the host twin
//   `wgmma::eligible` in src/ops/lora_matmul/wgmma.rs: a 16-byte-aligned base, a row stride
//   of a multiple of 16 bytes — rank r a multiple of 8 for the extension — K ≥ 1).
//
// Shapes: M, N, K, K2 any (edges zero-filled by TMA, outputs past M, N not written), M, N,
//   b2_n1 − b2_n0 < 2^31 (TMA coordinates are 32-bit).
// Dtypes: bf16 or f16 operands and C (suffix), f32 accumulators, C rounded once (nearest
//   even); bias is T.
//
// FLOPs per call: 2·M·N·(K + K2). Bytes: 2·(M·(K+K2) + N·(K+K2) + M·N) compulsory (+ 2·M·N
//   read when accumulating); each 128×BN tile re-reads its A panel N/BN times and its B
//   panel M/128 times, from L2 thanks to the rasterization.
// Floors (DESIGN §9/§10: 989 TFLOP/s is the dense bf16 wgmma peak of an H100 SXM / H200;
//   ~800 TFLOP/s the cuBLAS-class rate measured on them; 3.35 / 4.8 TB/s HBM):
//   headline (M 8192, K = N = 4096, r 16) forward: 276 GFLOP → 0.279 ms at the peak,
//     0.345 ms at 800 TFLOP/s. GPT-2 124M forward products (M 8192, r 16): c_attn 29.6,
//     attn.c_proj 9.9, mlp.c_fc 39.5, mlp.c_proj 38.9 GFLOP (×12 layers), lm_head 633
//     GFLOP (the padded vocabulary 50304) → 37, 12, 49, 49, 791 µs at 800 TFLOP/s.
// Expected fraction (a design estimate, not measured on a GPU):
//   * main loop: 4 stages × 64 deep hide TMA latency (~1 µs) behind 4 × 4.2 MFLOP of
//     wgmma per stage of a 128×256 tile (~0.56 µs each at a 132nd of the peak); one
//     mbarrier wait and one wgmma group per k-tile, a group kept in flight (wait<1>), so
//     the tensor cores see back-to-back 64×256×16 wgmmas: ~85–90 % of the peak inside the
//     loop, the rate CUTLASS's cooperative sm90 kernels reach.
//   * epilogue: not overlapped with the next tile's wgmmas (both consumer warpgroups store
//     at once; the producer already loads the next tile's stages), f32 accumulators →
//     bf16 pairs stored straight from registers (4 lanes fill 16 contiguous bytes of a row:
//     half of each 32-byte sector per store, the other half by the next register pair):
//     ~2.6 µs per 128×256 tile at a 132nd of the HBM bandwidth, against ~6.7 µs of wgmma
//     for K = 768 and ~36 µs for K = 4096.
//   * waves: 128×256 tiles of the GPT-2 forward products: c_attn 576 (4.4 waves of 132),
//     c_fc 768 (5.8), attn/mlp c_proj 192 (1.5 — these take 128×128 tiles: 384, 2.9 waves),
//     lm_head 12576 (95.3).
//   → ~0.75 of the peak (~0.9× the 800 TFLOP/s floor, ~0.9× cuBLAS) at the headline and the
//     lm_head forward; ~0.5–0.6 of the peak at the K = 768 block linears, where the
//     unoverlapped epilogue and the wave tails cost most. (The sm_80 kernel's estimate at
//     the headline: 0.5–0.65 of 800.)
//
// Launch geometry:
//   A persistent 1-D grid of min(tiles, SMs) blocks of 384 threads = 3 warpgroups:
//     warpgroup 0, the producer: setmaxnreg.dec 40; its thread 0 issues every TMA load;
//     warpgroups 1 and 2, the consumers: setmaxnreg.inc 232; consumer c owns rows
//     64c..64c+63 of the 128-row tile, a 64×BN f32 accumulator (BN/2 registers per thread).
//   Tiles: 128×BN, BN = 256 (lora_matmul_wgmma256_*) or 128 (lora_matmul_wgmma128_*), the
//     host heuristic picking 256 when the 128×256 grid has a full wave; block b takes tiles
//     b, b + grid, b + 2·grid, … in the rasterized order of lora_matmul.cu (groups of 8
//     tile-rows, the tile-row fastest), so the blocks in flight share B's panel in L2.
//   Reduction: ceil(K/64) base k-tiles of A and Bt, then ceil(K2/64) extension k-tiles of A2
//     and B2t (skipped when the tile's columns miss [b2_n0, b2_n1)), each a TMA box of
//     64 k × 128 rows (A) and 64 k × BN rows (B; MN-major: BN/64 boxes of 64 n × 64 k, one
//     8 KiB atom column each, read with LBO = 8 KiB, SBO = 1024 and the start advanced 2048
//     bytes = 16 k-rows per k16 step), zero-filled past every edge.
//   Pipeline: kStages = 4 stages of 128×64 + BN×64 values, 128-byte swizzled (TMA's
//     CU_TENSOR_MAP_SWIZZLE_128B, read by descriptors with the 128 B mode: rows 128 bytes
//     apart, SBO 1024 bytes between 8-row groups, the start advanced 32 bytes per k16 step).
//     full[s]: 1 arrival (the producer's arrive.expect_tx of the stage's bytes) + the TMA
//     transactions; empty[s]: 8 arrivals (lane 0 of each consumer warp, after its wgmma wait
//     covering the stage and a __syncwarp). The producer waits empty[s] with the parity of
//     the previous round (a fresh barrier passes at once), the consumers full[s].
//   Consumers, per k-tile: wait full[s]; wgmma.fence; 4 × wgmma m64nBNk16 (A from its rows
//     of the stage, B the whole stage); commit; wait_group 1 (the previous k-tile's group is
//     done); release the previous stage. After the last k-tile: wait_group 0, release.
//   Epilogue per thread: its accumulator pairs (row, columns 2t, 2t+1), alpha·acc + bias +
//     C (accumulate), rounded once, one 4-byte store per pair where C and bias allow it.
//   Shared memory: 1024 (alignment slack) + 4 × (16 + BN/8) KiB + 64 bytes of mbarriers:
//     197 696 bytes (BN 256), 132 160 (BN 128) — both need the opt-in above 48 KiB.
//   No atomics; every output is one thread's fixed-order sum: deterministic.
#include "common.cuh"

// Rust twin: `WgmmaParams` in src/ops/lora_matmul/wgmma.rs (a test checks the size).
// The tensor maps are encoded on the host (cuTensorMapEncodeTiled; the simulator's
// lf_sim_tensor_map_encode_2d) and read by TMA from the kernel's parameter space.
struct LoraMatmulWgmmaParams {
    lf::TensorMap a;    // A [M][K], box 64 × 128
    lf::TensorMap b;    // Bt [N][K], box 64 × BN
    lf::TensorMap a2;   // A2 [M][K2], box 64 × 128 (unused when k2 = 0)
    lf::TensorMap b2;   // B2t [b2_n1 − b2_n0][K2], box 64 × BN (unused when k2 = 0)
    void* c;            // C(i, j) = c[i·ldc + j]
    const void* bias;   // bias[j], or null
    long long m, n, k, k2;
    long long ldc;
    long long b2_n0, b2_n1;
    float alpha;
    int accumulate;     // 1: C += result (C read first)
    int b_mn_major;     // 1: Bt and B2t contiguous along N (the maps' boxes 64 n × 64 k)
    int pad;
};

namespace {

constexpr int kBM = 128;           // tile rows: 2 consumer warpgroups × 64
constexpr int kBK = 64;            // k-tile depth: 64 × 2 bytes = one 128-byte swizzle row
constexpr int kStages = 4;         // TMA pipeline depth
constexpr int kThreads = 384;      // producer + 2 consumer warpgroups
constexpr int kGroupM = 8;         // rasterization: tile-rows per group
constexpr int kConsumerWarps = 8;  // empty[s] arrivals per round
constexpr unsigned kSwizzleRow = 128, kSwizzleAtom = 1024;
constexpr unsigned kMnBox = 64 * kBK * 2;  // an MN-major B box: 64 n × 64 k, 8 KiB

template <int BN>
struct WgCfg {
    static constexpr unsigned kABytes = kBM * kBK * 2;
    static constexpr unsigned kBBytes = BN * kBK * 2;
    static constexpr unsigned kStageBytes = kABytes + kBBytes;
    static constexpr unsigned kSmemBytes = kSwizzleAtom + kStages * kStageBytes + 2 * kStages * 8;
    static_assert(kStageBytes % kSwizzleAtom == 0, "stages keep the 1024-byte swizzle alignment");
    static_assert(kSmemBytes <= 227 * 1024, "fits an sm_90 block's shared memory");
};

// One output tile of the persistent schedule.
struct WgTile {
    long long i0, j0;
    int kt_base, kt_total;
};

template <int BN>
__device__ __forceinline__ long long tile_count(const LoraMatmulWgmmaParams& p) {
    return ((p.m + kBM - 1) / kBM) * ((p.n + BN - 1) / BN);
}

// Tile t in the rasterized order of lora_matmul.cu, with its k-tiles (base, then extension
// when its columns meet the adapter's). Producer and consumers compute the same.
template <int BN>
__device__ __forceinline__ WgTile tile_at(const LoraMatmulWgmmaParams& p, long long t) {
    const long long tiles_m = (p.m + kBM - 1) / kBM, tiles_n = (p.n + BN - 1) / BN;
    const long long per_group = kGroupM * tiles_n;
    const long long first_m = (t / per_group) * kGroupM;
    const long long group_rows = tiles_m - first_m < kGroupM ? tiles_m - first_m : (long long)kGroupM;
    const long long local = t % per_group;
    WgTile w;
    w.i0 = (first_m + local % group_rows) * kBM;
    w.j0 = (local / group_rows) * BN;
    w.kt_base = (int)((p.k + kBK - 1) / kBK);
    const bool ext = p.k2 > 0 && p.b2_n0 < p.b2_n1 && w.j0 < p.b2_n1 && w.j0 + BN > p.b2_n0;
    w.kt_total = w.kt_base + (ext ? (int)((p.k2 + kBK - 1) / kBK) : 0);
    return w;
}

// alpha·(v0, v1) (+ bias) (+ C) for columns j, j + 1 of row i, rounded once; one 4-byte
// store when `pair` (C and bias 4-byte aligned, ldc even) and both columns exist.
template <typename T>
__device__ __forceinline__ void store_pair(const LoraMatmulWgmmaParams& p, long long i, long long j, float v0,
                                           float v1, bool pair) {
    if (i >= p.m || j >= p.n) return;
    T* c = static_cast<T*>(p.c) + i * p.ldc + j;
    const T* bias = static_cast<const T*>(p.bias);
    float x[2] = {p.alpha * v0, p.alpha * v1};
    if (pair && j + 1 < p.n) {
        if (bias) {
            const unsigned w = lf::load_pair(bias + j);
            x[0] += lf::unpack_lo<T>(w);
            x[1] += lf::unpack_hi<T>(w);
        }
        if (p.accumulate) {
            const unsigned w = lf::load_pair(c);
            x[0] += lf::unpack_lo<T>(w);
            x[1] += lf::unpack_hi<T>(w);
        }
        const unsigned out = lf::pack2(lf::from_f32<T>(x[0]), lf::from_f32<T>(x[1]));
#if defined(LORAFUSE_SIM)
        memcpy(c, &out, 4);
#else
        *reinterpret_cast<unsigned*>(c) = out;
#endif
        return;
    }
    for (int u = 0; u < 2 && j + u < p.n; ++u) {
        if (bias) x[u] += lf::to_f32(bias[j + u]);
        if (p.accumulate) x[u] += lf::to_f32(c[u]);
        c[u] = lf::from_f32<T>(x[u]);
    }
}

// A consumer warp's lanes have all passed their wgmma wait covering stage s: lane 0 frees it.
__device__ __forceinline__ void release_stage(lf::u64* empty, int s) {
    __syncwarp();
    if ((threadIdx.x & 31u) == 0) lf::mbarrier_arrive(&empty[s]);
}

template <typename T, int BN>
__device__ void gemm_wgmma(const LoraMatmulWgmmaParams& p) {
    using C = WgCfg<BN>;
    LF_DYNAMIC_SMEM(unsigned char, raw);
    // The 128 B swizzle repeats every 1024 bytes: stages start on that boundary, as TMA's
    // swizzle and the descriptors (base offset 0) assume.
    unsigned char* smem = raw + ((kSwizzleAtom - (lf::smem_addr(raw) % kSwizzleAtom)) % kSwizzleAtom);
    lf::u64* full = reinterpret_cast<lf::u64*>(smem + kStages * C::kStageBytes);
    lf::u64* empty = full + kStages;
    auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * C::kStageBytes); };
    auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * C::kStageBytes + C::kABytes); };

    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            lf::mbarrier_init(&full[s], 1);
            lf::mbarrier_init(&empty[s], kConsumerWarps);
        }
    }
    __syncthreads();  // the barriers are initialised before anyone waits on them

    const long long tiles = tile_count<BN>(p);
    const int wg = (int)(threadIdx.x / 128u);
    if (wg == 0) {
        // The producer: one thread issues every load; the others have nothing to do.
        lf::setmaxnreg_dec<40>();
        if (threadIdx.x != 0) return;
        int it = 0;  // k-tiles issued by this block so far (stage it % kStages, round it / kStages)
        for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
            const WgTile w = tile_at<BN>(p, t);
            for (int kt = 0; kt < w.kt_total; ++kt, ++it) {
                const int s = it % kStages;
                const unsigned round = (unsigned)(it / kStages);
                lf::mbarrier_wait_parity(&empty[s], (round & 1u) ^ 1u);  // freed in the last round
                lf::mbarrier_arrive_expect_tx(&full[s], C::kStageBytes);
                const bool base = kt < w.kt_base;
                const int k0 = base ? kt * kBK : (kt - w.kt_base) * kBK;
                const int j0 = (int)(base ? w.j0 : w.j0 - p.b2_n0);
                const lf::TensorMap* bmap = base ? &p.b : &p.b2;
                lf::tma_load_2d(stage_a(s), base ? &p.a : &p.a2, k0, (int)w.i0, &full[s]);
                if (p.b_mn_major) {
                    // BN/64 boxes of 64 n × 64 k, each a 128 B-swizzled MN-major atom column.
                    for (int x = 0; x < BN / 64; ++x)
                        lf::tma_load_2d(reinterpret_cast<unsigned char*>(stage_b(s)) + x * kMnBox, bmap, j0 + 64 * x,
                                        k0, &full[s]);
                } else {
                    lf::tma_load_2d(stage_b(s), bmap, k0, j0, &full[s]);
                }
            }
        }
        return;
    }

    // The consumers: warpgroup wg owns rows 64·(wg − 1).. of each tile.
    lf::setmaxnreg_inc<232>();
    const int cw = wg - 1;
    const int warp = (int)(threadIdx.x / 32u), lane = (int)(threadIdx.x & 31u);
    const bool pair = (reinterpret_cast<unsigned long long>(p.c) & 3ull) == 0 && p.ldc % 2 == 0 &&
                      (reinterpret_cast<unsigned long long>(p.bias) & 3ull) == 0;
    int it = 0;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
        const WgTile w = tile_at<BN>(p, t);
        float acc[BN / 2];
        LF_UNROLL
        for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
        int prev = -1;
        for (int kt = 0; kt < w.kt_total; ++kt, ++it) {
            const int s = it % kStages;
            lf::mbarrier_wait_parity(&full[s], (unsigned)(it / kStages) & 1u);
            const unsigned char* a_rows = reinterpret_cast<const unsigned char*>(stage_a(s)) + cw * 64 * kSwizzleRow;
            const unsigned char* b_rows = reinterpret_cast<const unsigned char*>(stage_b(s));
            lf::wgmma_fence_operands(acc);
            lf::wgmma_fence();
            if (p.b_mn_major) {
                // MN-major B: k-rows of 128 bytes (64 n), 8-row groups SBO = 1024 apart, the
                // 64-column boxes LBO = kMnBox apart; 16 k-rows (2048 bytes) per k16 step.
                LF_UNROLL
                for (int k16 = 0; k16 < kBK / 16; ++k16) {
                    const lf::u64 da = lf::make_smem_desc(a_rows + 32 * k16, 16, kSwizzleAtom, lf::Swizzle::b128);
                    const lf::u64 db =
                        lf::make_smem_desc(b_rows + 16 * kSwizzleRow * k16, kMnBox, kSwizzleAtom, lf::Swizzle::b128);
                    lf::wgmma_m64nNk16<T, BN, false, true>(acc, da, db, true);
                }
            } else {
                LF_UNROLL
                for (int k16 = 0; k16 < kBK / 16; ++k16) {
                    const lf::u64 da = lf::make_smem_desc(a_rows + 32 * k16, 16, kSwizzleAtom, lf::Swizzle::b128);
                    const lf::u64 db = lf::make_smem_desc(b_rows + 32 * k16, 16, kSwizzleAtom, lf::Swizzle::b128);
                    lf::wgmma_m64nNk16<T, BN>(acc, da, db, true);
                }
            }
            lf::wgmma_commit();
            lf::wgmma_fence_operands(acc);
            lf::wgmma_wait<1>();  // the previous k-tile's group has read its stage
            if (prev >= 0) release_stage(empty, prev);
            prev = s;
        }
        lf::wgmma_wait<0>();
        lf::wgmma_fence_operands(acc);
        if (prev >= 0) release_stage(empty, prev);

        // Epilogue: d[i] is row 16·(warp % 4) + lane / 4 + 8·((i / 2) % 2), column
        // 8·(i / 4) + 2·(lane % 4) + i % 2 of this warpgroup's 64 rows.
        const long long row0 = w.i0 + 64 * cw + 16 * (warp % 4) + lane / 4;
        const long long col0 = w.j0 + 2 * (lane % 4);
        LF_UNROLL
        for (int i = 0; i < BN / 2; i += 2)
            store_pair<T>(p, row0 + 8 * ((i / 2) % 2), col0 + 8 * (i / 4), acc[i], acc[i + 1], pair);
    }
}

// The kernel body where wgmma exists (sm_90a, the simulator); elsewhere a trap — the host
// launches these kernels only from an sm_90a cubin (src/ops/lora_matmul/wgmma.rs).
template <typename T, int BN>
__device__ __forceinline__ void run_wgmma(const LoraMatmulWgmmaParams& p) {
#if defined(LF_SM90A) || defined(LORAFUSE_SIM)
    gemm_wgmma<T, BN>(p);
#else
    (void)p;
    __trap();
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    lora_matmul_wgmma256_fwd_bf16(const __grid_constant__ LoraMatmulWgmmaParams p) {
    run_wgmma<bf16, 256>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    lora_matmul_wgmma256_fwd_f16(const __grid_constant__ LoraMatmulWgmmaParams p) {
    run_wgmma<f16, 256>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    lora_matmul_wgmma128_fwd_bf16(const __grid_constant__ LoraMatmulWgmmaParams p) {
    run_wgmma<bf16, 128>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    lora_matmul_wgmma128_fwd_f16(const __grid_constant__ LoraMatmulWgmmaParams p) {
    run_wgmma<f16, 128>(p);
}
