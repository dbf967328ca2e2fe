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

// Unrolls a loop with a constant trip count completely, so register arrays indexed by
// its variable stay in registers; the host compiler of the simulator has no such pragma.
#if defined(LORAFUSE_SIM)
#define LF_UNROLL
#else
#define LF_UNROLL _Pragma("unroll")
#endif

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

// Copies 16 bytes between 16-byte-aligned addresses: one vector load/store on a GPU; a
// memcpy in the simulator (no type punning for the host compiler to misread), which fails
// the launch if either address is misaligned, as the GPU faults.
__device__ __forceinline__ void copy16(void* dst, const void* src) {
#if defined(LORAFUSE_SIM)
    lf_sim::require_aligned(dst, 16, "copy16 destination");
    lf_sim::require_aligned(src, 16, "copy16 source");
    memcpy(dst, src, 16);
#else
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#endif
}

// Whether `p` is 16-byte aligned.
__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ---- 16-byte vectors of storage values (the memory-bound kernels) -----------------------
// vec16<T>::n storage values fill 16 bytes (4 f32, 8 bf16/f16). load16(p, f) reads the n
// values at `p` (16-byte aligned) with one vector load and widens them to f32, f[e] = p[e];
// store16(p, f) rounds n f32 values to T (nearest even, as from_f32) and writes them with
// one vector store. Element e sits in 32-bit word e / (n / 4), the lower index in the low
// half, as in memory.
template <typename T> struct vec16 { static constexpr int n = 16 / (int)sizeof(T); };

__device__ __forceinline__ void unpack_word(unsigned w, float* f, const float*) {
    f[0] = __uint_as_float(w);
}
__device__ __forceinline__ void unpack_word(unsigned w, float* f, const bf16*) {
    f[0] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(w & 0xFFFFu)));
    f[1] = __bfloat162float(__ushort_as_bfloat16((unsigned short)(w >> 16)));
}
__device__ __forceinline__ void unpack_word(unsigned w, float* f, const f16*) {
    f[0] = __half2float(__ushort_as_half((unsigned short)(w & 0xFFFFu)));
    f[1] = __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}
__device__ __forceinline__ unsigned pack_word(const float* f, const float*) {
    return __float_as_uint(f[0]);
}
__device__ __forceinline__ unsigned pack_word(const float* f, const bf16*) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f[0])) |
           ((unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(f[1])) << 16);
}
__device__ __forceinline__ unsigned pack_word(const float* f, const f16*) {
    return (unsigned)__half_as_ushort(__float2half_rn(f[0])) |
           ((unsigned)__half_as_ushort(__float2half_rn(f[1])) << 16);
}

template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&f)[vec16<T>::n]) {
    constexpr int per = vec16<T>::n / 4;  // values per 32-bit word
    uint4 u;
    copy16(&u, p);
    unpack_word(u.x, f + 0 * per, p);
    unpack_word(u.y, f + 1 * per, p);
    unpack_word(u.z, f + 2 * per, p);
    unpack_word(u.w, f + 3 * per, p);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&f)[vec16<T>::n]) {
    constexpr int per = vec16<T>::n / 4;
    const T* tag = p;
    uint4 u;
    u.x = pack_word(f + 0 * per, tag);
    u.y = pack_word(f + 1 * per, tag);
    u.z = pack_word(f + 2 * per, tag);
    u.w = pack_word(f + 3 * per, tag);
    copy16(p, &u);
}

// ---- Tensor cores: one wrapper, two implementations --------------------------------------
// mma_m16n8k16<T>(d, a, b, c): d = a·b + c for one 16×8×16 tile held by a whole warp, with
// T = bf16 or f16 operands packed two per 32-bit register and f32 accumulators, in the
// fragment layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"). With g = lane >> 2 and t = lane & 3 (lane = threadIdx.x & 31, 1-D blocks):
//   A 16×16 row-major, 4 regs: a[0] = A[g][2t..2t+1]     a[1] = A[g+8][2t..2t+1]
//                              a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   B 16×8 "col", 2 regs:      b[0] = B[2t..2t+1][g]     b[1] = B[2t+8..2t+9][g]
//   C/D 16×8 f32, 4 values:    c[0..1] = C[g][2t..2t+1]  c[2..3] = C[g+8][2t..2t+1]
// The lower-indexed element of a pair sits in the low 16 bits. Every lane of the warp must
// call it together (it is .sync.aligned).
//   * sm_80+: one `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`.
//   * the simulator: the same product in f32 from the same fragments, gathered with warp
//     shuffles — so a kernel's fragment indexing is checked on the CPU. (The hardware
//     accumulates in its own order; the tests' tolerances cover that.)

// Two storage values packed into one register, `lo` in the low half.
__device__ __forceinline__ unsigned pack2(bf16 lo, bf16 hi) {
    return (unsigned)__bfloat16_as_ushort(lo) | ((unsigned)__bfloat16_as_ushort(hi) << 16);
}
__device__ __forceinline__ unsigned pack2(f16 lo, f16 hi) {
    return (unsigned)__half_as_ushort(lo) | ((unsigned)__half_as_ushort(hi) << 16);
}

// The two halves of a packed register, as f32.
template <typename T> __device__ __forceinline__ float unpack_lo(unsigned r);
template <typename T> __device__ __forceinline__ float unpack_hi(unsigned r);
template <> __device__ __forceinline__ float unpack_lo<bf16>(unsigned r) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)(r & 0xFFFFu)));
}
template <> __device__ __forceinline__ float unpack_hi<bf16>(unsigned r) {
    return __bfloat162float(__ushort_as_bfloat16((unsigned short)(r >> 16)));
}
template <> __device__ __forceinline__ float unpack_lo<f16>(unsigned r) {
    return __half2float(__ushort_as_half((unsigned short)(r & 0xFFFFu)));
}
template <> __device__ __forceinline__ float unpack_hi<f16>(unsigned r) {
    return __half2float(__ushort_as_half((unsigned short)(r >> 16)));
}

// The portable product: each lane gathers the rows g, g+8 of A and the columns 2t, 2t+1 of
// B it needs from the lanes that hold them (16 shuffles of 64 bits), then sums in f32.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16_portable(float d[4], const unsigned a[4],
                                                      const unsigned b[2], const float c[4]) {
    const int lane = (int)(threadIdx.x & 31u);
    const int g = lane >> 2, t = lane & 3;
    const unsigned long long a01 = (unsigned long long)a[0] | ((unsigned long long)a[1] << 32);
    const unsigned long long a23 = (unsigned long long)a[2] | ((unsigned long long)a[3] << 32);
    const unsigned long long b01 = (unsigned long long)b[0] | ((unsigned long long)b[1] << 32);
    float acc[4] = {c[0], c[1], c[2], c[3]};
    for (int s = 0; s < 4; ++s) {
        // Lane g*4+s holds A[g][2s..2s+1], A[g+8][2s..], A[g][2s+8..], A[g+8][2s+8..];
        // lane n*4+s holds B[2s..2s+1][n] and B[2s+8..2s+9][n].
        const unsigned long long x01 = __shfl_sync(0xffffffffu, a01, g * 4 + s);
        const unsigned long long x23 = __shfl_sync(0xffffffffu, a23, g * 4 + s);
        const unsigned long long y0 = __shfl_sync(0xffffffffu, b01, (2 * t) * 4 + s);
        const unsigned long long y1 = __shfl_sync(0xffffffffu, b01, (2 * t + 1) * 4 + s);
        const unsigned ar[4] = {(unsigned)x01, (unsigned)(x01 >> 32), (unsigned)x23,
                                (unsigned)(x23 >> 32)};
        const unsigned b_n0[2] = {(unsigned)y0, (unsigned)(y0 >> 32)};
        const unsigned b_n1[2] = {(unsigned)y1, (unsigned)(y1 >> 32)};
        for (int half = 0; half < 2; ++half) {  // k = 2s, 2s+1, then 2s+8, 2s+9
            const unsigned lo_row = ar[2 * half], hi_row = ar[2 * half + 1];
            const float a_g[2] = {unpack_lo<T>(lo_row), unpack_hi<T>(lo_row)};
            const float a_g8[2] = {unpack_lo<T>(hi_row), unpack_hi<T>(hi_row)};
            const float bn0[2] = {unpack_lo<T>(b_n0[half]), unpack_hi<T>(b_n0[half])};
            const float bn1[2] = {unpack_lo<T>(b_n1[half]), unpack_hi<T>(b_n1[half])};
            for (int j = 0; j < 2; ++j) {
                acc[0] += a_g[j] * bn0[j];
                acc[1] += a_g[j] * bn1[j];
                acc[2] += a_g8[j] * bn0[j];
                acc[3] += a_g8[j] * bn1[j];
            }
        }
    }
    d[0] = acc[0];
    d[1] = acc[1];
    d[2] = acc[2];
    d[3] = acc[3];
}

// The two adjacent storage values at `p` (4-byte aligned) as one packed register.
template <typename T>
__device__ __forceinline__ unsigned load_pair(const T* p) {
#if defined(LORAFUSE_SIM)
    unsigned r;
    memcpy(&r, p, 4);
    return r;
#else
    return *reinterpret_cast<const unsigned*>(p);
#endif
}

// ldmatrix_x4(r, row): four 8×8 matrices of 16-bit values from shared memory, the warp's
// fragments for mma_m16n8k16 (`ldmatrix.sync.aligned.m8n8.x4.shared.b16`). Lane l passes
// the address of row l % 8 of matrix l / 8 (16-byte aligned); it receives in r[j] the
// values (row l / 4, columns 2·(l % 4) and 2·(l % 4) + 1) of matrix j, lower column in the
// low half — the A/B fragment layout above. The simulator (and any pre-sm_80 build) gathers
// the row addresses with shuffles and reads the pairs itself.

// The .trans and .x2 forms. `.trans` delivers each 8×8 matrix transposed: lane l receives
// in r[j] the values (rows 2·(l % 4) and 2·(l % 4) + 1, column l / 4) of matrix j, the lower
// row in the low half — so a k-major tile in shared memory yields the "col" B fragment (or a
// row-major A fragment of its transpose) with no transposing stores. `.x2` loads matrices 0
// and 1 only, from the row addresses of lanes 0..15 (the other lanes' addresses are ignored,
// as the PTX ISA says). Every row address must be 16-byte aligned: the simulator fails the
// launch otherwise, as the GPU faults.
template <typename T, int N, bool Trans>
__device__ __forceinline__ void ldmatrix_portable(unsigned r[N], const T* row) {
    const int lane = (int)(threadIdx.x & 31u);
#if defined(LORAFUSE_SIM)
    if (lane < 8 * N) {
        lf_sim::require_aligned(row, 16, "ldmatrix row address");
        lf_sim::require_shared(row, 16, "ldmatrix row address");
    }
#endif
    for (int j = 0; j < N; ++j) {
        if (!Trans) {
            const unsigned long long src =
                __shfl_sync(0xffffffffu, (unsigned long long)row, j * 8 + lane / 4);
            r[j] = load_pair(reinterpret_cast<const T*>(src) + 2 * (lane % 4));
        } else {
            const unsigned long long s0 =
                __shfl_sync(0xffffffffu, (unsigned long long)row, j * 8 + 2 * (lane % 4));
            const unsigned long long s1 =
                __shfl_sync(0xffffffffu, (unsigned long long)row, j * 8 + 2 * (lane % 4) + 1);
            const T lo = reinterpret_cast<const T*>(s0)[lane / 4];
            const T hi = reinterpret_cast<const T*>(s1)[lane / 4];
            r[j] = pack2(lo, hi);
        }
    }
}

template <typename T>
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const T* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LORAFUSE_SIM)
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#else
    ldmatrix_portable<T, 4, false>(r, row);
#endif
}

template <typename T>
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const T* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LORAFUSE_SIM)
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#else
    ldmatrix_portable<T, 4, true>(r, row);
#endif
}

template <typename T>
__device__ __forceinline__ void ldmatrix_x2(unsigned r[2], const T* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LORAFUSE_SIM)
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
#else
    ldmatrix_portable<T, 2, false>(r, row);
#endif
}

template <typename T>
__device__ __forceinline__ void ldmatrix_x2_trans(unsigned r[2], const T* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LORAFUSE_SIM)
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
#else
    ldmatrix_portable<T, 2, true>(r, row);
#endif
}

// ---- Asynchronous copies global → shared: one wrapper, two implementations ---------------
// cp_async16(dst, src, src_bytes): copies src_bytes (0..16) bytes from global `src` to shared
// `dst` and zero-fills the rest of the 16 (`cp.async.cg.shared.global [dst], [src], 16,
// src_bytes`: src_bytes = 0 is a pure zero fill, the predicated-off edge of a tile; `src`
// must still be a valid address, pass the operand's base). Both addresses 16-byte aligned.
// The copy belongs to the calling thread's current group: cp_async_commit() closes the group;
// cp_async_wait<N>() blocks until at most N of this thread's committed groups are pending.
// The data is visible to the calling thread after the wait that covers it, to other threads
// after that wait and a __syncthreads(). The simulator follows this strictly: a copy's
// destination holds poison (0xFF bytes, NaN) from the issue until the covering wait, so a
// kernel that reads too early fails its test; misaligned addresses fail the launch.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if defined(LORAFUSE_SIM)
    lf_sim::cp_async16(dst, src, src_bytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src),
                 "r"(src_bytes));
#else
    unsigned char* d = static_cast<unsigned char*>(dst);
    const unsigned char* s = static_cast<const unsigned char*>(src);
    for (int i = 0; i < 16; ++i) d[i] = i < src_bytes ? s[i] : 0;
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(LORAFUSE_SIM)
    lf_sim::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// In the simulator the wait is a mutation site named by its caller's file and line (lf_sim.h).
#if defined(LORAFUSE_SIM)
template <int N>
__device__ __forceinline__ void cp_async_wait(const char* lf_file = __builtin_FILE(),
                                              unsigned lf_line = __builtin_LINE()) {
    lf_sim::cp_async_wait(N, lf_file, lf_line);
}
#else
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2],
                                             const float c[4]);

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(LORAFUSE_SIM)
template <>
__device__ __forceinline__ void mma_m16n8k16<bf16>(float d[4], const unsigned a[4],
                                                   const unsigned b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
}
template <>
__device__ __forceinline__ void mma_m16n8k16<f16>(float d[4], const unsigned a[4],
                                                  const unsigned b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
}
#else
template <>
__device__ __forceinline__ void mma_m16n8k16<bf16>(float d[4], const unsigned a[4],
                                                   const unsigned b[2], const float c[4]) {
    mma_m16n8k16_portable<bf16>(d, a, b, c);
}
template <>
__device__ __forceinline__ void mma_m16n8k16<f16>(float d[4], const unsigned a[4],
                                                  const unsigned b[2], const float c[4]) {
    mma_m16n8k16_portable<f16>(d, a, b, c);
}
#endif

}  // namespace lf
