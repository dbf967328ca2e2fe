// dropout.cu — seeded inverted dropout with a counter-based mask, forward and backward;
// the mask is regenerated from (seed, index), never stored.
//
// Math (the CPU reference is src/ops/dropout/cpu.rs: `bits24`, `threshold`, `apply`; the
// formula is documented at `ops::dropout_mask_value`; n elements, flat row-major index i):
//   key     = mix64(seed)                        (the SplitMix64 finaliser, common.cuh)
//   bits(i) = stream_bits(key, i) >> 40          = mix64(key + (i + 1)·0x9E3779B97F4A7C15) >> 40
//   kept(i) = bits(i) ≥ th,  th = ceil(p·2^24)   (computed on the host, exact in f64)
//   dropout_fwd:  y[i]  = kept(i) ? x[i]·scale  : 0                             (out =)
//   dropout_bwd:  gx[i] = kept(i) ? gy[i]·scale : 0    the same mask and scale  (out =)
// with scale = 1/(1 − p) computed in f64 on the host and rounded once to f32. The product
// is one f32 multiply rounded once to T, as in the CPU reference, so the outputs equal the
// CPU's bit for bit (a dropped NaN is 0; th = 0 keeps everything, scale 1).
//
// Shapes: x (or gy) and out: n elements, any shape, contiguous.
//
// Dtypes: storage bf16, f16 or f32 (the suffix); compute f32; the hash in 64-bit integers.
//
// FLOPs and bytes per call (s bytes per element): ~1 multiply and ~12 integer operations per
// element (two mix64); reads and writes n elements: 2·s·n bytes. Memory-bound: a bf16
// tensor of 16 Mi elements moves 64 MiB, a floor of ~22 µs at the ~3.0 TB/s an H100 copies.
//
// Launch geometry: 1-D grid-stride loop, 256 threads per block, grid = min(ceil(n/256), the
// launcher's cap); thread g handles i = g, g + stride, …, so the result does not depend on
// the grid. Not yet measured on a GPU; known gap: one element per thread per access.
#include "common.cuh"

// Rust twin: `DropoutParams` in src/ops/dropout/cuda.rs (a test checks the size).
struct DropoutParams {
    const void* x;             // x (fwd) or gy (bwd)
    void* out;                 // y (fwd) or gx (bwd)
    lf::u64 n;                 // elements
    unsigned long long seed;   // the op's seed (the kernel applies mix64)
    unsigned int threshold;    // ceil(p·2^24)
    float scale;               // f32(1/(1 − p))
};

namespace {

template <typename T>
__device__ __forceinline__ void apply(const DropoutParams& p) {
    const T* x = static_cast<const T*>(p.x);
    T* out = static_cast<T*>(p.out);
    const lf::u64 key = lf::mix64(p.seed);
    for (lf::u64 i = lf::global_thread(); i < p.n; i += lf::grid_stride()) {
        const unsigned int bits = (unsigned int)(lf::stream_bits(key, i) >> 40);
        out[i] = bits >= p.threshold ? lf::from_f32<T>(lf::to_f32(x[i]) * p.scale)
                                     : lf::from_f32<T>(0.0f);
    }
}

}  // namespace

extern "C" __global__ void dropout_fwd_f32(const DropoutParams p) { apply<float>(p); }
extern "C" __global__ void dropout_fwd_bf16(const DropoutParams p) { apply<bf16>(p); }
extern "C" __global__ void dropout_fwd_f16(const DropoutParams p) { apply<f16>(p); }

extern "C" __global__ void dropout_bwd_f32(const DropoutParams p) { apply<float>(p); }
extern "C" __global__ void dropout_bwd_bf16(const DropoutParams p) { apply<bf16>(p); }
extern "C" __global__ void dropout_bwd_f16(const DropoutParams p) { apply<f16>(p); }
