// adamw.cu — multi-tensor mixed-precision AdamW: a fused, deterministic global
// gradient-norm + inf/NaN check, and one launch that updates every parameter tensor.
//
// Math (the CPU reference is src/optim/adamw/mod.rs: `adamw_element`, `StepConstants`;
// T tensors, tensor k has n_k elements, all of them split into chunks of C elements):
//   adamw_norm_fwd_f32:   partial[c] = Σ_{i in chunk c} (f64(g[i]) · grad_scale_inv)²,
//                         nonfinite[c] = any g[i] of chunk c is inf/NaN          (partials =)
//                         (in f64; a chunk whose tensor has no gradient gives 0)
//   adamw_finish_fwd_f32: one block: sumsq = Σ_c partial[c] in a fixed order (thread j sums
//                         c = j, j+256, …; then a fixed tree), norm = √sumsq,
//                         found_inf = any nonfinite or norm not finite.            (state =)
//                         Not found_inf: clip = min(1, max_norm/(norm + 1e-6)) (1 without
//                         clipping), t = ++state.step, and the step constants of
//                         `StepConstants::new(cfg, lr, t, grad_scale_inv·clip)` in f64
//                         (β^t by `optim::pow_by_squaring`), rounded once to f32, and the
//                         stochastic-rounding key mix64(mix64(seed + G) ^ t).
//                         found_inf: only norm and found_inf are written (step unchanged).
//                         With a device-resident loss scale (loss_scale non-null; the host
//                         twin is `DynamicLossScaler::update`): grad_scale_inv = 1/S is read
//                         from it (in norm too), and after the step          (loss_scale =)
//                           found_inf: S = max(S/2, 1), clean = 0, overflows += 1;
//                           else: clean += 1, and at growth_interval S = 2S, clean = 0;
//                         then next_seed = (float)S, the next backward's seed (next_seed =).
//                         No host round trip decides a skip or the next scale.
//   adamw_apply_fwd_f32:  reads found_inf from the step state and returns at once, writing
//                         nothing, when it is set. Otherwise, per element of every tensor
//                         that has a gradient (each operation rounded once in f32, no FMA:
//                         __fmul_rn/__fadd_rn/__fsub_rn/__fdiv_rn/__fsqrt_rn):
//                           g = grad·grad_mul;  w = w·decay
//                           m = β₁·m + (1−β₁)·g;  v = β₂·v + (1−β₂)·(g·g)        (m =, v =)
//                           w = w − step_size·(m / (√v/√(1−β₂ᵗ) + ε))
//                         w is the f32 param itself (f32, p =) or the f32 master copy of a
//                         bf16/f16 param (master =), rounded into the param (p =) to
//                         nearest even or stochastically with the bits
//                         stream_bits(mix64(key ^ param_index), element_index).
//   Every output is overwritten (out =), never accumulated: partials, the step state, and
//   in place m, v, master and the params.
//   Bit-identical to the CPU reference for the f32 math; the norm sums in another order
//   (f64, so within ~1e-15 relative of the CPU's).
//
// Shapes: tensors[T] descriptors {param, m, v, master, n, dtype, param_index}; grads[T]
// {ptr (null: no gradient this step), dtype}; chunks[K] {tensor, chunk} (element range
// [chunk·C, min(n, (chunk+1)·C)) of that tensor); partials[K]; one step state; optionally
// one loss-scale state and its f32 seed.
//
// Dtypes: params bf16/f16/f32, grads of the param's dtype or f32 (a per-tensor code:
// 0 f32, 1 bf16, 2 f16; a block works on one chunk of one tensor, so the switch is
// uniform per block); moments m, v and master weights f32; norm in f64; the kernel-name
// suffix `f32` names the math and the state.
//
// FLOPs and bytes per parameter element (the floor: bytes / 3.0e12 s at the ~3.0 TB/s an
// H100 copies):
//   norm:   3 f64 FLOPs; reads the grad (2 or 4 B).
//   apply:  ~15 f32 FLOPs (incl. sqrt and 2 divisions); bytes:
//           bf16/f16 param, f32 grad:  grad 4 + master 4+4 + m 4+4 + v 4+4 + param 2 = 30 B
//           bf16/f16 param, own grad:  2 + 8 + 8 + 8 + 2                           = 28 B
//           f32 param, f32 grad:       grad 4 + param 4+4 + m 4+4 + v 4+4           = 28 B
//   whole step (norm + apply): 34 B (bf16 param, f32 grad), 30 B (bf16/bf16), 32 B (f32).
//   e.g. 124 M bf16 params with f32 grads: 124e6 · 34 B = 4.22 GB → floor ~1.41 ms on an
//   H100 (apply alone 3.72 GB → ~1.24 ms); the finish kernel reads 16 B per chunk.
//
// Launch geometry: norm and apply: 1-D grid of min(K, the launcher's cap) blocks of 256
// threads, a grid-stride loop over chunks (block b takes chunks b, b + grid, …); inside a
// chunk, thread j takes elements j, j + 256, … (coalesced). The results do not depend on
// the grid size: each chunk's partial is reduced by one block in a fixed order. finish:
// one block of 256 threads. C is the launcher's (16384 on a GPU, smaller on the
// simulator); 2·256·8 B of static shared memory in norm and finish.
#include "common.cuh"

namespace {

constexpr unsigned kThreads = 256;

// Dtype codes of the descriptors (src/optim/adamw/cuda.rs: `dtype_code`).
constexpr unsigned kF32 = 0;
constexpr unsigned kBF16 = 1;
constexpr unsigned kF16 = 2;

}  // namespace

// One parameter tensor (uploaded once by `AdamW::new`). Rust twin: `TensorDesc`.
struct AdamWTensor {
    void* param;       // n elements of param_dtype
    float* m;          // n
    float* v;          // n
    float* master;     // n, or null for f32 params
    lf::u64 n;
    unsigned param_dtype;
    unsigned param_index;  // position in AdamW::params (the stochastic-rounding stream)
};

// The gradient of one tensor in this step (uploaded when the pointers change).
// Rust twin: `GradSlot`.
struct AdamWGrad {
    const void* ptr;  // null: no gradient this step (the tensor is left alone)
    unsigned dtype;
    unsigned pad;
};

// One unit of work: elements [chunk·C, min(n, (chunk+1)·C)) of tensors[tensor].
// Rust twin: `ChunkDesc`.
struct AdamWChunk {
    unsigned tensor;
    unsigned chunk;
};

// Rust twin: `Partial`.
struct AdamWPartial {
    double sumsq;
    unsigned nonfinite;
    unsigned pad;
};

// The device-resident step state (written by finish, read by apply and by the host's
// report). Rust twin: `StepState`.
struct AdamWStepState {
    lf::u64 step;       // applied (not skipped) steps so far: the t of the last step
    lf::u64 key;        // mix64(mix64(seed + G) ^ t), the stochastic-rounding key of step t
    double grad_norm;   // of this step (inf/NaN when found_inf)
    double clip_coef;   // of this step (1 when skipped)
    unsigned found_inf; // 1: this step is skipped
    unsigned pad;
    // StepConstants<f32> of step t.
    float grad_mul, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bias2,
        step_size, eps, pad2;
};

// The tables' layouts, shared with the Rust twins in src/optim/adamw/cuda.rs (whose sizes
// its tests check as well).
static_assert(sizeof(AdamWTensor) == 48, "AdamWTensor layout");
static_assert(sizeof(AdamWGrad) == 16, "AdamWGrad layout");
static_assert(sizeof(AdamWChunk) == 8, "AdamWChunk layout");
static_assert(sizeof(AdamWPartial) == 16, "AdamWPartial layout");
static_assert(sizeof(AdamWStepState) == 80, "AdamWStepState layout");

// Dynamic loss scaling kept on the device (torch.cuda.amp.GradScaler's policy; the host
// twin is `optim::DynamicLossScaler::update`). norm and finish read S from it, finish
// updates it after the step. Rust twin: `LossScaleState`.
struct AdamWLossScale {
    double scale;              // S: the gradients of this step are S × their true value
    lf::u64 overflows;         // steps skipped so far
    unsigned clean_steps;      // clean steps since the scale last changed
    unsigned growth_interval;  // clean steps before S doubles (>= 1)
};
static_assert(sizeof(AdamWLossScale) == 24, "AdamWLossScale layout");

// Rust twin: `NormParams`.
struct AdamWNormParams {
    const AdamWTensor* tensors;
    const AdamWGrad* grads;
    const AdamWChunk* chunks;
    AdamWPartial* partials;
    lf::u64 num_chunks;
    lf::u64 chunk_elems;
    double grad_scale_inv;             // used when loss_scale is null
    const AdamWLossScale* loss_scale;  // null, or grad_scale_inv = 1/S read from here
};

// Rust twin: `FinishParams`.
struct AdamWFinishParams {
    const AdamWPartial* partials;
    AdamWStepState* state;
    lf::u64 num_chunks;
    lf::u64 seed;
    double grad_scale_inv;
    double max_grad_norm;  // <= 0: no clipping
    double lr;
    double beta1, beta2, eps, weight_decay;
    AdamWLossScale* loss_scale;  // null, or: 1/S replaces grad_scale_inv, S is updated
    float* next_seed;            // with loss_scale: (float)S after the update (out =)
};

// Rust twin: `ApplyParams`.
struct AdamWApplyParams {
    const AdamWTensor* tensors;
    const AdamWGrad* grads;
    const AdamWChunk* chunks;
    const AdamWStepState* state;
    lf::u64 num_chunks;
    lf::u64 chunk_elems;
    unsigned stochastic;
    unsigned pad;
};

namespace {

// Correctly rounded f64 operations that the compiler may not contract into an FMA.
#if defined(LORAFUSE_SIM)
__device__ __forceinline__ double dmul(double a, double b) { return a * b; }
__device__ __forceinline__ double dadd(double a, double b) { return a + b; }
__device__ __forceinline__ double dsub(double a, double b) { return a - b; }
__device__ __forceinline__ double ddiv(double a, double b) { return a / b; }
__device__ __forceinline__ double dsqrt(double a) { return sqrt(a); }
#else
__device__ __forceinline__ double dmul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double dadd(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double dsub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double ddiv(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double dsqrt(double a) { return __dsqrt_rn(a); }
#endif

// β^t by binary exponentiation, the same multiplications in the same order as
// `optim::pow_by_squaring` on the host.
__device__ __forceinline__ double pow_by_squaring(double base, lf::u64 t) {
    double acc = 1.0;
    while (t > 0) {
        if (t & 1ull) acc = dmul(acc, base);
        base = dmul(base, base);
        t >>= 1;
    }
    return acc;
}

// Sums red[0..256) (thread j holds red[j]) in a fixed tree; the result in red[0].
__device__ __forceinline__ void block_sum(double* red) {
    for (unsigned s = kThreads / 2; s > 0; s >>= 1) {
        __syncthreads();
        if (threadIdx.x < s) red[threadIdx.x] = dadd(red[threadIdx.x], red[threadIdx.x + s]);
    }
    __syncthreads();
}

template <typename G>
__device__ __forceinline__ void chunk_sumsq(const G* __restrict__ g, lf::u64 begin, lf::u64 end,
                                            double scale_inv, double& s, bool& nonfinite) {
    for (lf::u64 i = begin + threadIdx.x; i < end; i += kThreads) {
        double x = (double)lf::to_f32(g[i]);
        nonfinite |= !isfinite(x);
        double y = dmul(x, scale_inv);
        s = dadd(s, dmul(y, y));
    }
}

// 1/S from the device-resident loss scale, or the launch's grad_scale_inv; the same
// correctly rounded division as `DynamicLossScaler::inv_scale` on the host.
__device__ __forceinline__ double grad_scale_inv(const AdamWLossScale* ls, double fallback) {
    return ls != nullptr ? ddiv(1.0, ls->scale) : fallback;
}

__device__ void norm(const AdamWNormParams& p) {
    __shared__ double red[kThreads];
    const double scale_inv = grad_scale_inv(p.loss_scale, p.grad_scale_inv);
    for (lf::u64 c = blockIdx.x; c < p.num_chunks; c += gridDim.x) {
        const AdamWChunk ch = p.chunks[c];
        const AdamWTensor& t = p.tensors[ch.tensor];
        const AdamWGrad gr = p.grads[ch.tensor];
        const lf::u64 begin = (lf::u64)ch.chunk * p.chunk_elems;
        const lf::u64 end = begin + p.chunk_elems < t.n ? begin + p.chunk_elems : t.n;
        double s = 0.0;
        bool nonfinite = false;
        if (gr.ptr != nullptr) {
            switch (gr.dtype) {
                case kF32: chunk_sumsq(static_cast<const float*>(gr.ptr), begin, end, scale_inv, s, nonfinite); break;
                case kBF16: chunk_sumsq(static_cast<const bf16*>(gr.ptr), begin, end, scale_inv, s, nonfinite); break;
                default: chunk_sumsq(static_cast<const f16*>(gr.ptr), begin, end, scale_inv, s, nonfinite); break;
            }
        }
        red[threadIdx.x] = s;
        const int any_nonfinite = __syncthreads_or(nonfinite ? 1 : 0);
        block_sum(red);
        if (threadIdx.x == 0) {
            p.partials[c].sumsq = red[0];
            p.partials[c].nonfinite = any_nonfinite ? 1u : 0u;
            p.partials[c].pad = 0u;
        }
        __syncthreads();  // red is reused by the next chunk
    }
}

// The loss scale's update after a step (`DynamicLossScaler::update`): back off on an
// overflow, grow after growth_interval clean steps; the next backward's seed is (float)S.
__device__ __forceinline__ void update_loss_scale(AdamWLossScale& ls, bool found_inf, float* seed) {
    if (found_inf) {
        ls.scale = fmax(dmul(ls.scale, 0.5), 1.0);
        ls.clean_steps = 0u;
        ls.overflows += 1ull;
    } else {
        ls.clean_steps += 1u;
        if (ls.clean_steps >= ls.growth_interval) {
            ls.scale = dmul(ls.scale, 2.0);
            ls.clean_steps = 0u;
        }
    }
    *seed = (float)ls.scale;
}

// Thread 0 of finish: the step state from the summed squares; returns found_inf.
__device__ __forceinline__ bool step_state(const AdamWFinishParams& p, double sumsq, bool any_nonfinite,
                                           double grad_scale_inv) {
    AdamWStepState* st = p.state;
    const double norm = dsqrt(sumsq);
    st->grad_norm = norm;
    if (any_nonfinite || !isfinite(norm)) {
        st->found_inf = 1u;
        st->clip_coef = 1.0;
        return true;
    }
    st->found_inf = 0u;
    double clip = 1.0;
    if (p.max_grad_norm > 0.0) clip = fmin(ddiv(p.max_grad_norm, dadd(norm, 1e-6)), 1.0);
    st->clip_coef = clip;
    const lf::u64 t = st->step + 1ull;
    st->step = t;
    const double bias1 = dsub(1.0, pow_by_squaring(p.beta1, t));
    const double bias2 = dsub(1.0, pow_by_squaring(p.beta2, t));
    st->grad_mul = (float)dmul(grad_scale_inv, clip);
    st->decay = (float)dsub(1.0, dmul(p.lr, p.weight_decay));
    st->beta1 = (float)p.beta1;
    st->one_minus_beta1 = (float)dsub(1.0, p.beta1);
    st->beta2 = (float)p.beta2;
    st->one_minus_beta2 = (float)dsub(1.0, p.beta2);
    st->sqrt_bias2 = (float)dsqrt(bias2);
    st->step_size = (float)ddiv(p.lr, bias1);
    st->eps = (float)p.eps;
    st->pad2 = 0.0f;
    st->key = lf::mix64(lf::mix64(p.seed + 0x9E3779B97F4A7C15ull) ^ t);
    return false;
}

__device__ void finish(const AdamWFinishParams& p) {
    __shared__ double red[kThreads];
    double s = 0.0;
    bool nonfinite = false;
    for (lf::u64 c = threadIdx.x; c < p.num_chunks; c += kThreads) {
        s = dadd(s, p.partials[c].sumsq);
        nonfinite |= p.partials[c].nonfinite != 0u;
    }
    red[threadIdx.x] = s;
    const int any_nonfinite = __syncthreads_or(nonfinite ? 1 : 0);
    block_sum(red);
    if (threadIdx.x != 0) return;
    const double scale_inv = grad_scale_inv(p.loss_scale, p.grad_scale_inv);
    const bool found_inf = step_state(p, red[0], any_nonfinite != 0, scale_inv);
    if (p.loss_scale != nullptr) update_loss_scale(*p.loss_scale, found_inf, p.next_seed);
}

// The constants of this step, in registers.
struct Consts {
    float grad_mul, decay, beta1, omb1, beta2, omb2, sqrt_bias2, step_size, eps;
};

// `adamw_element` in f32, each operation rounded once (no FMA).
__device__ __forceinline__ float adamw_element(float w, float& m, float& v, float grad,
                                               const Consts& k) {
    const float g = __fmul_rn(grad, k.grad_mul);
    w = __fmul_rn(w, k.decay);
    m = __fadd_rn(__fmul_rn(k.beta1, m), __fmul_rn(k.omb1, g));
    v = __fadd_rn(__fmul_rn(k.beta2, v), __fmul_rn(k.omb2, __fmul_rn(g, g)));
    const float d = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.sqrt_bias2), k.eps);
    return __fsub_rn(w, __fmul_rn(k.step_size, __fdiv_rn(m, d)));
}

// f32 params: the update is written into the param.
template <typename G>
__device__ void apply_f32(const AdamWTensor& t, const G* __restrict__ g, lf::u64 begin,
                          lf::u64 end, const Consts& k) {
    float* __restrict__ p = static_cast<float*>(t.param);
    float* __restrict__ m = t.m;
    float* __restrict__ v = t.v;
    for (lf::u64 i = begin + threadIdx.x; i < end; i += kThreads) {
        float mi = m[i], vi = v[i];
        p[i] = adamw_element(p[i], mi, vi, lf::to_f32(g[i]), k);
        m[i] = mi;
        v[i] = vi;
    }
}

// bf16/f16 params: the update goes into the f32 master, rounded into the param.
template <typename P, typename G>
__device__ void apply_half(const AdamWTensor& t, const G* __restrict__ g, lf::u64 begin,
                           lf::u64 end, const Consts& k, bool stochastic, lf::u64 key) {
    P* __restrict__ p = static_cast<P*>(t.param);
    float* __restrict__ w = t.master;
    float* __restrict__ m = t.m;
    float* __restrict__ v = t.v;
    for (lf::u64 i = begin + threadIdx.x; i < end; i += kThreads) {
        float mi = m[i], vi = v[i];
        const float wi = adamw_element(w[i], mi, vi, lf::to_f32(g[i]), k);
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
        const lf::u64 r = stochastic ? lf::stream_bits(key, i) : 0ull;
        p[i] = lf::round_to<P>(wi, stochastic, r);
    }
}

__device__ void apply(const AdamWApplyParams& p) {
    const AdamWStepState* st = p.state;
    if (st->found_inf != 0u) return;  // skipped step: write nothing
    const Consts k = {st->grad_mul, st->decay,      st->beta1,     st->one_minus_beta1, st->beta2,
                      st->one_minus_beta2, st->sqrt_bias2, st->step_size, st->eps};
    const lf::u64 step_key = st->key;
    const bool sr = p.stochastic != 0u;
    for (lf::u64 c = blockIdx.x; c < p.num_chunks; c += gridDim.x) {
        const AdamWChunk ch = p.chunks[c];
        const AdamWTensor& t = p.tensors[ch.tensor];
        const AdamWGrad gr = p.grads[ch.tensor];
        if (gr.ptr == nullptr) continue;  // no gradient: untouched (no decay either)
        const lf::u64 begin = (lf::u64)ch.chunk * p.chunk_elems;
        const lf::u64 end = begin + p.chunk_elems < t.n ? begin + p.chunk_elems : t.n;
        const lf::u64 key = lf::mix64(step_key ^ (lf::u64)t.param_index);
        const void* g = gr.ptr;
        // (param, grad) dtype pairs the host accepts; the switch is uniform per block.
        if (t.param_dtype == kF32) {
            apply_f32(t, static_cast<const float*>(g), begin, end, k);
        } else if (t.param_dtype == kBF16) {
            if (gr.dtype == kF32) apply_half<bf16>(t, static_cast<const float*>(g), begin, end, k, sr, key);
            else apply_half<bf16>(t, static_cast<const bf16*>(g), begin, end, k, sr, key);
        } else {
            if (gr.dtype == kF32) apply_half<f16>(t, static_cast<const float*>(g), begin, end, k, sr, key);
            else apply_half<f16>(t, static_cast<const f16*>(g), begin, end, k, sr, key);
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256) adamw_norm_fwd_f32(const AdamWNormParams p) { norm(p); }
extern "C" __global__ void __launch_bounds__(256) adamw_finish_fwd_f32(const AdamWFinishParams p) { finish(p); }
extern "C" __global__ void __launch_bounds__(256) adamw_apply_fwd_f32(const AdamWApplyParams p) { apply(p); }
