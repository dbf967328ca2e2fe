// lf_sim.h — the CUDA names that kernel code uses, for the simulator (DESIGN §7).
//
// `kernels/*.cu` are compiled by the host C++20 compiler with -DLORAFUSE_SIM; common.cuh
// then includes this header instead of the CUDA headers. It defines the qualifiers, the
// built-in variables, vector and 16-bit float types, math and bit intrinsics, atomics, and
// declares the synchronising intrinsics (barriers, warp collectives, __trap) that
// runtime.cpp implements on OS threads: one thread per CUDA thread of a block. See
// README.md beside this file for the execution model and what it checks.
#pragma once

#include <atomic>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
// libstdc++ spells a GNU attribute `__noinline__` in <memory>'s headers: include them before
// the macro of that name below, so a later `#include <memory>` is a no-op.
#include <memory>

// ---- Qualifiers --------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// A kernel parameter the GPU keeps in parameter space, addressable (a TMA tensor map); here the
// parameter is an ordinary by-value copy, addressable anyway.
#define __grid_constant__
// A GNU attribute rather than alignas: CUDA code puts __align__ wherever a GNU attribute may go.
#define __align__(n) __attribute__((aligned(n)))
// Blocks of a launch run one after another and launches are serialised, so one static per
// declaration is exactly "this block's shared memory". The statics live in the section
// `lf_sim_shared`, which the runtime fills with 0xFF bytes (NaN) before every block, as CUDA
// leaves shared memory uninitialised. Not under AddressSanitizer: GCC gives globals in a
// named section no red zones, and the ASan build is there to catch overflows of these arrays.
// (g++ rejects, with "section type conflict", a translation unit that mixes a `__shared__` in
// an inline function or template of a NAMED namespace with one in a kernel or an anonymous
// namespace: keep kernel helpers in an anonymous namespace, as every kernel here does.)
// Dynamic shared memory: LF_DYNAMIC_SMEM.
#if defined(__SANITIZE_ADDRESS__)
#define __shared__ static
#else
#define __shared__ static __attribute__((section("lf_sim_shared")))
#endif

// ---- Vector types (CUDA's layouts and alignments) ----------------------------------------

#define LF_SIM_VEC2(name, T, align) \
    struct alignas(align) name {    \
        T x, y;                     \
    };                              \
    inline constexpr name make_##name(T x, T y) { return name{x, y}; }
#define LF_SIM_VEC3(name, T) \
    struct name {            \
        T x, y, z;           \
    };                       \
    inline constexpr name make_##name(T x, T y, T z) { return name{x, y, z}; }
#define LF_SIM_VEC4(name, T, align) \
    struct alignas(align) name {    \
        T x, y, z, w;               \
    };                              \
    inline constexpr name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }

LF_SIM_VEC2(char2, signed char, 2)
LF_SIM_VEC4(char4, signed char, 4)
LF_SIM_VEC2(uchar2, unsigned char, 2)
LF_SIM_VEC4(uchar4, unsigned char, 4)
LF_SIM_VEC2(short2, short, 4)
LF_SIM_VEC4(short4, short, 8)
LF_SIM_VEC2(ushort2, unsigned short, 4)
LF_SIM_VEC4(ushort4, unsigned short, 8)
LF_SIM_VEC2(int2, int, 8)
LF_SIM_VEC3(int3, int)
LF_SIM_VEC4(int4, int, 16)
LF_SIM_VEC2(uint2, unsigned, 8)
LF_SIM_VEC3(uint3, unsigned)
LF_SIM_VEC4(uint4, unsigned, 16)
LF_SIM_VEC2(float2, float, 8)
LF_SIM_VEC3(float3, float)
LF_SIM_VEC4(float4, float, 16)
LF_SIM_VEC2(double2, double, 16)
LF_SIM_VEC2(longlong2, long long, 16)
LF_SIM_VEC2(ulonglong2, unsigned long long, 16)

#undef LF_SIM_VEC2
#undef LF_SIM_VEC3
#undef LF_SIM_VEC4

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---- Built-in variables -------------------------------------------------------------------

// Set by the runtime in each simulated thread before the kernel runs.
inline thread_local uint3 threadIdx{};
inline thread_local uint3 blockIdx{};
inline thread_local dim3 blockDim{};
inline thread_local dim3 gridDim{};
inline constexpr int warpSize = 32;

// ---- Runtime services and the kernel registry ---------------------------------------------

namespace lf_sim {

// This block's dynamic shared memory: 16-byte aligned, exactly the launch's byte count, a
// fresh heap allocation per block (so AddressSanitizer sees overflows), filled with 0xFF
// bytes (NaN in every float type) because CUDA leaves it uninitialised.
void* dynamic_smem();

// Fails the running launch with `what` (prefixed with the kernel, block and thread), wakes
// every thread of the block that waits in a barrier or warp collective, and unwinds this
// thread out of the kernel. Used by __trap, assert and the runtime's own checks.
[[noreturn]] void fail(const char* what);
[[noreturn]] void fail_assert(const char* expr, const char* file, int line, const char* func);

// Fails the launch ("misaligned <what>: address 0x… is not <align>-byte aligned") unless
// `p` is `align`-byte aligned: the GPU faults on a misaligned vector, ldmatrix or cp.async
// access, so the simulator makes it a launch error too.
__attribute__((access(none, 1))) void require_aligned(const void* p, size_t align, const char* what);
// `[p, p + bytes)` lies in the block's shared memory (a static `__shared__` array or the
// dynamic allocation): cp.async destinations and ldmatrix rows must, the GPU faults
// otherwise. Not checked under AddressSanitizer, where static arrays are not in
// lf_sim_shared.
__attribute__((access(none, 1))) void require_shared(const void* p, size_t bytes, const char* what);

// cp.async (common.cuh's lf::cp_async16 / cp_async_commit / cp_async_wait<N>), as the PTX
// ISA defines cp.async / commit_group / wait_group, per simulated thread: cp_async16 reads
// the `src_bytes` source bytes (the rest of the 16 zero-filled) at the issue, fills the 16
// destination bytes with 0xFF (NaN) and adds the copy to the thread's open group; commit
// closes the open group (an empty one too); wait(n) lands the captured bytes of every
// committed group but the thread's newest n. Copies never committed are covered by no wait.
// A thread that exits with a copy still pending (committed or not) fails the launch: on a GPU
// it may land in shared memory that the next block already uses. Both addresses must be 16-byte
// aligned and the destination in this block's shared memory (else the launch fails).
void cp_async16(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n, const char* file, unsigned line);

// ---- Hopper's asynchronous machinery (common.cuh's sm_90a wrappers; README: "Hopper") ----
// Each follows the PTX ISA. The waits among them (mbarrier try_wait, named barriers,
// warpgroup collectives) hand the warp baton on, so producer/consumer warp specialisation runs
// one warp at a time, and a wait nothing can satisfy is a launch error ("deadlock"), not a hang.

// The shared-window address of `p` (the `.shared` address the hardware sees): its offset in
// this block's dynamic shared memory, which is 1024-byte aligned. Fails the launch unless
// [p, p + bytes) lies in it (the async proxy reaches only dynamic shared memory here).
uint32_t smem_window(const void* p, size_t bytes, const char* what);
// fence.proxy.async: shared memory written by ordinary stores becomes visible to the async
// proxy (TMA, wgmma). The simulator keeps the async proxy's view of shared memory; a wgmma
// that reads bytes whose generic-proxy value differs from that view fails the launch.
void fence_proxy_async();
// mbarrier.init / arrive / arrive.expect_tx / expect_tx / try_wait.parity on the 8-byte
// object at `bar` (8-byte aligned). A phase completes when its pending arrival count reaches
// zero and its transaction count is zero; try_wait.parity(P) is true once the phase with
// parity P has completed (the current phase's parity differs from P) and otherwise waits
// for that (a try_wait that returns true after waiting, as the ISA allows).
void mbarrier_init(void* bar, unsigned count);
void mbarrier_arrive(void* bar);
void mbarrier_arrive_expect_tx(void* bar, unsigned bytes);
void mbarrier_expect_tx(void* bar, unsigned bytes);
bool mbarrier_try_wait_parity(void* bar, unsigned parity);
// cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes: the box at
// (c0, c1) of the tensor map `map` (LfSimTensorMap) into shared memory at `dst`, signalling
// `bar` with complete_tx of the box's bytes. Out-of-bounds elements are zeros; the swizzle
// XORs the 16-byte chunk index of each shared address with its bits 7.. (per the mode). The
// destination holds poison (0xFF) until the mbarrier phase the copy signals completes.
void tma_load_2d(void* dst, const void* map, int c0, int c1, void* bar);
// bar.sync id, n (wait) / bar.arrive id, n: named barrier `id` (1..15; 0 is __syncthreads')
// completes when n threads (a multiple of 32) have arrived.
void named_barrier(unsigned id, unsigned n, bool wait);
// setmaxnreg.{inc,dec}.sync.aligned.u32 n: a warpgroup collective that is checked to be
// warpgroup-uniform (same direction and count, 24..256, a multiple of 8); no other effect.
void setmaxnreg(bool inc, unsigned n);
// wgmma.fence / commit_group / wait_group n and wgmma.mma_async.sync.aligned.m64nNk16.f32.
// {bf16,f16} (type 0 / 1): d (this thread's N/2 f32 accumulators) = A·Bᵀ + (scale_d ? d : 0).
// wgmma: both operands in shared memory through descriptors, K-major or (trans_a / trans_b,
// PTX's imm-trans-a / imm-trans-b) MN-major. wgmma_rs: A from registers, `a` the thread's 4
// registers of the A fragment (PTX ISA, "Register Fragments"), which must keep their values
// (and stay alive) until the wait_group that covers the wgmma — checked there. A warpgroup
// collective (every flag warpgroup-uniform); the accumulators read NaN from the issue until the
// wait_group that covers it.
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int n);
void wgmma(float* d, int n, int type, std::uint64_t desc_a, std::uint64_t desc_b, bool scale_d, bool trans_a,
           bool trans_b);
void wgmma_rs(float* d, int n, int type, const std::uint32_t* a, std::uint64_t desc_b, bool scale_d, bool trans_b);

// The simulator's CUtensorMap (the 128 bytes cuTensorMapEncodeTiled fills), written by
// lf_sim_tensor_map_encode_2d on the host.
struct alignas(64) LfSimTensorMap {
    std::uint64_t magic;
    const void* base;
    std::uint64_t dim[2];      // elements; dim[0] is the contiguous one
    std::uint64_t stride1;     // bytes between consecutive dim[1] indices
    std::uint32_t box[2];      // elements
    std::uint32_t elem_bytes;  // 1, 2, 4 or 8
    std::uint32_t swizzle;     // bytes: 0 (none), 32, 64 or 128
    unsigned char reserved[72];
};
static_assert(sizeof(LfSimTensorMap) == 128);
inline constexpr std::uint64_t kTensorMapMagic = 0x4c46544d41503244ull;  // "LFTMAP2D"

// Mutation sites (src/device/sim_mutation.rs): every __syncthreads(), lf::cp_async_wait<N>(),
// lf::mbarrier_wait_parity() and lf::wgmma_wait<N>() is a site, named by the file and line of its call (default
// arguments, evaluated where the kernel calls it). A launch can record the sites it reaches,
// and can run with one site deleted (the "mutant"), so a test proves that deleting any
// barrier or wait of a kernel fails it. True when the launch's mutant deletes this site.
enum SiteKind : int { kSiteBarrier = 0, kSiteCpAsyncWait = 1, kSiteMbarrierWait = 2, kSiteWgmmaWait = 3 };
bool site_deleted(SiteKind kind, const char* file, unsigned line);

// One kernel of the registry; build.rs generates one per `extern "C" __global__` symbol.
struct KernelEntry {
    const char* name;
    size_t param_bytes;
    void (*invoke)(void* fn, const void* params);
    void* fn;
};

namespace detail {
// Copies the parameter bytes (the caller's buffer need not be aligned) and calls the kernel.
template <class P>
void invoke_as(void* fn, const void* params) {
    alignas(P) unsigned char bytes[sizeof(P)];
    std::memcpy(bytes, params, sizeof(P));
    reinterpret_cast<void (*)(P)>(fn)(*std::launder(reinterpret_cast<const P*>(bytes)));
}
}  // namespace detail

template <class P>
KernelEntry make_entry(const char* name, void (*fn)(P)) {
    static_assert(std::is_trivially_copyable_v<P>, "kernel parameters are copied as bytes");
    return KernelEntry{name, sizeof(P), &detail::invoke_as<P>, reinterpret_cast<void*>(fn)};
}

}  // namespace lf_sim

// The emulated cuTensorMapEncodeTiled for a 2-D tensor (rank 2, element strides 1, no
// interleave, out-of-bounds fill with zeros): checks what the driver checks (global address
// 16-byte aligned, stride a multiple of 16 and at least a row, box sides 1..256, the box's
// inner side a multiple of 16 bytes; a swizzled box's inner side exactly the swizzle span —
// stricter than the driver, which allows less) and fills `map` (64-byte aligned, 128 bytes).
// Returns 0, or nonzero with a message in `err`.
extern "C" int32_t lf_sim_tensor_map_encode_2d(void* map, uint32_t elem_bytes, const void* base, uint64_t dim0,
                                               uint64_t dim1, uint64_t stride1_bytes, uint32_t box0, uint32_t box1,
                                               uint32_t swizzle_bytes, char* err, size_t err_cap);

#define LF_SIM_ENTRY(sym) \
    extern "C" const lf_sim::KernelEntry lf_sim_entry_##sym = lf_sim::make_entry(#sym, &sym);

// A failed device assert fails the launch (as it traps on a GPU) instead of aborting the
// process that launched it. A later `#include <cassert>` would restore the host version.
#if !defined(NDEBUG)
#undef assert
#define assert(e) (static_cast<bool>(e) ? void(0) : lf_sim::fail_assert(#e, __FILE__, __LINE__, __func__))
#endif

// ---- Barriers, fences, __trap ---------------------------------------------------------------

void __syncthreads(const char* lf_file = __builtin_FILE(), unsigned lf_line = __builtin_LINE());
int __syncthreads_count(int predicate);
int __syncthreads_and(int predicate);
int __syncthreads_or(int predicate);
[[noreturn]] inline void __trap() { lf_sim::fail("__trap() called"); }

// The simulator's atomics are sequentially consistent, so a fence adds no ordering that
// ThreadSanitizer needs to know of (it does not model fences, and g++ warns if asked to).
inline void __threadfence() {
#if defined(__SANITIZE_THREAD__)
    std::atomic_signal_fence(std::memory_order_seq_cst);
#else
    std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}
inline void __threadfence_block() { __threadfence(); }

// ---- Warp collectives -------------------------------------------------------------------------

namespace lf_sim::detail {

enum class WarpOp : unsigned char { sync, shfl_idx, shfl_up, shfl_down, shfl_xor, ballot, any, all };

struct WarpResult {
    std::uint64_t value;  // the source lane's value (shuffles)
    unsigned ballot;      // bit i: lane i of the mask passed a nonzero value (votes)
};

// One warp collective: every lane named in `mask` must call it (with the same op and mask)
// before any returns. `arg` is the shuffle's lane / delta / lane mask.
WarpResult warp_collective(WarpOp op, unsigned mask, std::uint64_t value, unsigned value_bytes, int arg,
                           int width);

// CUDA's overloads take int for integers narrower than int (bool, char, short promote).
template <class T>
using shuffled_t = std::conditional_t<std::is_integral_v<T> && (sizeof(T) < sizeof(int)), int, T>;

template <class T>
shuffled_t<T> shuffle(WarpOp op, unsigned mask, T var, int arg, int width) {
    using V = shuffled_t<T>;
    static_assert(std::is_trivially_copyable_v<V> && (sizeof(V) == 2 || sizeof(V) == 4 || sizeof(V) == 8),
                  "warp shuffles move 2-, 4- or 8-byte values");
    V v = V(var);
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    std::uint64_t got = warp_collective(op, mask, bits, sizeof(V), arg, width).value;
    std::memcpy(&v, &got, sizeof(V));
    return v;
}

// Bit i of the result: lane i of the mask passed a nonzero predicate.
inline unsigned vote(WarpOp op, unsigned mask, int predicate) {
    return warp_collective(op, mask, predicate != 0, 4, 0, 32).ballot;
}

}  // namespace lf_sim::detail

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    lf_sim::detail::warp_collective(lf_sim::detail::WarpOp::sync, mask, 0, 0, 0, warpSize);
}
// The lanes of this warp that call it "together": it waits until every lane of the warp has
// exited, waits in __syncthreads or a warp collective, or is in __activemask, and returns
// the last set. Lanes that returned early are left out, as on a GPU; lanes of two branches
// that both reach an __activemask are counted together (the simulator has no divergence).
unsigned __activemask();

template <class T>
lf_sim::detail::shuffled_t<T> __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize) {
    return lf_sim::detail::shuffle(lf_sim::detail::WarpOp::shfl_idx, mask, var, srcLane, width);
}
template <class T>
lf_sim::detail::shuffled_t<T> __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return lf_sim::detail::shuffle(lf_sim::detail::WarpOp::shfl_up, mask, var, int(delta), width);
}
template <class T>
lf_sim::detail::shuffled_t<T> __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return lf_sim::detail::shuffle(lf_sim::detail::WarpOp::shfl_down, mask, var, int(delta), width);
}
template <class T>
lf_sim::detail::shuffled_t<T> __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize) {
    return lf_sim::detail::shuffle(lf_sim::detail::WarpOp::shfl_xor, mask, var, laneMask, width);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    return lf_sim::detail::vote(lf_sim::detail::WarpOp::ballot, mask, predicate);
}
inline int __any_sync(unsigned mask, int predicate) {
    return lf_sim::detail::vote(lf_sim::detail::WarpOp::any, mask, predicate) != 0;
}
inline int __all_sync(unsigned mask, int predicate) {
    return lf_sim::detail::vote(lf_sim::detail::WarpOp::all, mask, predicate) == mask;
}

// ---- 16-bit floats ------------------------------------------------------------------------------

namespace lf_sim::detail {

// f32 → bf16, round to nearest even; a NaN stays a (quiet) NaN.
constexpr std::uint16_t f32_to_bf16_rn(float f) {
    std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x0040u);
    // Adding 0x7fff rounds up past the halfway point; the low kept bit breaks ties to even.
    return std::uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// f32 → bf16, round toward zero.
constexpr std::uint16_t f32_to_bf16_rz(float f) {
    std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x0040u);
    return std::uint16_t(x >> 16);
}

constexpr float bf16_to_f32(std::uint16_t h) { return std::bit_cast<float>(std::uint32_t(h) << 16); }

// f32 → IEEE binary16. `rne` rounds to nearest even, else toward zero. Subnormal results are
// rounded like normal ones; a NaN stays a (quiet) NaN.
constexpr std::uint16_t f32_to_f16(float f, bool rne) {
    std::uint32_t x = std::bit_cast<std::uint32_t>(f);
    std::uint32_t sign = (x >> 16) & 0x8000u;
    std::uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return std::uint16_t(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x47800000u) {  // |f| ≥ 2^16, inf included: beyond every finite half
        return std::uint16_t(sign | (rne || ax == 0x7f800000u ? 0x7c00u : 0x7bffu));
    }
    std::uint32_t kept, dropped_bits;
    if (ax >= 0x38800000u) {  // normal result: rebias the exponent, drop 13 mantissa bits
        kept = (ax - 0x38000000u) >> 13;
        dropped_bits = 13;
    } else {  // subnormal result: the 24-bit significand in units of 2^-24
        std::uint32_t exp = ax >> 23;
        if (exp < 102) return std::uint16_t(sign);  // |f| < 2^-25: below half the least subnormal
        std::uint32_t sig = (ax & 0x7fffffu) | 0x800000u;
        dropped_bits = 126 - exp;
        kept = sig >> dropped_bits;
        ax = sig;  // the dropped bits are the low bits of sig now
    }
    if (rne) {
        std::uint32_t rem = ax & ((1u << dropped_bits) - 1);
        std::uint32_t half = 1u << (dropped_bits - 1);
        // A carry out of the mantissa bumps the exponent (to inf from 65520 up), as it should.
        if (rem > half || (rem == half && (kept & 1u))) ++kept;
    }
    return std::uint16_t(sign | kept);
}

constexpr float f16_to_f32(std::uint16_t h) {
    std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1fu;
    std::uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
    // Subnormal (or zero): man · 2^-24, exact in f32.
    float mag = float(man) * 0x1p-24f;
    return sign ? -mag : mag;
}

}  // namespace lf_sim::detail

// The storage is the 16 bits; conversions from and to float round as CUDA's do (nearest even).
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(float f) : __x(lf_sim::detail::f32_to_bf16_rn(f)) {}
    constexpr operator float() const { return lf_sim::detail::bf16_to_f32(__x); }
};
struct __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(float f) : __x(lf_sim::detail::f32_to_f16(f, true)) {}
    constexpr operator float() const { return lf_sim::detail::f16_to_f32(__x); }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
struct alignas(4) __half2 {
    __half x, y;
};
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__half) == 2);
static_assert(std::is_trivially_copyable_v<__nv_bfloat16> && std::is_trivially_copyable_v<__half>);
static_assert(sizeof(__nv_bfloat162) == 4 && sizeof(__half2) == 4);

inline constexpr unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline constexpr unsigned short __half_as_ushort(__half h) { return h.__x; }
inline constexpr __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h{};
    h.__x = u;
    return h;
}
inline constexpr __half __ushort_as_half(unsigned short u) {
    __half h{};
    h.__x = u;
    return h;
}

inline constexpr __nv_bfloat16 __float2bfloat16_rn(float f) {
    return __ushort_as_bfloat16(lf_sim::detail::f32_to_bf16_rn(f));
}
inline constexpr __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline constexpr __nv_bfloat16 __float2bfloat16_rz(float f) {
    return __ushort_as_bfloat16(lf_sim::detail::f32_to_bf16_rz(f));
}
inline constexpr float __bfloat162float(__nv_bfloat16 h) { return lf_sim::detail::bf16_to_f32(h.__x); }

inline constexpr __half __float2half_rn(float f) {
    return __ushort_as_half(lf_sim::detail::f32_to_f16(f, true));
}
inline constexpr __half __float2half(float f) { return __float2half_rn(f); }
inline constexpr __half __float2half_rz(float f) {
    return __ushort_as_half(lf_sim::detail::f32_to_f16(f, false));
}
inline constexpr float __half2float(__half h) { return lf_sim::detail::f16_to_f32(h.__x); }

inline constexpr __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline constexpr __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline constexpr __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return __nv_bfloat162{lo, hi};
}
inline constexpr __half2 __floats2half2_rn(float lo, float hi) {
    return __half2{__float2half_rn(lo), __float2half_rn(hi)};
}
inline constexpr __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline constexpr __half2 __halves2half2(__half lo, __half hi) { return __half2{lo, hi}; }

inline constexpr float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline constexpr float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline constexpr float __low2float(__half2 v) { return __half2float(v.x); }
inline constexpr float __high2float(__half2 v) { return __half2float(v.y); }
inline constexpr float2 __bfloat1622float2(__nv_bfloat162 v) {
    return float2{__low2float(v), __high2float(v)};
}
inline constexpr float2 __half22float2(__half2 v) { return float2{__low2float(v), __high2float(v)}; }

// ---- Atomics (sequentially consistent; on global or shared memory alike) ------------------

namespace lf_sim::detail {

template <class T, class... Ts>
concept one_of = (std::is_same_v<T, Ts> || ...);
template <class T>
concept atomic_int = one_of<T, int, unsigned, unsigned long long>;

// Read-modify-write by compare-exchange, for the operations std::atomic_ref lacks.
template <class T, class F>
T atomic_update(T* address, F next) {
    std::atomic_ref<T> a(*address);
    T old = a.load();
    while (!a.compare_exchange_weak(old, next(old))) {
    }
    return old;
}

}  // namespace lf_sim::detail

// The value argument is a non-deduced context so that `atomicAdd(&u, 1)` converts the 1,
// as CUDA's non-template overloads do.
template <class T>
    requires lf_sim::detail::one_of<T, int, unsigned, unsigned long long, float, double>
T atomicAdd(T* address, std::type_identity_t<T> val) {
    return std::atomic_ref<T>(*address).fetch_add(val);
}
inline __half atomicAdd(__half* address, __half val) {
    return __ushort_as_half(lf_sim::detail::atomic_update(&address->__x, [&](unsigned short old) {
        return __half_as_ushort(__float2half_rn(__half2float(__ushort_as_half(old)) + __half2float(val)));
    }));
}
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* address, __nv_bfloat16 val) {
    return __ushort_as_bfloat16(lf_sim::detail::atomic_update(&address->__x, [&](unsigned short old) {
        return __bfloat16_as_ushort(
            __float2bfloat16_rn(__bfloat162float(__ushort_as_bfloat16(old)) + __bfloat162float(val)));
    }));
}
template <class T>
    requires lf_sim::detail::one_of<T, int, unsigned>
T atomicSub(T* address, std::type_identity_t<T> val) {
    return std::atomic_ref<T>(*address).fetch_sub(val);
}
template <class T>
    requires lf_sim::detail::one_of<T, int, unsigned, unsigned long long, float>
T atomicExch(T* address, std::type_identity_t<T> val) {
    return std::atomic_ref<T>(*address).exchange(val);
}
template <class T>
    requires lf_sim::detail::one_of<T, int, unsigned, unsigned long long, long long>
T atomicMax(T* address, std::type_identity_t<T> val) {
    return lf_sim::detail::atomic_update(address, [&](T old) { return old < val ? val : old; });
}
template <class T>
    requires lf_sim::detail::one_of<T, int, unsigned, unsigned long long, long long>
T atomicMin(T* address, std::type_identity_t<T> val) {
    return lf_sim::detail::atomic_update(address, [&](T old) { return val < old ? val : old; });
}
template <class T>
    requires lf_sim::detail::one_of<T, int, unsigned, unsigned long long, unsigned short>
T atomicCAS(T* address, std::type_identity_t<T> compare, std::type_identity_t<T> val) {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
    return compare;  // the value seen: `compare` itself if the swap happened
}
template <lf_sim::detail::atomic_int T>
T atomicAnd(T* address, std::type_identity_t<T> val) {
    return std::atomic_ref<T>(*address).fetch_and(val);
}
template <lf_sim::detail::atomic_int T>
T atomicOr(T* address, std::type_identity_t<T> val) {
    return std::atomic_ref<T>(*address).fetch_or(val);
}
template <lf_sim::detail::atomic_int T>
T atomicXor(T* address, std::type_identity_t<T> val) {
    return std::atomic_ref<T>(*address).fetch_xor(val);
}
inline unsigned atomicInc(unsigned* address, unsigned val) {
    return lf_sim::detail::atomic_update(address, [&](unsigned old) { return old >= val ? 0u : old + 1; });
}
inline unsigned atomicDec(unsigned* address, unsigned val) {
    return lf_sim::detail::atomic_update(address,
                                         [&](unsigned old) { return old == 0 || old > val ? val : old - 1; });
}

// ---- Math ----------------------------------------------------------------------------------

// <cmath> puts these in std:: only; CUDA code calls them unqualified.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
// The fast-math intrinsics are computed exactly here; kernels' tolerances cover the GPU's
// approximations.
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return rsqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
// Clamp to [0, 1]; NaN becomes 0.
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }

inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline float __int2float_rn(int x) { return float(x); }
inline constexpr unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline constexpr float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline constexpr int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline constexpr float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline constexpr long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline constexpr double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }

// CUDA's min/max: one template for its overload set. Mixed integer types compare in the
// usual arithmetic conversions (int with unsigned gives unsigned, as in CUDA); floating
// types use fmin/fmax, so a NaN operand yields the other operand.
template <class A, class B>
    requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>)
        return std::fmin(C(a), C(b));
    else
        return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B>
    requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
constexpr std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>)
        return std::fmax(C(a), C(b));
    else
        return C(a) < C(b) ? C(b) : C(a);
}
inline constexpr unsigned umin(unsigned a, unsigned b) { return min(a, b); }
inline constexpr unsigned umax(unsigned a, unsigned b) { return max(a, b); }
inline constexpr long long llmin(long long a, long long b) { return min(a, b); }
inline constexpr long long llmax(long long a, long long b) { return max(a, b); }
inline constexpr unsigned long long ullmin(unsigned long long a, unsigned long long b) { return min(a, b); }
inline constexpr unsigned long long ullmax(unsigned long long a, unsigned long long b) { return max(a, b); }

// ---- Bits ------------------------------------------------------------------------------------

inline constexpr int __popc(unsigned x) { return std::popcount(x); }
inline constexpr int __popcll(unsigned long long x) { return std::popcount(x); }
inline constexpr int __clz(int x) { return std::countl_zero(unsigned(x)); }
inline constexpr int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
// 1-based position of the least significant set bit; 0 for 0.
inline constexpr int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(unsigned(x)) + 1; }
inline constexpr int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline constexpr unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline constexpr unsigned __umulhi(unsigned a, unsigned b) {
    return unsigned((unsigned long long)a * b >> 32);
}
inline constexpr unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)((unsigned __int128)a * b >> 64);
}

// ---- Loads and stores with cache hints: plain accesses here -------------------------------

// clang-format off
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
// clang-format on
