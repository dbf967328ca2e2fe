// common.cuh — what every lorafuse kernel includes, on every backend.
//
// One source, three compilers:
//   * nvcc (build.rs → PTX + cubin) and NVRTC (runtime fallback): the CUDA headers.
//     For NVRTC, build.rs pastes this file into each kernel's source in place of
//     `#include "common.cuh"`, so NVRTC needs only the CUDA include folder.
//   * the simulator (DESIGN §7): the host C++ compiler with -DLORAFUSE_SIM, against
//     sim/lf_sim.h, a shim of the CUDA execution model.
//
// Kernel conventions (checked by tests/tidy.rs):
//   * every kernel is `extern "C" __global__ void <op>_<fwd|bwd>_<dtype>(const <Op>Params p)`:
//     exactly one argument, a parameter struct with a `#[repr(C)]` twin in Rust;
//   * device pointers in parameter structs are raw pointers (8 bytes, as `u64` in Rust);
//   * kernels are thin instantiations of templates written once.
#pragma once

#if defined(LORAFUSE_SIM)
#include "sim/lf_sim.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(LORAFUSE_SIM)
// Dynamic shared memory: the simulator hands each block its own buffer.
#define LF_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(lf_sim::dynamic_smem())
#else
#define LF_DYNAMIC_SMEM(T, name)                                   \
    extern __shared__ __align__(16) unsigned char lf_dyn_smem_[]; \
    T* name = reinterpret_cast<T*>(lf_dyn_smem_)
#endif

typedef __nv_bfloat16 bf16;
typedef __half f16;

namespace lf {

// Index arithmetic in 64 bits: tensors may exceed 2^31 elements.
typedef unsigned long long u64;

// Conversions between the storage types and f32, rounding to nearest even (as the CPU
// reference's `half` crate does).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(f16 v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float v) { return __float2half_rn(v); }

// The global index of this thread in a 1-D launch, and the grid's stride.
__device__ __forceinline__ u64 global_thread() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ u64 grid_stride() { return (u64)gridDim.x * blockDim.x; }


// ---- Counter-based random bits and stochastic rounding (src/optim/rounding.rs) ----
// The same splitmix64 stream as the CPU reference: `key` is computed on the host per
// tensor (and step), `stream_bits(key, i)` by the thread that owns element i.

// The splitmix64 finaliser.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The random bits of element `index` in the stream `key`: mix64(key + (index + 1)·G).
__device__ __forceinline__ u64 stream_bits(u64 key, u64 index) {
    return mix64(key + (index + 1ull) * 0x9E3779B97F4A7C15ull);
}

// bf16 stochastic rounding: add the low 16 random bits to the dropped bits, truncate.
// NaN and ±inf round to nearest.
__device__ __forceinline__ bf16 round_bf16_stochastic(float x, u64 r) {
    if (!isfinite(x)) return __float2bfloat16_rn(x);
    unsigned int b = __float_as_uint(x) + (unsigned int)(r & 0xFFFFull);
    return __ushort_as_bfloat16((unsigned short)(b >> 16));
}

// f16 stochastic rounding (rounding.rs documents the formula): normal range by adding
// 13 random bits below f16's mantissa, subnormal range on the integer significand.
__device__ __forceinline__ f16 round_f16_stochastic(float x, u64 r) {
    if (!isfinite(x)) return __float2half_rn(x);
    unsigned int bits = __float_as_uint(x);
    unsigned int sign = bits & 0x80000000u;
    unsigned int a = bits & 0x7FFFFFFFu;
    if (a >= 0x38800000u) {
        unsigned int t = (a + (unsigned int)(r & 0x1FFFull)) & ~0x1FFFu;
        return __float2half_rn(__uint_as_float(sign | t));
    }
    unsigned int e = a >> 23;
    unsigned int mant = a & 0x7FFFFFu;
    u64 sig = e == 0 ? (u64)mant : (u64)(mant | 0x800000u);
    unsigned int s = 126u - (e > 1u ? e : 1u);
    u64 k = s >= 64u ? 0ull : (sig + (r & ((1ull << s) - 1ull))) >> s;
    return __ushort_as_half((unsigned short)((sign >> 16) | (unsigned int)k));
}

// Rounds an f32 into the storage type T: nearest even, or stochastically with the bits
// `r` when `stochastic` (f32 is stored as is).
template <typename T> __device__ __forceinline__ T round_to(float x, bool stochastic, u64 r);
template <> __device__ __forceinline__ float round_to<float>(float x, bool, u64) { return x; }
template <> __device__ __forceinline__ bf16 round_to<bf16>(float x, bool stochastic, u64 r) {
    return stochastic ? round_bf16_stochastic(x, r) : __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ f16 round_to<f16>(float x, bool stochastic, u64 r) {
    return stochastic ? round_f16_stochastic(x, r) : __float2half_rn(x);
}

}  // namespace lf
