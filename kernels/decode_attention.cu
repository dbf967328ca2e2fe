// decode_attention.cu — cached causal attention for incremental decoding: the queries of N
// new positions against a key/value cache plus those positions' own keys and values, which
// the same launch appends to the cache; flash-decoding style (the keys split over blocks,
// an online softmax in f32 per block, a fixed-order combine).
//
// Math (the CPU reference is src/ops/decode_attention/cpu.rs; per batch b, head h and new
// row i < N at absolute position L + i, L = the cache's length before the call; hd = C/H;
// scale = 1/√hd; the keys j of row i are 0 … L + i: j < L from the cache, j ≥ L row j − L
// of the new block, causal within it):
//   k_cache[b, h, L + i, :] = k_new[b, i, h, :],  v_cache likewise        (out =) caches
//   s_ij = (q_i · k_j)·scale;  P_ij = softmax_j(s_ij);  y_i = Σ_j P_ij v_j   (out =) y
//   decode_attention_fwd (one block per (row i, split s); split s owns keys
//   s·chunk … min((s+1)·chunk, L + i + 1) − 1, possibly none; warp w the keys j0 + 4u + w,
//   u < 4, of each tile of 16 keys j0 = s·chunk, s·chunk + 16, …):
//       per tile, per warp: m' = max(m, max_u s_iju);  α = exp(m − m');  e_u = exp(s_iju − m')
//                           l = l·α + Σ_u e_u;  o = o·α + Σ_u e_u v_ju;  m = m'
//       per block (warps w = 0 … 3 in order): M = max_w m_w; f_w = exp(m_w − M) (0 for a
//       warp with no key); l_s = Σ_w f_w l_w; o_s = Σ_w f_w o_w; m_s = M
//       one split (S = 1):  y_i = o_s / l_s                                 (out =) y
//       S > 1: o_s, (m_s, l_s) into the f32 workspace                       (out =) part, stats
//   decode_attention_combine_fwd (S > 1; one block per row i): splits in order,
//       M = max_s m_s;  f_s = exp(m_s − M) (0 for an empty split);
//       y_i = Σ_s f_s o_s / Σ_s f_s l_s                                     (out =) y
//   Each dot product q_i · k_j is split over the 32 lanes (lane ℓ: columns ℓ, ℓ + 32, …) and
//   summed by a fixed xor butterfly, which gives every lane the same bits. Every order is
//   fixed by (B, H, N, L) alone, so results are bitwise identical run to run. The kernel
//   reads cache rows < L only: rows ≥ L (unwritten, NaN-poisoned in the simulator) are
//   never read, and the new rows come from qkv.
//
// Shapes: qkv [B, N, 3C] (columns 0..C queries, C..2C keys, 2C..3C values, head h at
// h·hd..), k_cache and v_cache [B, H, Lmax, hd] with L + N ≤ Lmax, y [B, N, C] (heads
// merged, GPT-2's layout), part [B, H, N, S, hd] and stats [B, H, N, S, 2] f32 (S > 1);
// hd ≤ 128 (4 columns per lane; the launcher rejects more).
//
// Dtypes: qkv, caches and y bf16, f16 or f32 (the suffix); the cache copy is exact (the
// storage type both sides); q, k, v widened to f32 on load; scores, softmax, sums and the
// workspace in f32 (expf); y rounded once (nearest even).
//
// FLOPs and bytes per call (s bytes per element, K = Σ_i (L + i + 1) = N·L + N(N+1)/2 keys
// over the rows): 4·B·C·K FLOPs (q·k and P·v) + B·H·K exponentials; DRAM bytes: K and V read
// once per row, 2·s·B·C·K, + q, y and the appended rows, 4·s·B·N·C, + the workspace
// (2·4·B·H·N·S·(hd + 2), S > 1). Decode is memory-bound: one token (N = 1) reads the
// cache once, 2·s·B·C·(L + 1), at 1 FLOP per byte (s = 2).
// Headline (GPT-2 124M decode, bf16, B = 1, C = 768, H = 12, hd = 64, one token at L = 1023),
// per layer: 3.1 MB of K/V and 3.1 MFLOP → floor ~1.0 µs at ~3.0 TB/s (H100 measured copy),
// ~0.73 µs at ~4.3 TB/s (H200). The launcher picks S = 16 splits of 64 keys: 192 blocks
// (one per (split, head)), 16 KB of K/V each, in 4 tiles of 4 keys per warp with the K and V
// loads of a tile issued together (4 KB in flight per block), + the combine launch (12
// blocks, 51 KB of workspace). Predicted ~20 % of the floor (~5 µs per layer: 4 dependent
// tile round trips to DRAM of ~0.7 µs each, plus the second launch), because one token at
// B = 1 is latency- and launch-bound: 12 (batch, head) pairs cannot fill 132 SMs without the
// split, and each block keeps only 4 KB in flight. At B = 8 (96 pairs, S = 3) the same
// design reaches ~40 %. Prefill through this kernel (N = prompt length, L = 0) re-reads the
// K/V rows once per query row (from L2); causal_attention's tiled kernels are the faster
// path for a long prompt. Not measured on a GPU.
//
// Launch geometry: decode_attention_fwd grid (N·S, H, B) (blockIdx.x = i·S + s), 128
// threads = 4 warps, __launch_bounds__(128), dynamic shared memory 4·(4·hd + 8) bytes (each
// warp's o, m and l: 2,080 bytes at hd = 128); chunk (a multiple of 16 keys) and S chosen on
// the host (src/ops/decode_attention/cuda.rs: at least 64 keys per split, about 256 blocks,
// at most one split per 64 keys); split 0's block of row i writes the cache row L + i (its
// threads over the hd columns), after its reads. decode_attention_combine_fwd grid (N, H, B),
// 128 threads, thread e < hd one output column. No atomics, no inter-block dependency
// within a launch (blocks read cache rows < L, which no block writes).
#include "common.cuh"

// Rust twin: `DecodeAttentionParams` in src/ops/decode_attention/cuda.rs (a test checks the size).
struct DecodeAttentionParams {
    const void* qkv;     // [B, N, 3C]: the new positions' fused q, k, v
    void* k_cache;       // [B, H, Lmax, hd]
    void* v_cache;       // [B, H, Lmax, hd]
    void* out;           // y [B, N, C]
    float* part;         // [B, H, N, S, hd]: each split's unnormalised o (S > 1)
    float* stats;        // [B, H, N, S, 2]: each split's (m, l) (S > 1)
    long long b, n, c, h;
    long long pos;       // L: the cache's length before the call
    long long max_len;   // Lmax
    long long chunk;     // keys per split (a multiple of 16)
    int splits;          // S
    float scale;         // 1/√hd
};

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;  // 4
constexpr int kU = 4;                  // keys per warp per tile
constexpr int kTile = kWarps * kU;     // keys per block per tile (16)
constexpr int kG = 4;                  // head columns per lane: hd ≤ 32·kG = 128
constexpr int kMaxHd = 32 * kG;

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }

// A launch whose parameters are not the kernel's traps (the launcher never makes one).
__device__ __forceinline__ void check(const DecodeAttentionParams& p) {
    const long long hd = p.c / p.h;
    if (hd < 1 || hd > kMaxHd || p.splits < 1 || p.chunk < 1 || p.chunk % kTile != 0 ||
        p.pos + p.n > p.max_len)
        __trap();
}

// Σ over the warp's lanes by a fixed xor butterfly: every lane ends with the same bits
// (each step adds the same two values on both lanes of a pair; addition commutes).
__device__ __forceinline__ float warp_sum(float v) {
    LF_UNROLL
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// (m, l, o) of `parts` partial softmaxes (m = −inf for one with no key) merged in order:
// M = max m, f = exp(m − M), l = Σ f·l, o = Σ f·o. `m`, `l` are read at stride `sstride`,
// the o of part k at `o[k · ostride]`.
__device__ __forceinline__ void merge(int parts, const float* m, const float* l, int sstride,
                                      const float* o, long long ostride, float& mo, float& lo,
                                      float& oo) {
    float mb = neg_inf();
    for (int k = 0; k < parts; ++k) mb = fmaxf(mb, m[k * sstride]);
    float lb = 0.0f, ob = 0.0f;
    for (int k = 0; k < parts; ++k) {
        const float mk = m[k * sstride];
        const float f = mk == neg_inf() ? 0.0f : expf(mk - mb);
        lb += f * l[k * sstride];
        ob += f * o[k * ostride];
    }
    mo = mb;
    lo = lb;
    oo = ob;
}

template <typename T>
__device__ __forceinline__ void decode(const DecodeAttentionParams& p) {
    check(p);
    LF_DYNAMIC_SMEM(float, sm);
    const int hd = (int)(p.c / p.h);
    const long long c = p.c, ldq = 3 * p.c;
    const long long i = (long long)(blockIdx.x / (unsigned)p.splits);
    const int s = (int)(blockIdx.x % (unsigned)p.splits);
    const long long h = blockIdx.y, b = blockIdx.z;
    const int warp = (int)(threadIdx.x / 32), lane = (int)(threadIdx.x % 32);
    const T* qkv = static_cast<const T*>(p.qkv);
    const T* qrow = qkv + (b * p.n + i) * ldq + h * hd;
    const T* knew = qkv + b * p.n * ldq + c + h * hd;  // new row j − L at knew + (j − L)·3C
    const T* vnew = knew + c;
    const long long head = (b * p.h + h) * p.max_len * hd;
    T* kc = static_cast<T*>(p.k_cache) + head;
    T* vc = static_cast<T*>(p.v_cache) + head;
    const long long j_begin = s * p.chunk;
    const long long j_end = lmin(p.pos + i + 1, j_begin + p.chunk);  // keys 0 … L + i

    float q[kG], o[kG];
    LF_UNROLL
    for (int g = 0; g < kG; ++g) {
        const int e = lane + 32 * g;
        q[g] = e < hd ? lf::to_f32(qrow[e]) : 0.0f;
        o[g] = 0.0f;
    }
    float m = neg_inf(), l = 0.0f;
    for (long long j0 = j_begin; j0 < j_end; j0 += kTile) {
        if (j0 + warp >= j_end) break;  // this warp's first key of the tile is past the end
        float sc[kU], vv[kU][kG];
        // The tile's K and V loads first (independent), then the reductions.
        LF_UNROLL
        for (int u = 0; u < kU; ++u) {
            const long long j = j0 + kWarps * u + warp;
            const bool live = j < j_end;
            const T* krow = j < p.pos ? kc + j * hd : knew + (j - p.pos) * ldq;
            const T* vrow = j < p.pos ? vc + j * hd : vnew + (j - p.pos) * ldq;
            float d = 0.0f;
            LF_UNROLL
            for (int g = 0; g < kG; ++g) {
                const int e = lane + 32 * g;
                const bool in = live && e < hd;
                d += in ? q[g] * lf::to_f32(krow[e]) : 0.0f;
                vv[u][g] = in ? lf::to_f32(vrow[e]) : 0.0f;
            }
            sc[u] = d;
        }
        LF_UNROLL
        for (int u = 0; u < kU; ++u) sc[u] = warp_sum(sc[u]) * p.scale;
        float mt = neg_inf();
        LF_UNROLL
        for (int u = 0; u < kU; ++u)
            if (j0 + kWarps * u + warp < j_end) mt = fmaxf(mt, sc[u]);
        const float mn = fmaxf(m, mt);
        const float al = expf(m - mn);  // 0 on the warp's first tile (m = −inf)
        l *= al;
        LF_UNROLL
        for (int g = 0; g < kG; ++g) o[g] *= al;
        LF_UNROLL
        for (int u = 0; u < kU; ++u) {
            if (j0 + kWarps * u + warp >= j_end) continue;
            const float e = expf(sc[u] - mn);
            l += e;
            LF_UNROLL
            for (int g = 0; g < kG; ++g) o[g] += e * vv[u][g];
        }
        m = mn;
    }

    float* os = sm;                 // [kWarps, hd]: each warp's o
    float* ms = os + kWarps * hd;   // [kWarps]: m
    float* ls = ms + kWarps;        // [kWarps]: l
    LF_UNROLL
    for (int g = 0; g < kG; ++g) {
        const int e = lane + 32 * g;
        if (e < hd) os[warp * hd + e] = o[g];
    }
    if (lane == 0) {
        ms[warp] = m;
        ls[warp] = l;
    }
    // Row L + i of the caches, once per row (split 0): no block of this launch reads it.
    if (s == 0) {
        for (int e = threadIdx.x; e < hd; e += kThreads) {
            kc[(p.pos + i) * hd + e] = knew[i * ldq + e];
            vc[(p.pos + i) * hd + e] = vnew[i * ldq + e];
        }
    }
    __syncthreads();  // every warp's (m, l, o) is in
    const long long row = (b * p.h + h) * p.n + i;  // (b, h, i) in the workspace
    for (int e = threadIdx.x; e < hd; e += kThreads) {
        float mb, lb, ob;
        merge(kWarps, ms, ls, 1, os + e, hd, mb, lb, ob);
        if (p.splits == 1) {
            static_cast<T*>(p.out)[(b * p.n + i) * c + h * hd + e] = lf::from_f32<T>(ob / lb);
        } else {
            const long long at = row * p.splits + s;
            p.part[at * hd + e] = ob;
            if (e == 0) {
                p.stats[2 * at] = mb;
                p.stats[2 * at + 1] = lb;
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void combine(const DecodeAttentionParams& p) {
    check(p);
    const int hd = (int)(p.c / p.h);
    const long long i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const long long at = ((b * p.h + h) * p.n + i) * p.splits;
    for (int e = threadIdx.x; e < hd; e += kThreads) {
        float mb, lb, ob;
        merge(p.splits, p.stats + 2 * at, p.stats + 2 * at + 1, 2, p.part + at * hd + e, hd, mb,
              lb, ob);
        static_cast<T*>(p.out)[(b * p.n + i) * p.c + h * hd + e] = lf::from_f32<T>(ob / lb);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) decode_attention_fwd_f32(const DecodeAttentionParams p) { decode<float>(p); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_fwd_bf16(const DecodeAttentionParams p) { decode<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_fwd_f16(const DecodeAttentionParams p) { decode<f16>(p); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_combine_fwd_f32(const DecodeAttentionParams p) { combine<float>(p); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_combine_fwd_bf16(const DecodeAttentionParams p) { combine<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) decode_attention_combine_fwd_f16(const DecodeAttentionParams p) { combine<f16>(p); }
