// embedding.cu — GPT-2's token + position embedding: the forward lookup and a
// deterministic backward (the scatter-add into both tables without atomics).
//
// Math (the CPU reference is src/ops/embedding/cpu.rs; N = B·T token positions,
// i = b·T + t):
//   forward:   out[i, j] = wte[tokens[i], j] + wpe[i mod T, j]                    (out =)
//   backward:  gwte[v, j] = Σ_{i: tokens[i] = v} gy[i, j], i in increasing order  (gwte =)
//              gwpe[t, j] = Σ_{b < B} gy[b·T + t, j] for t < T, 0 for T ≤ t < P  (gwpe =)
//   One f32 addition per term, in the reference's order: forward and both gradients equal
//   the CPU reference bit for bit. The host (which has the token ids) builds the
//   gradient's index: `order`, the positions stably sorted by token id, and `offsets`
//   [V + 1], where the positions of token v are order[offsets[v] .. offsets[v + 1]].
//
// Shapes: tokens [N] u32 (checked < V on the host before the upload); wte, gwte [V, C];
// wpe, gwpe [P, C] (T ≤ P); out, gy [B, T, C]; order [N] and offsets [V + 1] i64.
//
// Dtypes: wte, wpe, out, gy, gwte, gwpe all f32, bf16 or f16 (the suffix); the sums in
// f32; each output rounded once (nearest even).
//
// FLOPs and bytes per call (s bytes per element), GPT-2 124M, bf16, N = 8·1024, C = 768,
// V = 50257, P = 1024 (floors at ~3.0 TB/s H100 / ~4.3 TB/s H200 measured copy):
//   forward N·C FLOPs; reads the N wte rows and N wpe rows, writes out, reads the tokens:
//     3·s·N·C + 4·N = 37.8 MB → 12.6 µs / 8.8 µs (wpe is 1.6 MB, so its rows come mostly
//     from L2: ~26.8 MB from DRAM). Predicted ≥ 80 %: a block per row, its threads on the
//     row's 96 16-byte vectors (2 loads in flight each), ~30 registers → 16 blocks of 128
//     per SM: ~49 KB in flight per SM; one 64-bit modulo per row (i mod T), none per
//     element (it had a 64-bit div and two mods per element).
//   backward N·C + B·T·C FLOPs; reads gy twice (the token sums gather its rows, the
//     position sums walk the batch), writes both tables in full (gwte mostly zeros), reads
//     the index: 2·s·N·C + s·(V + P)·C + 8·(N + V + 1) = 104 MB → 35 µs / 24 µs.
//     Predicted ~80 %: zero rows are plain 16-byte stores; a token's row is a chain of
//     (order[q], then gy row) loads, short for GPT-2 text (most tokens occur a few times
//     in 8192) — a token repeated many times serialises on its block.
//   Not measured on a GPU.
//
// Launch geometry: 128 threads per block, one block per row (forward: token position i;
// backward: table row u, gwte rows first, then gwpe rows), grid-stride over rows, grid =
// min(rows, the launcher's cap); the result does not depend on the grid. The threads take
// the row's 16-byte vectors (W = 16/s channels: 4 f32, 8 bf16/f16) when C is a multiple of
// W and the tables are 16-byte aligned (then every row is), else its channels one by one;
// either way each output element is one f32 sum in the reference's order. Either table's
// rows are skipped when it needs no gradient.
#include "common.cuh"

// Rust twin: `EmbeddingParams` in src/ops/embedding/cuda.rs (a test checks the size).
struct EmbeddingParams {
    const unsigned* tokens;      // tokens [N] (forward)
    const void* wte;             // wte [V, C] (forward)
    const void* wpe;             // wpe [P, C] (forward)
    void* out;                   // out [N, C] (forward)
    const void* gy;              // gy [N, C] (backward)
    const long long* order;      // [N] positions sorted stably by token (backward)
    const long long* offsets;    // [V + 1] (backward)
    void* gwte;                  // gwte [V, C] (backward; null: not wanted)
    void* gwpe;                  // gwpe [P, C] (backward; null: not wanted)
    long long n, batch, seq, v, p, c;
};

namespace {

// out[i, :] = wte[tokens[i], :] + wpe[i mod T, :] for the rows i = blockIdx.x, + gridDim.x, …;
// the block's threads take the row's 16-byte vectors (W = lf::vec16<T>::n channels) when C
// is a multiple of W and the three tables are 16-byte aligned (then every row is), else
// its channels one by one. One 64-bit modulo per row, none per element.
template <typename T>
__device__ void forward(const EmbeddingParams& p) {
    constexpr int W = lf::vec16<T>::n;
    const T* wte = static_cast<const T*>(p.wte);
    const T* wpe = static_cast<const T*>(p.wpe);
    T* out = static_cast<T*>(p.out);
    const lf::u64 c = (lf::u64)p.c;
    const bool vec = c % W == 0 && lf::aligned16(wte) && lf::aligned16(wpe) && lf::aligned16(out);
    for (lf::u64 i = blockIdx.x; i < (lf::u64)p.n; i += gridDim.x) {
        const T* e = wte + (lf::u64)p.tokens[i] * c;
        const T* q = wpe + (i % (lf::u64)p.seq) * c;
        T* o = out + i * c;
        if (vec) {
            for (lf::u64 j = (lf::u64)threadIdx.x * W; j < c; j += (lf::u64)blockDim.x * W) {
                float a[W], b[W];
                lf::load16(e + j, a);
                lf::load16(q + j, b);
LF_UNROLL
                for (int k = 0; k < W; ++k) a[k] = a[k] + b[k];
                lf::store16(o + j, a);
            }
        } else {
            for (lf::u64 j = threadIdx.x; j < c; j += blockDim.x)
                o[j] = lf::from_f32<T>(lf::to_f32(e[j]) + lf::to_f32(q[j]));
        }
    }
}

// Table row u = blockIdx.x, + gridDim.x, … of the rows that want a gradient: u < V is
// gwte[u] (when wanted; the sum over token u's positions in order), the rest gwpe[u − V]
// (the sum over the batch); the block's threads take its channels, vectorised as the
// forward (one f32 sum per channel either way: the same additions in the same order).
template <typename T>
__device__ void backward(const EmbeddingParams& p) {
    constexpr int W = lf::vec16<T>::n;
    const T* gy = static_cast<const T*>(p.gy);
    const lf::u64 c = (lf::u64)p.c;
    const lf::u64 nte = p.gwte ? (lf::u64)p.v : 0ull;
    const lf::u64 npe = p.gwpe ? (lf::u64)p.p : 0ull;
    const bool vec = c % W == 0 && lf::aligned16(gy) && (!p.gwte || lf::aligned16(p.gwte)) &&
                     (!p.gwpe || lf::aligned16(p.gwpe));
    for (lf::u64 u = blockIdx.x; u < nte + npe; u += gridDim.x) {
        // The gy rows to add, in order: gy[order[q0 + k]] (token rows) or gy[b·T + t].
        const bool te = u < nte;
        const lf::u64 t = te ? 0ull : u - nte;
        const long long q0 = te ? p.offsets[u] : 0;
        const long long terms = te ? p.offsets[u + 1] - q0 : (t < (lf::u64)p.seq ? p.batch : 0);
        T* g = te ? static_cast<T*>(p.gwte) + u * c : static_cast<T*>(p.gwpe) + t * c;
        if (vec) {
            for (lf::u64 j = (lf::u64)threadIdx.x * W; j < c; j += (lf::u64)blockDim.x * W) {
                float s[W];
LF_UNROLL
                for (int k = 0; k < W; ++k) s[k] = 0.0f;
                for (long long q = 0; q < terms; ++q) {
                    const lf::u64 row = te ? (lf::u64)p.order[q0 + q] : (lf::u64)q * p.seq + t;
                    float a[W];
                    lf::load16(gy + row * c + j, a);
LF_UNROLL
                    for (int k = 0; k < W; ++k) s[k] = __fadd_rn(s[k], a[k]);
                }
                lf::store16(g + j, s);
            }
        } else {
            for (lf::u64 j = threadIdx.x; j < c; j += blockDim.x) {
                float s = 0.0f;
                for (long long q = 0; q < terms; ++q) {
                    const lf::u64 row = te ? (lf::u64)p.order[q0 + q] : (lf::u64)q * p.seq + t;
                    s = __fadd_rn(s, lf::to_f32(gy[row * c + j]));
                }
                g[j] = lf::from_f32<T>(s);
            }
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(128) embedding_fwd_f32(const EmbeddingParams p) { forward<float>(p); }
extern "C" __global__ void __launch_bounds__(128) embedding_fwd_bf16(const EmbeddingParams p) { forward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) embedding_fwd_f16(const EmbeddingParams p) { forward<f16>(p); }

extern "C" __global__ void __launch_bounds__(128) embedding_bwd_f32(const EmbeddingParams p) { backward<float>(p); }
extern "C" __global__ void __launch_bounds__(128) embedding_bwd_bf16(const EmbeddingParams p) { backward<bf16>(p); }
extern "C" __global__ void __launch_bounds__(128) embedding_bwd_f16(const EmbeddingParams p) { backward<f16>(p); }
