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
// FLOPs and bytes per call (s bytes per element): forward N·C FLOPs, 3·s·N·C + 4·N bytes;
// backward N·C + B·T·C FLOPs, reads gy twice and writes both tables:
// 2·s·N·C + s·(V + P)·C + 8·(N + V) bytes. Headline (bf16, B·T = 8·1024, C = 768,
// V = 50257, P = 1024): forward ~38 MB → a floor of ~13 µs at the ~3.0 TB/s an H100
// copies; backward ~25 MB (gy) + 79 MB (gwte, mostly zeros) → ~35 µs. Memory-bound.
//
// Launch geometry: 1-D grid-stride loops, 256 threads per block, grid = min(ceil(work/256),
// the launcher's cap); the result does not depend on the grid size.
//   embedding_fwd: one thread per output element (i, j), j fastest (coalesced).
//   embedding_bwd: one thread per table element: indices below V·C are gwte[v, j] (the
//     thread walks token v's positions in order), the rest gwpe[t, j] (walks the batch);
//     either range is skipped when its table needs no gradient. Threads of a warp share v
//     (or t) and read consecutive j. Known gap: a rare token's rows cost as much as a
//     frequent one's, and one thread serialises a token that occurs N times.
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

template <typename T>
__device__ void forward(const EmbeddingParams& p) {
    const T* wte = static_cast<const T*>(p.wte);
    const T* wpe = static_cast<const T*>(p.wpe);
    T* out = static_cast<T*>(p.out);
    const lf::u64 total = (lf::u64)p.n * (lf::u64)p.c;
    for (lf::u64 k = lf::global_thread(); k < total; k += lf::grid_stride()) {
        const lf::u64 i = k / (lf::u64)p.c, j = k % (lf::u64)p.c;
        const lf::u64 tok = p.tokens[i], t = i % (lf::u64)p.seq;
        out[k] = lf::from_f32<T>(lf::to_f32(wte[tok * p.c + j]) + lf::to_f32(wpe[t * p.c + j]));
    }
}

template <typename T>
__device__ void backward(const EmbeddingParams& p) {
    const T* gy = static_cast<const T*>(p.gy);
    const lf::u64 c = (lf::u64)p.c;
    const lf::u64 nte = p.gwte ? (lf::u64)p.v * c : 0ull;
    const lf::u64 npe = p.gwpe ? (lf::u64)p.p * c : 0ull;
    for (lf::u64 k = lf::global_thread(); k < nte + npe; k += lf::grid_stride()) {
        float s = 0.0f;
        if (k < nte) {
            const lf::u64 v = k / c, j = k % c;
            for (long long q = p.offsets[v]; q < p.offsets[v + 1]; ++q)
                s = __fadd_rn(s, lf::to_f32(gy[(lf::u64)p.order[q] * c + j]));
            static_cast<T*>(p.gwte)[k] = lf::from_f32<T>(s);
        } else {
            const lf::u64 e = k - nte, t = e / c, j = e % c;
            if (t < (lf::u64)p.seq)
                for (long long b = 0; b < p.batch; ++b)
                    s = __fadd_rn(s, lf::to_f32(gy[((lf::u64)b * p.seq + t) * c + j]));
            static_cast<T*>(p.gwpe)[e] = lf::from_f32<T>(s);
        }
    }
}

}  // namespace

extern "C" __global__ void embedding_fwd_f32(const EmbeddingParams p) { forward<float>(p); }
extern "C" __global__ void embedding_fwd_bf16(const EmbeddingParams p) { forward<bf16>(p); }
extern "C" __global__ void embedding_fwd_f16(const EmbeddingParams p) { forward<f16>(p); }

extern "C" __global__ void embedding_bwd_f32(const EmbeddingParams p) { backward<float>(p); }
extern "C" __global__ void embedding_bwd_bf16(const EmbeddingParams p) { backward<bf16>(p); }
extern "C" __global__ void embedding_bwd_f16(const EmbeddingParams p) { backward<f16>(p); }
