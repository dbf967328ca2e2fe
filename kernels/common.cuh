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

// ---- Hopper (sm_90a): TMA, mbarrier, wgmma, named barriers, setmaxnreg ------------------
// One wrapper per feature, each with two implementations: the PTX instruction when compiled
// for sm_90a (`__CUDA_ARCH_FEAT_SM90_ALL`, nvcc's -gencode=arch=compute_90a,code=sm_90a), and
// the simulator's model of the PTX ISA's definition (sim/README.md, "Hopper"). For any other
// GPU target they __trap(): the kernels that use them guard their bodies with LF_SM90A, so
// the sm_80/sm_90 builds never reach them. Only kernels instantiate them (the templates are
// not compiled for a target until then).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(LORAFUSE_SIM)
#define LF_SM90A 1
#endif

// The `.shared` window address of a shared-memory pointer (the simulator: its offset in the
// block's dynamic shared memory, the only shared memory its async proxy reaches).
__device__ __forceinline__ unsigned smem_addr(const void* p, unsigned bytes = 1) {
#if defined(LORAFUSE_SIM)
    return lf_sim::smem_window(p, bytes, "shared-memory operand");
#else
    (void)bytes;
    return (unsigned)__cvta_generic_to_shared(p);
#endif
}

// The swizzle modes of a wgmma matrix descriptor, by their code in bits 62-63.
enum class Swizzle : unsigned { none = 0, b128 = 1, b64 = 2, b32 = 3 };

// A shared-memory matrix descriptor for wgmma (PTX ISA, "Matrix Descriptor Format" in the
// wgmma section; the fields of CUTLASS's GmmaDescriptor): bits 0-13 the start address >> 4,
// 16-29 the leading dimension byte offset >> 4, 32-45 the stride dimension byte offset >> 4,
// 49-51 the matrix base offset (0 here: operands aligned to their swizzle pattern, 1024 bytes
// for 128 B), 62-63 the swizzle mode. For K-major operands (A: rows of M, B: rows of N, 16
// k-values each): without swizzle, core matrices of 8 rows × 16 bytes, LBO = bytes between the
// two core matrices along K, SBO = bytes between 8-row groups; swizzled with span W = 32/64/128
// bytes, rows W bytes apart, SBO = bytes between 8-row groups (8·W when packed), LBO unused
// (pass 16), and the start advanced by 32 bytes per k16 step inside a W-byte row.
// For MN-major operands (wgmma's TransA / TransB: rows of K, M or N contiguous) the roles
// differ: without swizzle, core matrices of 8 k-rows × 8 elements (16 bytes), SBO = bytes
// between core matrices along M/N, LBO = bytes between the two along K (the start advanced by
// 2·LBO per k16 step); swizzled with span W, atoms of 8 k-rows W bytes apart, each row W/2
// consecutive 16-bit elements of M/N, LBO = bytes between atoms along M/N (unused when M/N fits
// in one), SBO = bytes between the two 8-k-row groups of a k16 step (8·W when packed; the start
// advanced by 2·SBO per k16 step). E.g. a TMA box of 64 bf16 columns × K rows with the 128 B
// swizzle is an MN-major B of N = 64 with SBO = 1024.
__device__ __forceinline__ u64 make_smem_desc(const void* start, unsigned lbo_bytes, unsigned sbo_bytes,
                                              Swizzle swizzle) {
    const u64 addr = smem_addr(start);
    return ((addr & 0x3FFFFull) >> 4) | ((u64)((lbo_bytes >> 4) & 0x3FFFu) << 16) |
           ((u64)((sbo_bytes >> 4) & 0x3FFFu) << 32) | ((u64)swizzle << 62);
}

// fence.proxy.async.shared::cta: this thread's ordinary stores to shared memory become visible
// to the async proxy (TMA, wgmma) — needed between writing an operand with stores and a
// wgmma that reads it (the simulator fails the launch when the fence is missing).
__device__ __forceinline__ void fence_proxy_async() {
#if defined(LORAFUSE_SIM)
    lf_sim::fence_proxy_async();
#elif defined(LF_SM90A)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
    __trap();
#endif
}

// mbarrier (PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier"):
// a 64-bit object in shared memory (8-byte aligned). init sets the arrivals a phase expects;
// a phase completes when they have all arrived and the transaction count (bytes announced
// by expect_tx minus bytes completed by TMA copies) is zero. try_wait_parity(P) is true once
// the phase with parity P has completed; the first phase has parity 0.
__device__ __forceinline__ void mbarrier_init(u64* bar, unsigned count) {
#if defined(LORAFUSE_SIM)
    lf_sim::mbarrier_init(bar, count);
#elif defined(LF_SM90A)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#else
    (void)bar, (void)count;
    __trap();
#endif
}
__device__ __forceinline__ void mbarrier_arrive(u64* bar) {
#if defined(LORAFUSE_SIM)
    lf_sim::mbarrier_arrive(bar);
#elif defined(LF_SM90A)
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#else
    (void)bar;
    __trap();
#endif
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(u64* bar, unsigned bytes) {
#if defined(LORAFUSE_SIM)
    lf_sim::mbarrier_arrive_expect_tx(bar, bytes);
#elif defined(LF_SM90A)
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
#else
    (void)bar, (void)bytes;
    __trap();
#endif
}
__device__ __forceinline__ bool mbarrier_try_wait_parity(u64* bar, unsigned parity) {
#if defined(LORAFUSE_SIM)
    return lf_sim::mbarrier_try_wait_parity(bar, parity);
#elif defined(LF_SM90A)
    unsigned done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    return done != 0;
#else
    (void)bar, (void)parity;
    __trap();
    return false;
#endif
}
// Waits until the phase with parity `parity` has completed. In the simulator the wait is a
// mutation site named by its caller's file and line (lf_sim.h), as cp_async_wait is.
#if defined(LORAFUSE_SIM)
__device__ __forceinline__ void mbarrier_wait_parity(u64* bar, unsigned parity,
                                                     const char* lf_file = __builtin_FILE(),
                                                     unsigned lf_line = __builtin_LINE()) {
    if (lf_sim::site_deleted(lf_sim::kSiteMbarrierWait, lf_file, lf_line)) return;
    while (!mbarrier_try_wait_parity(bar, parity)) {
    }
}
#else
__device__ __forceinline__ void mbarrier_wait_parity(u64* bar, unsigned parity) {
    while (!mbarrier_try_wait_parity(bar, parity)) {
    }
}
#endif

// A tensor map (CUtensorMap: 128 bytes, 64-byte aligned) made on the host by
// cuTensorMapEncodeTiled — in the simulator by lf_sim_tensor_map_encode_2d — passed to the
// kernel in its parameters or global memory.
struct __align__(64) TensorMap {
    u64 opaque[16];
};

// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes: the box of
// `map` at element coordinates (c0 inner, c1 outer) into shared memory at `dst` (128-byte
// aligned; 1024 for the 128 B swizzle), completing its bytes on `bar`. Out-of-bounds elements
// read as zeros; the map's swizzle permutes 16-byte chunks as wgmma's descriptors expect.
// Issue it after (or before) an mbarrier_arrive_expect_tx of the box's bytes; the data is
// there once the mbarrier's phase completes (the simulator: poison until then).
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int c0, int c1, u64* bar) {
#if defined(LORAFUSE_SIM)
    lf_sim::tma_load_2d(dst, map, c0, c1, bar);
#elif defined(LF_SM90A)
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            smem_addr(dst)),
        "l"(map), "r"(c0), "r"(c1), "r"(smem_addr(bar))
        : "memory");
#else
    (void)dst, (void)map, (void)c0, (void)c1, (void)bar;
    __trap();
#endif
}

// Named barriers: bar.sync id, n (wait until n threads, a multiple of 32, have arrived at
// barrier id) and bar.arrive id, n (count towards it without waiting). ids 1..15: 0 is
// __syncthreads'.
__device__ __forceinline__ void named_barrier_sync(unsigned id, unsigned n) {
#if defined(LORAFUSE_SIM)
    lf_sim::named_barrier(id, n, true);
#elif defined(LF_SM90A)
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
#else
    (void)id, (void)n;
    __trap();
#endif
}
__device__ __forceinline__ void named_barrier_arrive(unsigned id, unsigned n) {
#if defined(LORAFUSE_SIM)
    lf_sim::named_barrier(id, n, false);
#elif defined(LF_SM90A)
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(n) : "memory");
#else
    (void)id, (void)n;
    __trap();
#endif
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 N: the warpgroup's register budget per thread (a
// multiple of 8 in 24..256). Warpgroup-collective: all 128 threads, the same N (the simulator
// checks that; the count itself has no effect there).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: a multiple of 8 in 24..256");
#if defined(LORAFUSE_SIM)
    lf_sim::setmaxnreg(true, N);
#elif defined(LF_SM90A)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#else
    __trap();
#endif
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg: a multiple of 8 in 24..256");
#if defined(LORAFUSE_SIM)
    lf_sim::setmaxnreg(false, N);
#elif defined(LF_SM90A)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#else
    __trap();
#endif
}

// wgmma.fence / commit_group / wait_group N (warpgroup-level). A wgmma's accumulators must
// not be read (or written) between its issue and the wait that covers its group; wgmma_fence
// must precede the first wgmma of a batch whose registers were written by other
// instructions. The simulator poisons the accumulators (NaN) until the covering wait.
__device__ __forceinline__ void wgmma_fence() {
#if defined(LORAFUSE_SIM)
    lf_sim::wgmma_fence();
#elif defined(LF_SM90A)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    __trap();
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(LORAFUSE_SIM)
    lf_sim::wgmma_commit();
#elif defined(LF_SM90A)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    __trap();
#endif
}
// (A mutation site in the simulator, like cp_async_wait.)
#if defined(LORAFUSE_SIM)
template <int N>
__device__ __forceinline__ void wgmma_wait(const char* lf_file = __builtin_FILE(),
                                           unsigned lf_line = __builtin_LINE()) {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group: 0..7");
    if (lf_sim::site_deleted(lf_sim::kSiteWgmmaWait, lf_file, lf_line)) return;
    lf_sim::wgmma_wait(N);
}
#else
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    static_assert(N >= 0 && N <= 7, "wgmma.wait_group: 0..7");
#if defined(LF_SM90A)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
    __trap();
#endif
}
#endif

// Pins accumulator registers in place around asynchronous wgmmas: an empty asm that "reads
// and writes" each, so the compiler neither moves nor copies them between a wgmma's issue
// and the wait that covers it (CUTLASS's warpgroup_fence_operand). No-op in the simulator.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#if !defined(LORAFUSE_SIM)
    LF_UNROLL
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d;
#endif
}
// The same for the A registers of wgmma_rs_m64nNk16, which must stay unchanged until the wait.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(unsigned (&a)[N]) {
#if !defined(LORAFUSE_SIM)
    LF_UNROLL
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i])::"memory");
#else
    (void)a;
#endif
}

// The operand type's name in the wgmma instruction.
template <typename T> struct wgmma_type;
template <> struct wgmma_type<bf16> { static constexpr bool is_bf16 = true; };
template <> struct wgmma_type<f16> { static constexpr bool is_bf16 = false; };

#if defined(LF_SM90A)
// The asm of wgmma.mma_async m64nNk16 with .f32 accumulators, one macro per N (d[i] is %i),
// for both forms: TY the type's name; IP the predicate input's operand (scale-d), AB the A
// and B operands and TAIL the trailing immediates, as the form has them (below); then the
// inputs. Immediates must be literals in the instruction text: the transposes are spliced in
// as "0" or "1".
// clang-format off
#define LF_WGMMA_ASM_N8(TY, IP, AB, TAIL, ...) \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, " IP ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n8k16.f32." TY "." TY " {" \
        "%0, %1, %2, %3" \
        "}, " AB ", p, 1, 1, " TAIL ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) \
        : __VA_ARGS__)
#define LF_WGMMA_ASM_N16(TY, IP, AB, TAIL, ...) \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, " IP ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " {" \
        "%0, %1, %2, %3, %4, %5, %6, %7" \
        "}, " AB ", p, 1, 1, " TAIL ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
        : __VA_ARGS__)
#define LF_WGMMA_ASM_N32(TY, IP, AB, TAIL, ...) \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, " IP ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " {" \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
        "}, " AB ", p, 1, 1, " TAIL ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
        : __VA_ARGS__)
#define LF_WGMMA_ASM_N64(TY, IP, AB, TAIL, ...) \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, " IP ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {" \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
        "}, " AB ", p, 1, 1, " TAIL ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : __VA_ARGS__)
#define LF_WGMMA_ASM_N128(TY, IP, AB, TAIL, ...) \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, " IP ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {" \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
        "}, " AB ", p, 1, 1, " TAIL ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : __VA_ARGS__)
#define LF_WGMMA_ASM_N256(TY, IP, AB, TAIL, ...) \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, " IP ", 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {" \
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
        "}, " AB ", p, 1, 1, " TAIL ";\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
        : __VA_ARGS__)
// The shared-memory form (SS) of the N-macro M, for the wrapper's T, TransA and TransB
// (template parameters in scope): IP "%(N/2 + 2)", AB "%(N/2), %(N/2 + 1)" (the descriptors).
#define LF_WGMMA_SS_T(M, TY, IP, AB, TA, TB) M(TY, IP, AB, TA ", " TB, "l"(desc_a), "l"(desc_b), "r"(scale_d))
#define LF_WGMMA_TRANS_SS(M, TY, IP, AB) \
    if constexpr (TransA && TransB) LF_WGMMA_SS_T(M, TY, IP, AB, "1", "1"); \
    else if constexpr (TransA) LF_WGMMA_SS_T(M, TY, IP, AB, "1", "0"); \
    else if constexpr (TransB) LF_WGMMA_SS_T(M, TY, IP, AB, "0", "1"); \
    else LF_WGMMA_SS_T(M, TY, IP, AB, "0", "0")
#define LF_WGMMA_SS(M, IP, AB) \
    if constexpr (wgmma_type<T>::is_bf16) { LF_WGMMA_TRANS_SS(M, "bf16", IP, AB); } else { LF_WGMMA_TRANS_SS(M, "f16", IP, AB); }
// The register form (RS; no imm-trans-a), for T and TransB: IP "%(N/2 + 5)", AB
// "{%(N/2) .. %(N/2 + 3)}, %(N/2 + 4)" (A's four registers, B's descriptor).
#define LF_WGMMA_RS_T(M, TY, IP, AB, TB) \
    M(TY, IP, AB, TB, "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d))
#define LF_WGMMA_TRANS_RS(M, TY, IP, AB) \
    if constexpr (TransB) LF_WGMMA_RS_T(M, TY, IP, AB, "1"); \
    else LF_WGMMA_RS_T(M, TY, IP, AB, "0")
#define LF_WGMMA_RS(M, IP, AB) \
    if constexpr (wgmma_type<T>::is_bf16) { LF_WGMMA_TRANS_RS(M, "bf16", IP, AB); } else { LF_WGMMA_TRANS_RS(M, "f16", IP, AB); }
// clang-format on
#endif

// wgmma_m64nNk16<T, N, TransA, TransB>(d, desc_a, desc_b, accumulate): the warpgroup's 64×N f32
// tile D = A·Bᵀ + (accumulate ? D : 0), A 64×16 and B N×16 of T (bf16 or f16), both in shared
// memory through their descriptors (make_smem_desc): K-major by default; TransA / TransB
// (PTX's imm-trans-a / imm-trans-b) read A / B MN-major — M (resp. N) the contiguous dimension,
// e.g. a row-major K×N B tile as TMA lands it (for the descriptor fields of each layout see
// make_smem_desc). `d` is this thread's N/2 accumulators: d[i] holds row 16·(warp % 4) +
// lane / 4 + 8·((i / 2) % 2), column 8·(i / 4) + 2·(lane % 4) + i % 2 (PTX ISA, wgmma register
// fragments for .f32 D). All 128 threads of a warpgroup (warps 4g..4g+3) issue it together with
// the same descriptors and flags; it is asynchronous: commit, then wait, before touching d. N is
// a multiple of 8 up to 256 (on the GPU 8, 16, 32, 64, 128 or 256).
template <typename T, int N, bool TransA = false, bool TransB = false>
__device__ __forceinline__ void wgmma_m64nNk16(float (&d)[N / 2], u64 desc_a, u64 desc_b, bool accumulate) {
    static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma m64nNk16: N a multiple of 8 up to 256");
#if defined(LORAFUSE_SIM)
    lf_sim::wgmma(d, N, wgmma_type<T>::is_bf16 ? 0 : 1, desc_a, desc_b, accumulate, TransA, TransB);
#elif defined(LF_SM90A)
    const unsigned scale_d = accumulate ? 1u : 0u;
    if constexpr (N == 8) {
        LF_WGMMA_SS(LF_WGMMA_ASM_N8, "%6", "%4, %5");
    } else if constexpr (N == 16) {
        LF_WGMMA_SS(LF_WGMMA_ASM_N16, "%10", "%8, %9");
    } else if constexpr (N == 32) {
        LF_WGMMA_SS(LF_WGMMA_ASM_N32, "%18", "%16, %17");
    } else if constexpr (N == 64) {
        LF_WGMMA_SS(LF_WGMMA_ASM_N64, "%34", "%32, %33");
    } else if constexpr (N == 128) {
        LF_WGMMA_SS(LF_WGMMA_ASM_N128, "%66", "%64, %65");
    } else if constexpr (N == 256) {
        LF_WGMMA_SS(LF_WGMMA_ASM_N256, "%130", "%128, %129");
    } else {
        static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 128 || N == 256,
                      "wgmma on the GPU: N = 8, 16, 32, 64, 128 or 256 have wrappers");
    }
#else
    (void)d, (void)desc_a, (void)desc_b, (void)accumulate;
    __trap();
#endif
}

// wgmma_rs_m64nNk16<T, N, TransB>(d, a, desc_b, accumulate): as wgmma_m64nNk16, with A from
// registers (PTX's register form, which has no imm-trans-a): `a` is this thread's A fragment
// (PTX ISA, "Register Fragments" for wgmma .f16/.bf16 A): with g = 16·(warp % 4) + lane / 4 and
// t = lane % 4, a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..2t+1], a[2] = A[g][2t+8..2t+9],
// a[3] = A[g+8][2t+8..2t+9], the lower column in the low 16 bits — the layout of an
// mma.m16n8k16 A fragment per warp, and of the f32 accumulators' columns 0..15 (so a wgmma's
// result, converted and packed in pairs, is the next one's A). The registers must not be
// modified until the wgmma_wait that covers this wgmma (pin them with wgmma_fence_operands; the
// simulator checks them at that wait, so keep the array alive until then), and a wgmma_fence
// must separate writing them from the wgmma.
template <typename T, int N, bool TransB = false>
__device__ __forceinline__ void wgmma_rs_m64nNk16(float (&d)[N / 2], const unsigned (&a)[4], u64 desc_b,
                                                  bool accumulate) {
    static_assert(N >= 8 && N <= 256 && N % 8 == 0, "wgmma m64nNk16: N a multiple of 8 up to 256");
#if defined(LORAFUSE_SIM)
    lf_sim::wgmma_rs(d, N, wgmma_type<T>::is_bf16 ? 0 : 1, a, desc_b, accumulate, TransB);
#elif defined(LF_SM90A)
    const unsigned scale_d = accumulate ? 1u : 0u;
    if constexpr (N == 8) {
        LF_WGMMA_RS(LF_WGMMA_ASM_N8, "%9", "{%4, %5, %6, %7}, %8");
    } else if constexpr (N == 16) {
        LF_WGMMA_RS(LF_WGMMA_ASM_N16, "%13", "{%8, %9, %10, %11}, %12");
    } else if constexpr (N == 32) {
        LF_WGMMA_RS(LF_WGMMA_ASM_N32, "%21", "{%16, %17, %18, %19}, %20");
    } else if constexpr (N == 64) {
        LF_WGMMA_RS(LF_WGMMA_ASM_N64, "%37", "{%32, %33, %34, %35}, %36");
    } else if constexpr (N == 128) {
        LF_WGMMA_RS(LF_WGMMA_ASM_N128, "%69", "{%64, %65, %66, %67}, %68");
    } else if constexpr (N == 256) {
        LF_WGMMA_RS(LF_WGMMA_ASM_N256, "%133", "{%128, %129, %130, %131}, %132");
    } else {
        static_assert(N == 8 || N == 16 || N == 32 || N == 64 || N == 128 || N == 256,
                      "wgmma on the GPU: N = 8, 16, 32, 64, 128 or 256 have wrappers");
    }
#else
    (void)d, (void)a, (void)desc_b, (void)accumulate;
    __trap();
#endif
}

}  // namespace lf
