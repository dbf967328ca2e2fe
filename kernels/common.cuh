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

}  // namespace lf
