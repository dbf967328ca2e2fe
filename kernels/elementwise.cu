// elementwise.cu — the model's elementwise kernels: residual add, bias add (and its
// gradient), tanh-GELU forward/backward, scaling, and casts between f32/bf16/f16.
//
// Math (x, y, gy, out: n elements; rows = n / cols for the bias kernels):
//   add_fwd:       out[i] = x[i] + y[i]                                   (out =)
//   bias_add_fwd:  out[r, c] = x[r, c] + b[c]       x [rows, cols], b [cols]   (out =)
//   bias_add_bwd:  gb[c] = Σ_r gy[r, c]             the bias gradient, rows summed in
//                  order 0..rows in f32 (deterministic, equal to the CPU reference's
//                  column_sums for f32)                                    (gb =)
//   gelu_fwd:      out = 0.5·x·(1 + tanh(k·(x + 0.044715·x³))),  k = √(2/π)    (out =)
//   gelu_bwd:      gx = gy · (0.5·(1 + t) + 0.5·x·(1 − t²)·k·(1 + 3·0.044715·x²)),
//                  t = tanh(k·(x + 0.044715·x³))                          (gx =)
//   scale_fwd:     out[i] = alpha · x[i]                                  (out =)
//   cast_fwd:      out[i] = round_to_nearest_even(x[i])  from one storage dtype to another
//
// Dtypes: storage f32, bf16 or f16 (suffix); compute and accumulate in f32; each output
// rounded once to the storage dtype (nearest even).
// FLOPs / bytes per call (s = bytes per element): add n / 3·s·n; bias_add n / 2·s·n;
// gelu_fwd ~25·n (incl. tanh) / 2·s·n; gelu_bwd ~40·n / 3·s·n; bias_add_bwd n / s·n;
// scale n / 2·s·n; cast 0 / (s_in + s_out)·n. GPT-2 124M, bf16 (floors at ~3.0 TB/s H100 /
// ~4.3 TB/s H200 measured copy): GELU of the MLP's [8192, 3072]: fwd 101 MB → 33.6 µs /
// 23.4 µs, bwd 151 MB → 50 µs / 35 µs; the residual add of [8192, 768]: 37.7 MB →
// 12.6 µs / 8.8 µs; a bias add of [8192, 3072]: 101 MB → 33.6 µs / 23.4 µs.
// Predicted ≥ 85 % for the adds (16-byte loads and stores, 23–30 registers → 64 warps per
// SM, 1–2 16-byte loads in flight per thread: 32–64 KB per SM vs the ~25 KB needed; no
// reductions); GELU ~85 % on an H100 but ~75–80 % on an H200, where tanhf (kept exact:
// the results must not change) costs ~20 µs of issue for [8192, 3072], close to the
// 23 µs of memory time. (Before: 2-byte loads, one element per thread per iteration.)
// Not measured on a GPU.
//
// Launch geometry: 1-D grid-stride loops, 256 threads per block, grid = min(ceil(work/256),
// the launcher's cap); the result does not depend on the grid size. add, bias_add, gelu
// and scale: a work item is a 16-byte vector (W = 16/s values: 4 f32, 8 bf16/f16) when
// every pointer is 16-byte aligned (bias_add: and cols a multiple of W), then the n mod W
// tail element by element; otherwise every element one by one — the same per-element
// math on both paths, so the same bits. bias_add_bwd: one thread per column, the same loop
// over columns; cast: one element per work item.
#include "common.cuh"

// One parameter struct for every kernel in this file; each kernel documents what it reads.
// Rust twin: `ElementwiseParams` in src/ops/elementwise/device.rs (a test checks the size).
struct ElementwiseParams {
    const void* x;    // first input (x, or gy for gelu_bwd / bias_add_bwd)
    const void* y;    // second input (y for add, b for bias_add, x for gelu_bwd), else null
    void* out;        // output
    lf::u64 n;        // elements of out (columns for bias_add_bwd)
    lf::u64 cols;     // columns: bias_add (bias length), bias_add_bwd (row length)
    lf::u64 rows;     // rows: bias_add_bwd only
    float alpha;      // scale_fwd only
    unsigned pad;
};

namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluCoef = 0.044715f;

__device__ __forceinline__ float gelu(float x) {
    float inner = kSqrt2OverPi * (x + kGeluCoef * x * x * x);
    return 0.5f * x * (1.0f + tanhf(inner));
}

__device__ __forceinline__ float gelu_grad(float x) {
    float x2 = x * x;
    float t = tanhf(kSqrt2OverPi * (x + kGeluCoef * x2 * x));
    float dinner = kSqrt2OverPi * (1.0f + 3.0f * kGeluCoef * x2);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dinner;
}

// Vectorised maps: when every pointer is 16-byte aligned, thread k of the grid-stride loop
// takes the vectors k, k + stride, … (W = lf::vec16<T>::n values each: one 16-byte load per
// input, one store), then the n mod W tail elements one by one; otherwise every element
// one by one. The per-element math (f) is the same on both paths, so the result is too.
template <typename T, typename F>
__device__ __forceinline__ void map1(const T* x, T* out, lf::u64 n, F f) {
    constexpr int W = lf::vec16<T>::n;
    lf::u64 done = 0;
    if (lf::aligned16(x) && lf::aligned16(out)) {
        const lf::u64 nv = n / W;
        for (lf::u64 k = lf::global_thread(); k < nv; k += lf::grid_stride()) {
            float a[W];
            lf::load16(x + k * W, a);
LF_UNROLL
            for (int e = 0; e < W; ++e) a[e] = f(a[e]);
            lf::store16(out + k * W, a);
        }
        done = nv * W;
    }
    for (lf::u64 i = done + lf::global_thread(); i < n; i += lf::grid_stride())
        out[i] = lf::from_f32<T>(f(lf::to_f32(x[i])));
}

template <typename T, typename F>
__device__ __forceinline__ void map2(const T* x, const T* y, T* out, lf::u64 n, F f) {
    constexpr int W = lf::vec16<T>::n;
    lf::u64 done = 0;
    if (lf::aligned16(x) && lf::aligned16(y) && lf::aligned16(out)) {
        const lf::u64 nv = n / W;
        for (lf::u64 k = lf::global_thread(); k < nv; k += lf::grid_stride()) {
            float a[W], b[W];
            lf::load16(x + k * W, a);
            lf::load16(y + k * W, b);
LF_UNROLL
            for (int e = 0; e < W; ++e) a[e] = f(a[e], b[e]);
            lf::store16(out + k * W, a);
        }
        done = nv * W;
    }
    for (lf::u64 i = done + lf::global_thread(); i < n; i += lf::grid_stride())
        out[i] = lf::from_f32<T>(f(lf::to_f32(x[i]), lf::to_f32(y[i])));
}

template <typename T>
__device__ void add(const ElementwiseParams& p) {
    map2(static_cast<const T*>(p.x), static_cast<const T*>(p.y), static_cast<T*>(p.out), p.n,
         [](float a, float b) { return a + b; });
}

// The bias vector of a grid-stride vector k starts at column (k·W) mod cols; the column of
// the next one is this plus (stride·W) mod cols, wrapped once: no division in the loop.
template <typename T>
__device__ void bias_add(const ElementwiseParams& p) {
    constexpr int W = lf::vec16<T>::n;
    const T* x = static_cast<const T*>(p.x);
    const T* b = static_cast<const T*>(p.y);
    T* out = static_cast<T*>(p.out);
    lf::u64 done = 0;
    if (p.cols % W == 0 && lf::aligned16(x) && lf::aligned16(b) && lf::aligned16(out)) {
        const lf::u64 nv = p.n / W;
        const lf::u64 step = (lf::grid_stride() * W) % p.cols;
        lf::u64 col = (lf::global_thread() * W) % p.cols;
        for (lf::u64 k = lf::global_thread(); k < nv; k += lf::grid_stride()) {
            float a[W], c[W];
            lf::load16(x + k * W, a);
            lf::load16(b + col, c);
LF_UNROLL
            for (int e = 0; e < W; ++e) a[e] = a[e] + c[e];
            lf::store16(out + k * W, a);
            col += step;
            if (col >= p.cols) col -= p.cols;
        }
        done = nv * W;
    }
    for (lf::u64 i = done + lf::global_thread(); i < p.n; i += lf::grid_stride()) {
        out[i] = lf::from_f32<T>(lf::to_f32(x[i]) + lf::to_f32(b[i % p.cols]));
    }
}

template <typename T>
__device__ void bias_add_bwd(const ElementwiseParams& p) {
    const T* gy = static_cast<const T*>(p.x);
    T* gb = static_cast<T*>(p.out);
    for (lf::u64 c = lf::global_thread(); c < p.cols; c += lf::grid_stride()) {
        float s = 0.0f;
        for (lf::u64 r = 0; r < p.rows; ++r) {
            s += lf::to_f32(gy[r * p.cols + c]);
        }
        gb[c] = lf::from_f32<T>(s);
    }
}

template <typename T>
__device__ void gelu_fwd(const ElementwiseParams& p) {
    map1(static_cast<const T*>(p.x), static_cast<T*>(p.out), p.n, [](float a) { return gelu(a); });
}

template <typename T>
__device__ void gelu_bwd(const ElementwiseParams& p) {
    // x = gy, y = the forward's input.
    map2(static_cast<const T*>(p.x), static_cast<const T*>(p.y), static_cast<T*>(p.out), p.n,
         [](float g, float a) { return g * gelu_grad(a); });
}

template <typename T>
__device__ void scale(const ElementwiseParams& p) {
    const float alpha = p.alpha;
    map1(static_cast<const T*>(p.x), static_cast<T*>(p.out), p.n,
         [alpha](float a) { return alpha * a; });
}

template <typename From, typename To>
__device__ void cast(const ElementwiseParams& p) {
    const From* x = static_cast<const From*>(p.x);
    To* out = static_cast<To*>(p.out);
    for (lf::u64 i = lf::global_thread(); i < p.n; i += lf::grid_stride()) {
        out[i] = lf::from_f32<To>(lf::to_f32(x[i]));
    }
}

}  // namespace

extern "C" __global__ void add_fwd_f32(const ElementwiseParams p) { add<float>(p); }
extern "C" __global__ void add_fwd_bf16(const ElementwiseParams p) { add<bf16>(p); }
extern "C" __global__ void add_fwd_f16(const ElementwiseParams p) { add<f16>(p); }

extern "C" __global__ void bias_add_fwd_f32(const ElementwiseParams p) { bias_add<float>(p); }
extern "C" __global__ void bias_add_fwd_bf16(const ElementwiseParams p) { bias_add<bf16>(p); }
extern "C" __global__ void bias_add_fwd_f16(const ElementwiseParams p) { bias_add<f16>(p); }

extern "C" __global__ void bias_add_bwd_f32(const ElementwiseParams p) { bias_add_bwd<float>(p); }
extern "C" __global__ void bias_add_bwd_bf16(const ElementwiseParams p) { bias_add_bwd<bf16>(p); }
extern "C" __global__ void bias_add_bwd_f16(const ElementwiseParams p) { bias_add_bwd<f16>(p); }

extern "C" __global__ void gelu_fwd_f32(const ElementwiseParams p) { gelu_fwd<float>(p); }
extern "C" __global__ void gelu_fwd_bf16(const ElementwiseParams p) { gelu_fwd<bf16>(p); }
extern "C" __global__ void gelu_fwd_f16(const ElementwiseParams p) { gelu_fwd<f16>(p); }

extern "C" __global__ void gelu_bwd_f32(const ElementwiseParams p) { gelu_bwd<float>(p); }
extern "C" __global__ void gelu_bwd_bf16(const ElementwiseParams p) { gelu_bwd<bf16>(p); }
extern "C" __global__ void gelu_bwd_f16(const ElementwiseParams p) { gelu_bwd<f16>(p); }

extern "C" __global__ void scale_fwd_f32(const ElementwiseParams p) { scale<float>(p); }
extern "C" __global__ void scale_fwd_bf16(const ElementwiseParams p) { scale<bf16>(p); }
extern "C" __global__ void scale_fwd_f16(const ElementwiseParams p) { scale<f16>(p); }

extern "C" __global__ void cast_fwd_f32_bf16(const ElementwiseParams p) { cast<float, bf16>(p); }
extern "C" __global__ void cast_fwd_f32_f16(const ElementwiseParams p) { cast<float, f16>(p); }
extern "C" __global__ void cast_fwd_bf16_f32(const ElementwiseParams p) { cast<bf16, float>(p); }
extern "C" __global__ void cast_fwd_bf16_f16(const ElementwiseParams p) { cast<bf16, f16>(p); }
extern "C" __global__ void cast_fwd_f16_f32(const ElementwiseParams p) { cast<f16, float>(p); }
extern "C" __global__ void cast_fwd_f16_bf16(const ElementwiseParams p) { cast<f16, bf16>(p); }
