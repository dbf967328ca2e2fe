// lora_merge.cu — the merged-weight update, in place: merge, unmerge and the weighted merge
// of several adapters in one pass over W (DESIGN §2).
//
// Math (the CPU reference is src/ops/lora_merge/cpu.rs: `merge`; T terms, term t is an
// adapter A_t [r_t, K], B_t [rows_t, r_t] over the rows [row0_t, row1_t) of W, with a
// signed, weighted scale s_t: +s merge, −s unmerge, w_t·s_t in a weighted merge):
//   acc = f32(W[i, j])
//   for t in order, when row0_t ≤ i < row1_t:
//     for p in 0 .. r_t:  acc = acc + (s_t · B_t[i − row0_t, p]) · A_t[p, j]
//   W[i, j] = round(acc)                                          (out =), in place
// Each product and sum is rounded once in f32 (__fmul_rn / __fadd_rn, no FMA), in the
// reference's order, so the result equals the CPU reference bit for bit. The rounding into
// bf16/f16 is nearest even, or stochastic with the bits stream_bits(key, i·K + j) (the key
// from the host: `optim::rounding::stream_key(seed, 0, 0)`). Rows no term covers are not
// written. No backward: the op rewrites a frozen weight outside any tape.
//
// Shapes: W [N, K] row-major (the linear's [out, in]); A_t [r_t, K] and B_t [rows_t, r_t]
// contiguous; terms[T] descriptors {a, b, r, row0, row1, scale} in device memory.
//
// Dtypes: W, A and B all bf16, f16 or f32 (the suffix); math in f32.
//
// FLOPs and bytes per call (s bytes per element; R = Σ_t r_t·rows_t/N the mean rank over
// the rows): 2·N·K·R FLOPs; W read and written once: 2·s·N·K bytes, plus A_t re-read from
// L2 once per 32-row tile and B_t once. Headline (bf16, N = K = 4096, r = 16): 0.54 GFLOP
// and 67 MB → memory-bound; at the ~3.0 TB/s an H100 copies, a floor of ~22 µs (the same
// bytes as a device copy of W, which the bench measures beside it).
//
// Launch geometry: grid (ceil(K/256), ceil(N/32)), 256 threads; thread x of block (bx, by)
// owns column j = 256·bx + x of the 32 rows 32·by … and keeps their 32 accumulators in
// registers. The rank is walked in chunks of 8: the block stages s_t·B_t for its rows
// (32 × 8 f32, 1 KiB of static shared memory, read as broadcasts) while each thread holds
// its column of A_t's 8 rows in registers. Loads of W and A are coalesced along K. No
// atomics; the result does not depend on the grid. __launch_bounds__(256, 2) caps the
// registers at 128 (ptxas chose 150–194 without it, which allows one block per SM; with
// it, 0 spills): two blocks, 16 warps per SM, each thread with 32 independent loads of W
// in flight (~32 KiB per SM, above the ~15 KiB that 3 TB/s × ~600 ns of latency asks of
// each of 132 SMs). Expected: within ~80 % of the copy's bandwidth. Not yet measured on a
// GPU; known gaps: one 2-byte element per thread per row (no paired or 16-byte accesses).
#include "common.cuh"

// Rust twin: `LoraMergeTerm` in src/ops/lora_merge/cuda.rs.
struct LoraMergeTerm {
    const void* a;        // A [r, K] row-major
    const void* b;        // B [row1 − row0, r] row-major
    long long r;
    long long row0, row1; // the rows of W this adapter adds to
    float scale;          // signed and weighted
    int pad;
};
static_assert(sizeof(LoraMergeTerm) == 48, "LoraMergeTerm layout (48 bytes in Rust)");

// Rust twin: `LoraMergeParams` in src/ops/lora_merge/cuda.rs (a test checks the size).
struct LoraMergeParams {
    void* w;                      // W [n, k] row-major, updated in place
    const LoraMergeTerm* terms;   // num_terms descriptors
    long long n, k;
    long long num_terms;
    unsigned long long key;       // the stochastic-rounding stream key
    int stochastic;               // 1: round bf16/f16 stochastically
    int pad;
};

namespace {

constexpr int kThreads = 256;  // columns per block
constexpr int kRows = 32;      // rows per block
constexpr int kChunk = 8;      // rank chunk staged at a time

template <typename T>
__device__ __forceinline__ void merge(const LoraMergeParams& p) {
    __shared__ float coef[kRows][kChunk];
    const long long row0 = (long long)blockIdx.y * kRows;
    const long long col = (long long)blockIdx.x * kThreads + threadIdx.x;
    const bool in = col < p.k;
    T* w = static_cast<T*>(p.w);
    float acc[kRows];
LF_UNROLL
    for (int i = 0; i < kRows; ++i) {
        const long long row = row0 + i;
        acc[i] = (in && row < p.n) ? lf::to_f32(w[row * p.k + col]) : 0.0f;
    }
    unsigned int touched = 0;  // bit i: row row0 + i is covered by some term
    const long long tile_end = row0 + kRows < p.n ? row0 + kRows : p.n;
    for (long long t = 0; t < p.num_terms; ++t) {
        const LoraMergeTerm d = p.terms[t];
        const long long lo = d.row0 > row0 ? d.row0 : row0;
        const long long hi = d.row1 < tile_end ? d.row1 : tile_end;
        if (lo >= hi) continue;  // uniform over the block
        const T* a = static_cast<const T*>(d.a);
        const T* b = static_cast<const T*>(d.b);
        for (long long p0 = 0; p0 < d.r; p0 += kChunk) {
            const int pc = d.r - p0 < kChunk ? (int)(d.r - p0) : kChunk;
            __syncthreads();  // the previous chunk's coefficients are consumed
            for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
                const int i = e / kChunk, q = e % kChunk;
                const long long row = row0 + i;
                coef[i][q] = (row >= lo && row < hi && q < pc)
                                 ? __fmul_rn(d.scale, lf::to_f32(b[(row - d.row0) * d.r + p0 + q]))
                                 : 0.0f;
            }
            __syncthreads();
            float av[kChunk];
LF_UNROLL
            for (int q = 0; q < kChunk; ++q)
                av[q] = (in && q < pc) ? lf::to_f32(a[(p0 + q) * p.k + col]) : 0.0f;
LF_UNROLL
            for (int i = 0; i < kRows; ++i) {
                const long long row = row0 + i;
                if (row < lo || row >= hi) continue;
LF_UNROLL
                for (int q = 0; q < kChunk; ++q)
                    if (q < pc) acc[i] = __fadd_rn(acc[i], __fmul_rn(coef[i][q], av[q]));
            }
        }
        LF_UNROLL
        for (int i = 0; i < kRows; ++i)
            if (row0 + i >= lo && row0 + i < hi) touched |= 1u << i;
    }
    if (!in) return;
LF_UNROLL
    for (int i = 0; i < kRows; ++i) {
        if (!(touched >> i & 1u)) continue;
        const long long idx = (row0 + i) * p.k + col;
        const lf::u64 r = p.stochastic ? lf::stream_bits(p.key, (lf::u64)idx) : 0ull;
        w[idx] = lf::round_to<T>(acc[i], p.stochastic != 0, r);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_fwd_f32(const LoraMergeParams p) { merge<float>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_fwd_bf16(const LoraMergeParams p) { merge<bf16>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) lora_merge_fwd_f16(const LoraMergeParams p) { merge<f16>(p); }
