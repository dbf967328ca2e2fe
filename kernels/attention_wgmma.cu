// attention_wgmma.cu — causal attention for Hopper (sm_90a), FlashAttention-3 style. The
// forward: S = Q·Kᵀ and O += P·V on wgmma.mma_async, K and V brought by TMA through an mbarrier
// pipeline, a producer warpgroup and two consumer warpgroups, and the softmax of one key tile
// overlapped with the wgmmas of the next. The backward (below the forward's sections): dk, dv
// and then dq on the same machinery. The contract of attention.cu (the CPU reference is
// src/ops/attention/cpu.rs), restricted to what TMA boxes of whole tiles address.
//
// Math (per batch b and head h; q, k, v [T, hd] the columns h·hd.. of qkv's three blocks;
// scale = 1/√hd; base-2 domain: s' = s·scale·log2 e):
//   S = Q·Kᵀ per 128-key tile j, masked to −inf above the diagonal (the last tile only);
//   m' = max(m, rowmax S');  α = 2^(m − m');  P = 2^(S' − m');  l = l·α + rowsum P;
//   O = O·α + P·V (P rounded to the storage type for the wgmma, as in attention.cu's tensor-
//   core path; l sums the unrounded P); m = m'.
//   y_i = O_i / l_i                                            (out =) y [B, T, C], cols h·hd..
//   lse_i = m_i·ln 2 + ln l_i                                  (out =) lse [B, H, T], f32
//
// Shapes: qkv [B, T, 3C], y [B, T, C], lse [B, H, T]; hd = C / H ∈ {64, 128}; T a multiple of
//   128 (every query and key tile whole: no TMA box crosses into the next batch's rows);
//   C a multiple of 8 (qkv's rows 16-byte multiples, as TMA needs); B·T < 2^31. The host twin
//   `wgmma::eligible` (src/ops/attention/wgmma.rs) checks all of it; other shapes take
//   attention.cu.
// Dtypes: bf16 or f16 (suffix); f32 accumulators, softmax and statistics; y rounded once.
//
// Pipeline (per block: 128 query rows of one (b, h); key tiles j = 0 … q/128 in order):
//   warpgroup 0, the producer (setmaxnreg.dec 24), thread 0 only: Q once (q_full), then per
//     key tile j into stage j % 2: waits k_empty, loads K (k_full), waits v_empty, loads V
//     (v_full). K and V have their own barriers, so S_j starts before V_j has landed and K's
//     stage is refilled as soon as S has read it: K_{j+1} is in flight a whole iteration
//     before it is needed.
//   warpgroups 1 and 2, the consumers (setmaxnreg.inc 240): consumer c owns query rows
//     64c .. 64c + 63 of the block's 128 and runs, per key tile (FA3's intra-warpgroup
//     pipelining):
//       issue S_j = Q·K_jᵀ (hd/16 wgmma m64n128k16, A and B K-major from shared memory);
//       issue O += P_{j−1}·V_{j−1} (8 wgmma m64n{hd}k16, A = P from registers, B = V MN-major:
//         trans-b, the 128 B-swizzled TMA box read as the PTX ISA's MN-major layout);
//       wait for S_j (wait_group 1), free K's stage; softmax of S_j while the P·V wgmmas run;
//       wait for P·V (wait_group 0), free V's stage; O ·= α_j; P_j packed into A fragments
//       (the S accumulator pairs are exactly wgmma's A register fragment).
//     A last P·V after the loop; then l reduced across the quad, lse, O / l stored from
//     registers (4-byte pairs).
//   Barriers: q_full (1 arrival + tx), k_full[2], v_full[2] (1 + tx), k_empty[2], v_empty[2]
//     (8 arrivals: lane 0 of each consumer warp after its wgmma wait and a __syncwarp). The
//     producer waits the empties with the parity of the previous round (a fresh barrier
//     passes at once), the consumers the fulls with the round's parity.
//
// FLOPs and bytes per call (causal, 128×128 tiles, the diagonal tiles computed whole):
//   4·hd·128²·Σ_blocks(tiles) = 4·hd·128²·(n(n+1)/2)·B·H with n = T/128; useful
//   4·hd·T(T+1)/2·B·H. DRAM: qkv read once (2·3·B·T·C bytes; K/V re-read by every query block
//   of the head, from L2: one head's K and V are 2·T·hd·2 = 256 KB at T 1024, hd 64), y
//   written (2·B·T·C), lse (4·B·H·T).
// Headline (GPT-2 124M: B 8, T 1024, C 768, H 12, hd 64), per layer: 12.9 GFLOP useful, 14.5
//   executed (36 tile pairs per head); 51 MB of DRAM. Floors: 14.7 µs at 989 TFLOP/s (dense
//   bf16 wgmma peak, H100 SXM / H200), 10.6 µs of DRAM at 4.8 TB/s (H200), 15.2 µs at
//   3.35 TB/s (H100): compute and DRAM balanced.
// Expected (a design estimate, not measured on a GPU): per 128-key tile a consumer warpgroup
//   has 2.1 MFLOP of wgmma (0.56 µs per block at a 132nd of the peak) and 64 exp2 per thread
//   (16K per block: ~0.55 µs of MUFU at 16/clk/SM); the overlap hides most of the softmax
//   behind the other warpgroup's and the next tile's wgmmas, but not all (no inter-warpgroup
//   ping-pong scheduling, FA3's second overlap), and the blocks are short (1–8 tiles at T
//   1024: the Q load, the first S and the epilogue are exposed, ~1.5 µs per block, 5.8 blocks
//   per SM). → ~0.85–0.9 µs per tile, ≈ 35–40 µs per layer forward at the headline
//   (≈ 330–370 TFLOP/s useful, ~0.35 of the peak), against ~56 µs predicted for the sm_80
//   tensor-core kernel and ~43 µs for FlashAttention-2 (SDPA, ~300 TFLOP/s): ~1.1–1.3× SDPA.
//   At hd 128 the wgmma work per tile doubles for the same softmax: ~0.45–0.5 of the peak.
//
// Launch geometry: grid (T/128, H, B), query blocks longest first (block x takes query block
//   T/128 − 1 − x); 384 threads = 3 warpgroups, __launch_bounds__(384, 1) (24·128 + 240·256 =
//   64 512 registers after setmaxnreg). Dynamic shared memory, 1024-byte aligned (the 128 B
//   swizzle's period), hd/64 boxes of 128 rows × 128 bytes per operand: Q, then 2 stages of
//   K and V, then the 9 mbarriers: 1024 + 16 KiB·(hd/64)·5 + 72 bytes = 83 016 (hd 64),
//   164 936 (hd 128) — the opt-in above 48 KiB.
//   No atomics; every output is one thread's fixed-order computation: deterministic.
//
// ---- The backward (attention_wgmma64_dkv_bwd, attention_wgmma64_dq_bwd) ----
// Math (attention.cu's backward contract; P recomputed from the forward's lse, D = rowsum(gy ∘ y)
//   from attention.cu's attention_delta_bwd, launched first):
//   P_ij = 2^(s_ij·scale·log2 e − lse_i·log2 e) for j ≤ i, 0 above the diagonal;
//   dP = gy·Vᵀ;  dS_ij = P_ij·(dP_ij − D_i)·scale   (P and dS rounded to the storage type for
//   the wgmmas that read them, as in attention.cu's tensor-core path)
//   dkv (one block per 128 keys; query tiles of 64 rows from the diagonal on, in order):
//     dv_j = Σ_{i≥j} P_ij gy_i                                 (out =) dqkv[:, :, 2C + h·hd..]
//     dk_j = Σ_{i≥j} dS_ij q_i                                 (out =) dqkv[:, :, C + h·hd..]
//   dq (one block per 128 query rows; key tiles of 64 from 0 to the diagonal, in order):
//     dq_i = Σ_{j≤i} dS_ij k_j                                 (out =) dqkv[:, :, h·hd..]
//   dq has its own pass (S and dP recomputed: 7 GEMMs, not FA3's 5) so that no float atomics
//   are needed and dqkv is bitwise reproducible.
// Shapes: qkv, dqkv [B, T, 3C], gy [B, T, C], lse, delta [B, H, T] f32; hd = 64 only (at 128 the
//   dkv consumer's Sᵀ, dPᵀ, dk, dv tiles, two fragment sets and the tile's statistics are 256
//   registers before any address: past its 240),
//   T a multiple of 128; `wgmma::backward_eligible` is the host twin. bf16 or f16; f32 math.
// Pipeline (both kernels: the forward's roles, three stages): the producer's thread 0 loads the
//   block's two resident 128-row operands once (dkv: K, V; dq: Q, gy; each 64-column box as two
//   64-row TMA boxes) and streams 64-row tiles of the other two (dkv: Q, gy; dq: K, V) through
//   3 stages (full: 1 arrival + tx; empty: 8 consumer-warp arrivals). Consumer c of 2 owns 64
//   keys (dkv) or 64 query rows (dq) and, per tile n: issues the two SS wgmmas (Sᵀ = K·Qᵀ and
//   dPᵀ = V·gyᵀ, or S = Q·Kᵀ and dP = gy·Vᵀ: m64n64k16, hd/16 each, one group), then the RS
//   wgmmas of tile n − 1 (dv += Pᵀ·gy and dk += dSᵀ·Q, or dq += dS·K: P, dS from registers,
//   the streamed operand MN-major), waits for the first group, computes P and dS of tile n
//   while those run, waits for the second, frees stage n − 1 and packs tile n's fragments.
//   Causal trimming per consumer: dkv's consumer 1 (keys 64..127 of the block) skips the first
//   query tile (all before its keys; it frees the stage unread), dq's consumer 0 skips the last
//   key tile (all after its rows; no release needed: the producer waits for no later stage).
//   dkv reads lse and D of its tile's 16 query columns per thread from global memory (L1/L2)
//   before the tile's first wait; dq reads its two rows' once.
// FLOPs and bytes at the headline (B 8, H 12, T 1024, hd 64), per layer: useful 7 GEMMs ×
//   2·hd·T(T+1)/2·B·H = 45.1 GFLOP; executed 47.9 (dkv 136 consumer-tiles of 4·2·64³ per head,
//   27.4 GFLOP; dq 136 of 3·2·64³, 20.5 GFLOP). Exponentials 2·B·H·T²/2 = 101 M. DRAM: delta
//   reads gy, y (25 MB); dkv reads qkv, gy (50 MB) and writes dk, dv (25 MB); dq reads qkv, gy
//   (50 MB, partly from L2) and writes dq (12.6 MB): ≈ 164 MB. Floors: 48 µs at 989 TFLOP/s
//   (executed), 34 µs of DRAM at 4.8 TB/s (H200), 49 µs at 3.35 TB/s (H100).
// Expected (a design estimate, not measured on a GPU): per consumer-tile dkv has 2.1 MFLOP of
//   wgmma against 4096 exp2 and ~6 FP32 ops per element (half the forward's exponentials per
//   FLOP), dq 1.6 MFLOP against the same; the element-wise work overlaps the previous tile's RS
//   wgmmas and the other consumer's wgmmas (no ping-pong), the blocks are short (2–16 tiles)
//   and every tile of dkv waits once on its lse/D loads. → dkv ~0.4 of the peak (~70 µs), dq
//   ~0.35 (~60 µs), delta ~7 µs: ≈ 125–150 µs per layer, against ~240 µs predicted for the
//   sm_80 FlashAttention-2-style backward and ~160 µs for FlashAttention-2's (SDPA, ~200
//   TFLOP/s on its 5 GEMMs): ~1.1–1.3× FA2's backward.
// Launch geometry: both grids (T/128, H, B), 384 threads (producer warpgroup setmaxnreg 24,
//   consumers 240), __launch_bounds__(384, 1); dkv's block x takes key block x (the longest
//   first), dq's takes query block T/128 − 1 − x (the longest first). Dynamic shared memory,
//   1024-byte aligned: 1024 + 2 × 16 KiB + 3 × 2 × 8 KiB + 7 mbarriers = 83 000 bytes (opt-in).
//   No atomics: deterministic.
#include "common.cuh"

// Rust twin: `WgmmaAttentionParams` in src/ops/attention/wgmma.rs (a test checks the size).
struct AttentionWgmmaParams {
    lf::TensorMap qkv;  // qkv as [B·T, 3C], box 64 columns × 128 rows, 128 B swizzle
    void* out;          // y [B, T, C]
    float* lse;         // [B, H, T]
    long long b, t, c, h;
    float scale;        // 1/√hd
    int pad;
};

// Rust twin: `WgmmaAttentionBwdParams` in src/ops/attention/wgmma.rs (a test checks the size).
struct AttentionWgmmaBwdParams {
    lf::TensorMap qkv;    // qkv as [B·T, 3C], box 64 columns × 64 rows, 128 B swizzle
    lf::TensorMap gy;     // gy as [B·T, C], the same box
    void* dqkv;           // [B, T, 3C]
    const float* lse;     // [B, H, T]: the forward's logsumexp
    const float* delta;   // [B, H, T]: D = rowsum(gy ∘ y), from attention_delta_bwd
    long long b, t, c, h;
    float scale;          // 1/√hd
    int pad;
};

namespace {

constexpr int kBM = 128;            // query rows per block: 2 consumer warpgroups × 64
constexpr int kBC = 128;            // keys per tile
constexpr int kThreads = 384;       // producer + 2 consumer warpgroups
constexpr int kConsumerWarps = 8;   // arrivals on an empty barrier
constexpr unsigned kRow = 128;      // bytes per box row: 64 values, one 128 B swizzle row
constexpr unsigned kBox = kBC * kRow;  // one 64-column box of 128 rows: 16 KiB
constexpr unsigned kAtom = 1024;    // the 128 B swizzle's period
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int HD>
struct Cfg {
    static constexpr int kBoxes = HD / 64;  // 64-column boxes per operand tile
    static constexpr unsigned kTile = kBoxes * kBox;
    static constexpr unsigned kQ = 0, kK = kTile, kV = 3 * kTile;  // K, V: 2 stages each
    static constexpr unsigned kBars = 5 * kTile;
    static constexpr unsigned kSmemBytes = kAtom + kBars + 9 * 8;
    static_assert(kSmemBytes <= 227 * 1024, "fits an sm_90 block's shared memory");
};

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

// Pins the P fragments in place around the asynchronous wgmmas that read them.
template <int N>
__device__ __forceinline__ void pin(unsigned (&r)[N][4]) {
    LF_UNROLL
    for (int i = 0; i < N; ++i) lf::wgmma_fence_operands(r[i]);
}

// Every consumer warp's lanes have passed the wgmma wait that covers the stage: lane 0 frees it.
__device__ __forceinline__ void release(lf::u64* bar) {
    __syncwarp();
    if ((threadIdx.x & 31u) == 0) lf::mbarrier_arrive(bar);
}

// Trap on a launch this instantiation cannot run (the launcher never makes one).
template <int HD>
__device__ __forceinline__ void check(const AttentionWgmmaParams& p) {
    if (p.h <= 0 || p.c % p.h != 0 || p.c / p.h != HD || p.t % kBM != 0 || blockDim.x != kThreads ||
        (long long)gridDim.x * kBM != p.t)
        __trap();
}

template <typename T, int HD>
__device__ void forward(const AttentionWgmmaParams& p) {
    using C = Cfg<HD>;
    check<HD>(p);
    LF_DYNAMIC_SMEM(unsigned char, raw);
    unsigned char* smem = raw + ((kAtom - (lf::smem_addr(raw) % kAtom)) % kAtom);
    lf::u64* bars = reinterpret_cast<lf::u64*>(smem + C::kBars);
    lf::u64* q_full = bars;
    lf::u64* k_full = bars + 1;   // [2]
    lf::u64* v_full = bars + 3;   // [2]
    lf::u64* k_empty = bars + 5;  // [2]
    lf::u64* v_empty = bars + 7;  // [2]
    unsigned char* qs = smem + C::kQ;
    auto ks = [&](int s) { return smem + C::kK + s * C::kTile; };
    auto vs = [&](int s) { return smem + C::kV + s * C::kTile; };

    if (threadIdx.x == 0) {
        lf::mbarrier_init(q_full, 1);
        for (int s = 0; s < 2; ++s) {
            lf::mbarrier_init(&k_full[s], 1);
            lf::mbarrier_init(&v_full[s], 1);
            lf::mbarrier_init(&k_empty[s], kConsumerWarps);
            lf::mbarrier_init(&v_empty[s], kConsumerWarps);
        }
    }
    __syncthreads();  // the barriers are initialised before anyone waits on them

    const long long qb = (long long)gridDim.x - 1 - blockIdx.x;  // longest first
    const long long q0 = qb * kBM, h = blockIdx.y, b = blockIdx.z;
    const int ntiles = (int)qb + 1;  // keys 0 … q0 + 127
    const int wg = (int)(threadIdx.x / 128u);

    if (wg == 0) {
        lf::setmaxnreg_dec<24>();
        if (threadIdx.x != 0) return;
        const int row0 = (int)(b * p.t);  // the batch's first row of the [B·T, 3C] map
        const int col_q = (int)(h * HD), col_k = (int)(p.c + h * HD), col_v = (int)(2 * p.c + h * HD);
        lf::mbarrier_arrive_expect_tx(q_full, C::kTile);
        for (int x = 0; x < C::kBoxes; ++x)
            lf::tma_load_2d(qs + x * kBox, &p.qkv, col_q + 64 * x, row0 + (int)q0, q_full);
        for (int j = 0; j < ntiles; ++j) {
            const int s = j & 1;
            const unsigned parity = ((unsigned)(j >> 1) & 1u) ^ 1u;  // freed in the last round
            lf::mbarrier_wait_parity(&k_empty[s], parity);
            lf::mbarrier_arrive_expect_tx(&k_full[s], C::kTile);
            for (int x = 0; x < C::kBoxes; ++x)
                lf::tma_load_2d(ks(s) + x * kBox, &p.qkv, col_k + 64 * x, row0 + j * kBC, &k_full[s]);
            lf::mbarrier_wait_parity(&v_empty[s], parity);
            lf::mbarrier_arrive_expect_tx(&v_full[s], C::kTile);
            for (int x = 0; x < C::kBoxes; ++x)
                lf::tma_load_2d(vs(s) + x * kBox, &p.qkv, col_v + 64 * x, row0 + j * kBC, &v_full[s]);
        }
        return;
    }

    lf::setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int warp = (int)(threadIdx.x / 32u), lane = (int)(threadIdx.x & 31u);
    const int g = lane / 4, tq = lane % 4;
    const long long rw = q0 + 64 * cw + 16 * (warp % 4);  // the warp's first query row
    const long long row[2] = {rw + g, rw + g + 8};
    const float sl2 = p.scale * kLog2e;

    float s[kBC / 2];        // S of the current tile (m64n128 accumulators)
    float o[HD / 2];         // O (m64n{hd} accumulators)
    unsigned pa[kBC / 16][4];  // P of the previous tile as wgmma A fragments
    LF_UNROLL
    for (int i = 0; i < HD / 2; ++i) o[i] = 0.0f;
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};  // per row: base-2 max, partial sum

    // S = Q·K_jᵀ into `s`, one group (hd/16 k16 steps; Q rows 64·cw.. of the block).
    auto issue_s = [&](int j) {
        const int st = j & 1;
        lf::mbarrier_wait_parity(&k_full[st], (unsigned)(j >> 1) & 1u);
        lf::wgmma_fence_operands(s);
        lf::wgmma_fence();
        LF_UNROLL
        for (int kk = 0; kk < HD / 16; ++kk) {
            const unsigned off = (kk / 4) * kBox + 32 * (kk % 4);
            const lf::u64 da = lf::make_smem_desc(qs + off + cw * 64 * kRow, 16, kAtom, lf::Swizzle::b128);
            const lf::u64 db = lf::make_smem_desc(ks(st) + off, 16, kAtom, lf::Swizzle::b128);
            lf::wgmma_m64nNk16<T, kBC>(s, da, db, kk > 0);
        }
        lf::wgmma_commit();
        lf::wgmma_fence_operands(s);
    };
    // O += P·V_j, one group: V's 128 keys × hd values as an MN-major B (16 keys per k16 step,
    // rows 128 bytes apart, 8-key groups SBO = 1024 apart, 64-column boxes LBO = 16 KiB apart).
    auto issue_pv = [&](int j) {
        const int st = j & 1;
        lf::mbarrier_wait_parity(&v_full[st], (unsigned)(j >> 1) & 1u);
        lf::wgmma_fence_operands(o);
        pin(pa);
        lf::wgmma_fence();
        LF_UNROLL
        for (int kk = 0; kk < kBC / 16; ++kk) {
            const lf::u64 db = lf::make_smem_desc(vs(st) + kk * 16 * kRow, kBox, kAtom, lf::Swizzle::b128);
            lf::wgmma_rs_m64nNk16<T, HD, true>(o, pa[kk], db, true);
        }
        lf::wgmma_commit();
        lf::wgmma_fence_operands(o);
        pin(pa);
    };
    // The softmax of tile j on `s` (in place: s becomes P in f32): the new max, α, l. s[i] is
    // row g + 8·((i / 2) % 2) of the warp's 16, key j·128 + 8·(i / 4) + 2·tq + i % 2.
    auto softmax = [&](int j, float (&alpha)[2]) {
        const long long j0 = (long long)j * kBC;
        const bool diag = j0 + kBC - 1 > rw;  // some key of the tile is above some row's diagonal
        float mt[2] = {neg_inf(), neg_inf()};
        LF_UNROLL
        for (int i = 0; i < kBC / 2; ++i) {
            const long long key = j0 + 8 * (i / 4) + 2 * tq + (i & 1);
            float v = s[i] * sl2;
            if (diag && key > row[(i >> 1) & 1]) v = neg_inf();
            s[i] = v;
            mt[(i >> 1) & 1] = fmaxf(mt[(i >> 1) & 1], v);
        }
        LF_UNROLL
        for (int r = 0; r < 2; ++r) {
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
            mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
            // Key 0 is below every row's diagonal and every tile starts at or below the
            // block's first row: each row has an unmasked key in every tile, so the max is
            // finite; α = 0 on the first tile (m = −inf).
            const float mn = fmaxf(m[r], mt[r]);
            alpha[r] = exp2f(m[r] - mn);
            m[r] = mn;
            l[r] *= alpha[r];
        }
        LF_UNROLL
        for (int i = 0; i < kBC / 2; ++i) {
            const float pe = exp2f(s[i] - m[(i >> 1) & 1]);  // 0 where masked
            s[i] = pe;
            l[(i >> 1) & 1] += pe;
        }
    };
    // P (f32 in `s`) → A fragments: k16 step kk holds s[8kk .. 8kk + 7] as four pairs
    // (row g, keys 2tq..), (row g + 8, 2tq..), (row g, 2tq + 8..), (row g + 8, 2tq + 8..).
    auto pack_p = [&]() {
        LF_UNROLL
        for (int kk = 0; kk < kBC / 16; ++kk)
            LF_UNROLL
            for (int q = 0; q < 4; ++q)
                pa[kk][q] = lf::pack2(lf::from_f32<T>(s[8 * kk + 2 * q]), lf::from_f32<T>(s[8 * kk + 2 * q + 1]));
    };

    lf::mbarrier_wait_parity(q_full, 0);
    float alpha[2];
    issue_s(0);
    lf::wgmma_wait<0>();
    lf::wgmma_fence_operands(s);
    release(&k_empty[0]);
    softmax(0, alpha);
    pack_p();
    for (int j = 1; j < ntiles; ++j) {
        issue_s(j);
        issue_pv(j - 1);
        lf::wgmma_wait<1>();  // S_j is in; the P·V of tile j − 1 may still run
        lf::wgmma_fence_operands(s);
        release(&k_empty[j & 1]);
        softmax(j, alpha);
        lf::wgmma_wait<0>();  // P·V of tile j − 1 is done: V's stage and the fragments are free
        lf::wgmma_fence_operands(o);
        pin(pa);
        release(&v_empty[(j - 1) & 1]);
        LF_UNROLL
        for (int i = 0; i < HD / 2; ++i) o[i] *= alpha[(i >> 1) & 1];
        pack_p();
    }
    issue_pv(ntiles - 1);
    lf::wgmma_wait<0>();
    lf::wgmma_fence_operands(o);
    release(&v_empty[(ntiles - 1) & 1]);

    // Epilogue: l across the quad, lse, y = O / l from registers: o[i] is row
    // g + 8·((i / 2) % 2), column 8·(i / 4) + 2·tq + i % 2 of the head.
    float inv[2];
    LF_UNROLL
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (tq == 0) p.lse[(b * p.h + h) * p.t + row[r]] = m[r] * kLn2 + logf(l[r]);
        inv[r] = 1.0f / l[r];
    }
    T* y = static_cast<T*>(p.out) + b * p.t * p.c + h * HD + 2 * tq;
    LF_UNROLL
    for (int i = 0; i < HD / 2; i += 2) {
        const int r = (i >> 1) & 1;
        const unsigned v = lf::pack2(lf::from_f32<T>(o[i] * inv[r]), lf::from_f32<T>(o[i + 1] * inv[r]));
        T* dst = y + row[r] * p.c + 8 * (i / 4);
#if defined(LORAFUSE_SIM)
        memcpy(dst, &v, 4);
#else
        *reinterpret_cast<unsigned*>(dst) = v;
#endif
    }
}

// ---- The backward: dk, dv per 128-key block, then dq per 128-query block ----

constexpr int kRows = 64;                      // rows of a streamed tile and of a TMA box
constexpr unsigned kHalf = kRows * kRow;       // one 64-row box: 8 KiB
constexpr int kStages = 3;                     // streamed tiles in flight

// Shared memory of both backward kernels: two resident operands of 128 rows (Q and gy for
// dq, K and V for dkv; 64-column boxes of 128 rows, each loaded as two 64-row TMA boxes),
// then kStages stages of two streamed operands of 64 rows (K and V for dq, Q and gy for
// dkv), then the barriers: fixed_full, full[kStages], empty[kStages].
template <int HD>
struct BwdCfg {
    static_assert(HD == 64, "the wgmma backward is instantiated at hd 64 (see the header)");
    static constexpr int kBoxes = HD / 64;
    static constexpr unsigned kFixed = kBoxes * 2 * kHalf;  // 128 rows × HD
    static constexpr unsigned kStream = kBoxes * kHalf;     // 64 rows × HD
    static constexpr unsigned kA = 0, kB = kFixed, kS = 2 * kFixed;
    static constexpr unsigned kBars = kS + kStages * 2 * kStream;
    static constexpr unsigned kSmemBytes = kAtom + kBars + (1 + 2 * kStages) * 8;
    static_assert(kSmemBytes <= 227 * 1024, "fits an sm_90 block's shared memory");
};

template <int HD>
__device__ __forceinline__ void check_bwd(const AttentionWgmmaBwdParams& p) {
    if (p.h <= 0 || p.c % p.h != 0 || p.c / p.h != HD || p.t % kBM != 0 || blockDim.x != kThreads ||
        (long long)gridDim.x * kBM != p.t)
        __trap();
}

// The barriers and operand tiles of a backward block, in the layout of BwdCfg.
template <int HD>
struct BwdSmem {
    using C = BwdCfg<HD>;
    unsigned char* base;
    lf::u64* fixed_full;
    lf::u64* full;   // [kStages]: both streamed operands of the stage landed
    lf::u64* empty;  // [kStages]: every consumer warp is done with the stage

    __device__ explicit BwdSmem(unsigned char* raw) {
        base = raw + ((kAtom - (lf::smem_addr(raw) % kAtom)) % kAtom);
        fixed_full = reinterpret_cast<lf::u64*>(base + C::kBars);
        full = fixed_full + 1;
        empty = full + kStages;
    }
    __device__ unsigned char* fixed(int which) const { return base + (which == 0 ? C::kA : C::kB); }
    __device__ unsigned char* stream(int stage, int which) const {
        return base + C::kS + (2 * stage + which) * C::kStream;
    }
    // Thread 0 initialises the barriers; everyone waits for it.
    __device__ void init() const {
        if (threadIdx.x == 0) {
            lf::mbarrier_init(fixed_full, 1);
            for (int s = 0; s < kStages; ++s) {
                lf::mbarrier_init(&full[s], 1);
                lf::mbarrier_init(&empty[s], kConsumerWarps);
            }
        }
        __syncthreads();  // the barriers are initialised before anyone waits on them
    }
    // The producer's loads (thread 0 of warpgroup 0): the two resident 128-row operands from
    // rows `row` of maps (m0, col0) and (m1, col1), then per streamed tile n the 64-row
    // operands at rows row_of(n), into stage n % kStages once the consumers have freed it.
    template <typename RowOf>
    __device__ void produce(const lf::TensorMap* m0, int col0, const lf::TensorMap* m1, int col1, int row,
                            const lf::TensorMap* s0, int scol0, const lf::TensorMap* s1, int scol1, int ntiles,
                            RowOf row_of) const {
        lf::mbarrier_arrive_expect_tx(fixed_full, 2 * C::kFixed);
        for (int x = 0; x < C::kBoxes; ++x)
            for (int half = 0; half < 2; ++half) {
                const unsigned off = x * 2 * kHalf + half * kHalf;
                lf::tma_load_2d(fixed(0) + off, m0, col0 + 64 * x, row + kRows * half, fixed_full);
                lf::tma_load_2d(fixed(1) + off, m1, col1 + 64 * x, row + kRows * half, fixed_full);
            }
        for (int n = 0; n < ntiles; ++n) {
            const int s = n % kStages;
            lf::mbarrier_wait_parity(&empty[s], ((unsigned)(n / kStages) & 1u) ^ 1u);  // freed last round
            lf::mbarrier_arrive_expect_tx(&full[s], 2 * C::kStream);
            for (int x = 0; x < C::kBoxes; ++x) {
                lf::tma_load_2d(stream(s, 0) + x * kHalf, s0, scol0 + 64 * x, row_of(n), &full[s]);
                lf::tma_load_2d(stream(s, 1) + x * kHalf, s1, scol1 + 64 * x, row_of(n), &full[s]);
            }
        }
    }
};

// acc = A·Bᵀ over the head dim: A the consumer's 64 rows of a resident 128-row operand, B a
// streamed 64-row operand, both K-major (hd/16 wgmma m64n64k16; no commit).
template <typename T, int HD>
__device__ __forceinline__ void mma_rows(float (&acc)[kRows / 2], const unsigned char* a, int cw,
                                         const unsigned char* b) {
    LF_UNROLL
    for (int kk = 0; kk < HD / 16; ++kk) {
        const unsigned off = 32 * (kk % 4);
        const lf::u64 da =
            lf::make_smem_desc(a + (kk / 4) * 2 * kHalf + cw * kHalf + off, 16, kAtom, lf::Swizzle::b128);
        const lf::u64 db = lf::make_smem_desc(b + (kk / 4) * kHalf + off, 16, kAtom, lf::Swizzle::b128);
        lf::wgmma_m64nNk16<T, kRows>(acc, da, db, kk > 0);
    }
}

// The SS group of streamed tile n once it has landed: acc0 = fixed(0)·stream(0)ᵀ and
// acc1 = fixed(1)·stream(1)ᵀ over the head dim (Sᵀ and dPᵀ in dkv, S and dP in dq), one commit.
template <typename T, int HD>
__device__ __forceinline__ void issue_ss(const BwdSmem<HD>& sm, int n, int cw, float (&acc0)[kRows / 2],
                                         float (&acc1)[kRows / 2]) {
    const int st = n % kStages;
    lf::mbarrier_wait_parity(&sm.full[st], (unsigned)(n / kStages) & 1u);
    lf::wgmma_fence_operands(acc0);
    lf::wgmma_fence_operands(acc1);
    lf::wgmma_fence();
    mma_rows<T, HD>(acc0, sm.fixed(0), cw, sm.stream(st, 0));
    mma_rows<T, HD>(acc1, sm.fixed(1), cw, sm.stream(st, 1));
    lf::wgmma_commit();
    lf::wgmma_fence_operands(acc0);
    lf::wgmma_fence_operands(acc1);
}

// acc += P·B: P from registers (4 k16 steps over the streamed tile's 64 rows), B the streamed
// 64-row operand read MN-major (rows 128 bytes apart, 8-row groups SBO = 1024 apart,
// 64-column boxes LBO = 8 KiB apart; no commit).
template <typename T, int HD>
__device__ __forceinline__ void mma_p(float (&acc)[HD / 2], const unsigned (&pa)[kRows / 16][4],
                                      const unsigned char* b) {
    LF_UNROLL
    for (int kk = 0; kk < kRows / 16; ++kk) {
        const lf::u64 db = lf::make_smem_desc(b + kk * 16 * kRow, kHalf, kAtom, lf::Swizzle::b128);
        lf::wgmma_rs_m64nNk16<T, HD, true>(acc, pa[kk], db, true);
    }
}

// An f32 accumulator tile (m64n64) → A fragments of T for the next wgmma (k = its columns).
template <typename T>
__device__ __forceinline__ void pack(unsigned (&pa)[kRows / 16][4], const float (&v)[kRows / 2]) {
    LF_UNROLL
    for (int kk = 0; kk < kRows / 16; ++kk)
        LF_UNROLL
        for (int q = 0; q < 4; ++q)
            pa[kk][q] = lf::pack2(lf::from_f32<T>(v[8 * kk + 2 * q]), lf::from_f32<T>(v[8 * kk + 2 * q + 1]));
}

// Stores a warpgroup's 64 × HD f32 tile of rows row[0..1] (this thread's two) into columns
// col.. of rows of `ld` elements, as 4-byte pairs.
template <typename T, int HD>
__device__ __forceinline__ void store_rows(T* out, long long ld, const long long (&row)[2], int tq,
                                           const float (&v)[HD / 2]) {
    LF_UNROLL
    for (int i = 0; i < HD / 2; i += 2) {
        const unsigned u = lf::pack2(lf::from_f32<T>(v[i]), lf::from_f32<T>(v[i + 1]));
        T* dst = out + row[(i >> 1) & 1] * ld + 8 * (i / 4) + 2 * tq;
#if defined(LORAFUSE_SIM)
        memcpy(dst, &u, 4);
#else
        *reinterpret_cast<unsigned*>(dst) = u;
#endif
    }
}

// A backward consumer's loop over its tiles n0 … n_end − 1 (FA3's intra-warpgroup overlap):
// per tile, issue the SS group of tile n (issue_s) and the RS group of tile n − 1 (issue_r);
// wait for the first, run tile n's element-wise pass (grads) while the second runs; wait for
// it, free stage n − 1, pack tile n's fragments for the next RS group. fence_s / fence_r pin
// the registers each group writes or reads around its wait.
template <class IssueS, class IssueR, class FenceS, class Grads, class FenceR, class Pack>
__device__ __forceinline__ void consume(int n0, int n_end, lf::u64* empty, IssueS issue_s, IssueR issue_r,
                                        FenceS fence_s, Grads grads, FenceR fence_r, Pack pack_next) {
    issue_s(n0);
    lf::wgmma_wait<0>();
    fence_s();
    grads(n0);
    pack_next();
    for (int n = n0 + 1; n < n_end; ++n) {
        issue_s(n);
        issue_r(n - 1);
        lf::wgmma_wait<1>();  // tile n's SS group is in; tile n − 1's RS group may still run
        fence_s();
        grads(n);
        lf::wgmma_wait<0>();  // tile n − 1's stage and fragments are free
        fence_r();
        release(&empty[(n - 1) % kStages]);
        pack_next();
    }
    issue_r(n_end - 1);
    lf::wgmma_wait<0>();
    fence_r();
    release(&empty[(n_end - 1) % kStages]);
}

// dk, dv of 128 keys (block x: key block x, the longest first), streaming the 64-row query
// tiles from the diagonal on. Consumer c owns keys 64c.. of the block: Sᵀ = K·Qᵀ and
// dPᵀ = V·gyᵀ (K-major, from shared memory), Pᵀ = 2^(Sᵀ·s' − lse₂) masked, dSᵀ =
// Pᵀ∘(dPᵀ − D)·scale, dv += Pᵀ·gy and dk += dSᵀ·Q (P, dS from registers, gy and Q MN-major).
template <typename T, int HD>
__device__ void backward_dkv(const AttentionWgmmaBwdParams& p) {
    check_bwd<HD>(p);
    LF_DYNAMIC_SMEM(unsigned char, raw);
    const BwdSmem<HD> sm(raw);
    sm.init();
    const long long kb = blockIdx.x, k0 = kb * kBM, h = blockIdx.y, b = blockIdx.z;
    const long long bh = (b * p.h + h) * p.t;
    const int first = (int)(k0 / kRows);            // the query tile holding key k0
    const int ntiles = (int)(p.t / kRows) - first;  // query tiles first … T/64 − 1
    const int wg = (int)(threadIdx.x / 128u);

    if (wg == 0) {
        lf::setmaxnreg_dec<24>();
        if (threadIdx.x != 0) return;
        const int row0 = (int)(b * p.t);
        const int col_q = (int)(h * HD), col_k = (int)(p.c + h * HD), col_v = (int)(2 * p.c + h * HD);
        sm.produce(&p.qkv, col_k, &p.qkv, col_v, row0 + (int)k0, &p.qkv, col_q, &p.gy, col_q, ntiles,
                   [&](int n) { return row0 + (first + n) * kRows; });
        return;
    }

    lf::setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int warp = (int)(threadIdx.x / 32u), lane = (int)(threadIdx.x & 31u);
    const int g = lane / 4, tq = lane % 4;
    const long long kw = k0 + 64 * cw + 16 * (warp % 4);  // the warp's first key
    const long long key[2] = {kw + g, kw + g + 8};
    const float sl2 = p.scale * kLog2e;

    float st[kRows / 2], dpt[kRows / 2];    // Sᵀ then Pᵀ; dPᵀ then dSᵀ (m64n64)
    float dk[HD / 2], dv[HD / 2];           // m64n{hd}
    unsigned pa[kRows / 16][4], pb[kRows / 16][4];  // Pᵀ and dSᵀ of the previous tile
    float lse2[kRows / 4], dd[kRows / 4];   // the tile's statistics at this thread's columns
    LF_UNROLL
    for (int i = 0; i < HD / 2; ++i) dk[i] = dv[i] = 0.0f;

    // Query column i / 2 pair of the accumulators: 8·(i / 4) + 2·tq + i % 2 of the tile.
    auto stats = [&](int n) {
        const long long q0 = (long long)(first + n) * kRows;
        LF_UNROLL
        for (int i = 0; i < kRows / 4; ++i) {
            const long long q = q0 + 8 * (i / 2) + 2 * tq + (i & 1);
            lse2[i] = p.lse[bh + q] * kLog2e;
            dd[i] = p.delta[bh + q];
        }
    };
    auto issue_kv = [&](int n) {
        const int s = n % kStages;
        lf::wgmma_fence_operands(dv);
        lf::wgmma_fence_operands(dk);
        pin(pa);
        pin(pb);
        lf::wgmma_fence();
        mma_p<T, HD>(dv, pa, sm.stream(s, 1));
        mma_p<T, HD>(dk, pb, sm.stream(s, 0));
        lf::wgmma_commit();
        lf::wgmma_fence_operands(dv);
        lf::wgmma_fence_operands(dk);
        pin(pa);
        pin(pb);
    };
    // st[i] is key g + 8·((i / 2) % 2) of the warp's 16, query 8·(i / 4) + 2·tq + i % 2.
    auto grads = [&](int n) {
        const long long q0 = (long long)(first + n) * kRows;
        const bool diag = q0 < kw + 15;  // some query of the tile precedes some key of the warp
        LF_UNROLL
        for (int i = 0; i < kRows / 2; ++i) {
            const int c = 2 * (i / 4) + (i & 1);
            const long long q = q0 + 8 * (i / 4) + 2 * tq + (i & 1);
            const float pe = diag && q < key[(i >> 1) & 1] ? 0.0f : exp2f(fmaf(st[i], sl2, -lse2[c]));
            st[i] = pe;
            dpt[i] = pe * (dpt[i] - dd[c]) * p.scale;
        }
    };

    // Consumer 1's keys all follow the first tile's queries: it frees that stage unread.
    const int n0 = cw;
    if (cw == 1) release(&sm.empty[0]);
    lf::mbarrier_wait_parity(sm.fixed_full, 0);
    consume(n0, ntiles, sm.empty, [&](int n) {
        stats(n);
        issue_ss<T, HD>(sm, n, cw, st, dpt);
    }, issue_kv, [&] {
        lf::wgmma_fence_operands(st);
        lf::wgmma_fence_operands(dpt);
    }, grads, [&] {
        lf::wgmma_fence_operands(dv);
        lf::wgmma_fence_operands(dk);
        pin(pa);
        pin(pb);
    }, [&] {
        pack<T>(pa, st);
        pack<T>(pb, dpt);
    });

    T* out = static_cast<T*>(p.dqkv) + b * p.t * 3 * p.c + h * HD;
    const long long rows[2] = {key[0], key[1]};
    store_rows<T, HD>(out + p.c, 3 * p.c, rows, tq, dk);
    store_rows<T, HD>(out + 2 * p.c, 3 * p.c, rows, tq, dv);
}

// dq of 128 query rows (block x: query block T/128 − 1 − x, the longest first), streaming the
// 64-key tiles 0 … of its causal band. Consumer c owns rows 64c.. of the block: S = Q·Kᵀ and
// dP = gy·Vᵀ (K-major, from shared memory), P = 2^(S·s' − lse₂) masked, dS = P∘(dP − D)·scale,
// dq += dS·K (dS from registers, K MN-major).
template <typename T, int HD>
__device__ void backward_dq(const AttentionWgmmaBwdParams& p) {
    check_bwd<HD>(p);
    LF_DYNAMIC_SMEM(unsigned char, raw);
    const BwdSmem<HD> sm(raw);
    sm.init();
    const long long qb = (long long)gridDim.x - 1 - blockIdx.x;  // longest first
    const long long q0 = qb * kBM, h = blockIdx.y, b = blockIdx.z;
    const long long bh = (b * p.h + h) * p.t;
    const int ntiles = (int)(q0 / kRows) + 2;  // keys 0 … q0 + 127
    const int wg = (int)(threadIdx.x / 128u);

    if (wg == 0) {
        lf::setmaxnreg_dec<24>();
        if (threadIdx.x != 0) return;
        const int row0 = (int)(b * p.t);
        const int col_q = (int)(h * HD), col_k = (int)(p.c + h * HD), col_v = (int)(2 * p.c + h * HD);
        sm.produce(&p.qkv, col_q, &p.gy, col_q, row0 + (int)q0, &p.qkv, col_k, &p.qkv, col_v, ntiles,
                   [&](int n) { return row0 + n * kRows; });
        return;
    }

    lf::setmaxnreg_inc<240>();
    const int cw = wg - 1;
    const int warp = (int)(threadIdx.x / 32u), lane = (int)(threadIdx.x & 31u);
    const int g = lane / 4, tq = lane % 4;
    const long long rw = q0 + 64 * cw + 16 * (warp % 4);  // the warp's first query row
    const long long row[2] = {rw + g, rw + g + 8};
    const float sl2 = p.scale * kLog2e;
    const float lse2[2] = {p.lse[bh + row[0]] * kLog2e, p.lse[bh + row[1]] * kLog2e};
    const float dd[2] = {p.delta[bh + row[0]], p.delta[bh + row[1]]};

    float s[kRows / 2], dp[kRows / 2];  // S then P; dP then dS (m64n64)
    float dq[HD / 2];
    unsigned pa[kRows / 16][4];         // dS of the previous tile
    LF_UNROLL
    for (int i = 0; i < HD / 2; ++i) dq[i] = 0.0f;

    auto issue_s = [&](int n) { issue_ss<T, HD>(sm, n, cw, s, dp); };
    auto issue_dq = [&](int n) {
        lf::wgmma_fence_operands(dq);
        pin(pa);
        lf::wgmma_fence();
        mma_p<T, HD>(dq, pa, sm.stream(n % kStages, 0));
        lf::wgmma_commit();
        lf::wgmma_fence_operands(dq);
        pin(pa);
    };
    // s[i] is row g + 8·((i / 2) % 2) of the warp's 16, key 8·(i / 4) + 2·tq + i % 2.
    auto grads = [&](int n) {
        const long long j0 = (long long)n * kRows;
        const bool diag = j0 + kRows - 1 > rw;  // some key of the tile follows some row
        LF_UNROLL
        for (int i = 0; i < kRows / 2; ++i) {
            const int r = (i >> 1) & 1;
            const long long key = j0 + 8 * (i / 4) + 2 * tq + (i & 1);
            const float pe = diag && key > row[r] ? 0.0f : exp2f(fmaf(s[i], sl2, -lse2[r]));
            dp[i] = pe * (dp[i] - dd[r]) * p.scale;
        }
    };

    // Consumer 0's rows all precede the last tile's keys: it stops one tile early (the
    // producer waits for no stage after the last, so that stage needs no release).
    const int n_end = ntiles - 1 + cw;
    lf::mbarrier_wait_parity(sm.fixed_full, 0);
    consume(0, n_end, sm.empty, issue_s, issue_dq, [&] {
        lf::wgmma_fence_operands(s);
        lf::wgmma_fence_operands(dp);
    }, grads, [&] {
        lf::wgmma_fence_operands(dq);
        pin(pa);
    }, [&] { pack<T>(pa, dp); });

    store_rows<T, HD>(static_cast<T*>(p.dqkv) + b * p.t * 3 * p.c + h * HD, 3 * p.c, row, tq, dq);
}

// The kernel bodies where wgmma exists (sm_90a, the simulator); elsewhere a trap — the host
// launches these kernels only from an sm_90a cubin (src/ops/attention/wgmma.rs).
enum class Pass { fwd, dkv, dq };

template <Pass K, typename T, int HD, typename P>
__device__ __forceinline__ void run(const P& p) {
#if defined(LF_SM90A) || defined(LORAFUSE_SIM)
    if constexpr (K == Pass::fwd) {
        forward<T, HD>(p);
    } else if constexpr (K == Pass::dkv) {
        backward_dkv<T, HD>(p);
    } else {
        backward_dq<T, HD>(p);
    }
#else
    (void)p;
    __trap();
#endif
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma64_fwd_bf16(const __grid_constant__ AttentionWgmmaParams p) {
    run<Pass::fwd, bf16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma64_fwd_f16(const __grid_constant__ AttentionWgmmaParams p) {
    run<Pass::fwd, f16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma128_fwd_bf16(const __grid_constant__ AttentionWgmmaParams p) {
    run<Pass::fwd, bf16, 128>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma128_fwd_f16(const __grid_constant__ AttentionWgmmaParams p) {
    run<Pass::fwd, f16, 128>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma64_dkv_bwd_bf16(const __grid_constant__ AttentionWgmmaBwdParams p) {
    run<Pass::dkv, bf16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma64_dkv_bwd_f16(const __grid_constant__ AttentionWgmmaBwdParams p) {
    run<Pass::dkv, f16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma64_dq_bwd_bf16(const __grid_constant__ AttentionWgmmaBwdParams p) {
    run<Pass::dq, bf16, 64>(p);
}
extern "C" __global__ void __launch_bounds__(kThreads, 1)
    attention_wgmma64_dq_bwd_f16(const __grid_constant__ AttentionWgmmaBwdParams p) {
    run<Pass::dq, f16, 64>(p);
}
