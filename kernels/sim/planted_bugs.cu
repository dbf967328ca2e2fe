// planted_bugs.cu — the simulator's own test kernels (DESIGN §7): kernels with planted bugs
// that the simulator's checks must catch, and self-test kernels that exercise each part of
// the shim. Compiled only into the simulator (build.rs, selftest.sh), but valid CUDA.
//
// Every kernel takes SimTestParams (planted_bugs.h); each documents what it reads and the
// geometry it expects. "g" is the global 1-D thread id, "tid" the thread's linear id in its
// block, "lane" tid % 32.
//
// Planted bugs (the checks that catch them):
//   sim_planted_oob_write_f32        out[i] = i for i < n, and out[n] too when oob = 1
//                                    (AddressSanitizer: heap-buffer-overflow); oob = 0 is
//                                    the clean control.
//   sim_planted_missing_barrier_f32  block-wide reversal through shared memory, with the
//                                    __syncthreads() only when barrier = 1 (ThreadSanitizer:
//                                    data race); barrier = 1 is the clean control.
//   sim_planted_smem_oob_f32         writes shared memory one element past the end: the static
//                                    array when oob = 1 (ASan: global-buffer-overflow), the
//                                    dynamic one when oob = 2 (heap-buffer-overflow); oob = 0
//                                    is the clean control.
//   sim_planted_trap                 thread g == n calls __trap() (launch error; the others
//                                    wait in __syncthreads() and must be released).
//   sim_planted_assert               a failing device assert when in is null (launch error).
//   sim_planted_exited_lane_shfl     lanes 16..31 return, then a full-mask shuffle (launch error).
//   sim_planted_full_mask_sum_f32    a full-mask warp sum: correct when blockDim.x is a
//                                    multiple of 32, an error for a partial warp.
//   sim_planted_shfl_vs_syncthreads  even lanes in __syncthreads(), odd lanes in a shuffle
//                                    that needs them: a deadlock on a GPU, an error here.
//   sim_planted_cpp_exception        thread g == n throws a C++ exception (simulator only:
//                                    device code cannot throw; launch error).
//   sim_planted_cp_async_f32         reads before the covering cp.async wait, wait<N> too large
//                                    (NaN); an uncommitted copy, a copy in flight at the exit,
//                                    misaligned addresses (launch errors); mode 0/3/5 are
//                                    controls.
//   sim_planted_tiled_sum_f32        a tile loop without its loop-ending barrier (warp-serial
//                                    schedule: wrong on every run); barrier = 1 is the control.
//   sim_planted_broadcast_f32        thread 0 writes, all read, no barrier (wrong every run).
//   sim_planted_block_chain_f32      block b reads block b - 1's output (the random block
//                                    order breaks it every run); mode 0 is the control.
//   sim_planted_misaligned           misaligned copy16 / ldmatrix row addresses (launch errors).
//   sim_planted_stale_static_smem_f32  static shared memory read before written (poison, not
//                                    the previous block's values); modes 2, 3: the same with
//                                    the array declared in a function template.
//   sim_planted_warpgroup            setmaxnreg with a warp of the warpgroup gone, or in a block
//                                    that is not whole warpgroups (launch errors).
// Self-tests of the stricter model: sim_selftest_big_smem_f32 (the >48 KiB opt-in),
// sim_selftest_ldmatrix (the four ldmatrix forms against the PTX ISA's layouts).
// Hopper (sm_90a wrappers, each with planted bugs beside the clean run): sim_selftest_wgmma_*
// (descriptors, swizzle modes, K- and MN-major operands, A from registers; a missing
// fence.proxy.async, a wrong-swizzle descriptor, accumulators read before the wait, a K-major
// operand read as MN-major, swapped LBO/SBO, an A register changed before the wait, a transpose
// flag not warpgroup-uniform), sim_selftest_tma (TMA boxes, OOB zero fill, swizzle; a
// wrong mbarrier parity), sim_selftest_pipeline_f32 (producer/consumer warpgroups through
// mbarriers and a named barrier; wrong parities, a stage never released, a named barrier
// that never fills, setmaxnreg not uniform).
#include <cassert>
#if defined(LORAFUSE_SIM)
#include <stdexcept>
#endif

#include "../common.cuh"
#include "planted_bugs.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ unsigned linear_tid() {
    return (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFull, v, offset);
    return v;
}

// The block's sum of x, by a tree in shared memory, for every thread. Power-of-two blocks.
template <typename T>
__device__ T block_sum(T x) {
    __shared__ T partial[1024];
    unsigned tid = threadIdx.x;
    partial[tid] = x;
    __syncthreads();
    for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
        if (tid < half) partial[tid] += partial[tid + half];
        __syncthreads();
    }
    return partial[0];
}

}  // namespace

// ---- Planted bugs ------------------------------------------------------------------------

// out: f32[n]. Any 1-D geometry.
extern "C" __global__ void sim_planted_oob_write_f32(const SimTestParams p) {
    float* out = static_cast<float*>(p.out);
    lf::u64 end = p.n + (p.oob ? 1 : 0);
    for (lf::u64 i = lf::global_thread(); i < end; i += lf::grid_stride()) out[i] = float(i);
}

// in, out: f32[n]; out[g] = in of the thread at the mirrored position in g's block.
// 1-D blocks of up to 1024 threads; threads with g >= n read 0 and write nothing.
extern "C" __global__ void sim_planted_missing_barrier_f32(const SimTestParams p) {
    __shared__ float s[1024];
    const float* in = static_cast<const float*>(p.in);
    float* out = static_cast<float*>(p.out);
    lf::u64 g = lf::global_thread();
    unsigned tid = threadIdx.x;
    s[tid] = g < p.n ? in[g] : 0.0f;
    if (p.barrier) __syncthreads();
    if (g < p.n) out[g] = s[blockDim.x - 1 - tid];
}

// in, out: f32[grid threads]; out[g] = in[g] + 1 through both kinds of shared memory.
// 1-D blocks of 256 threads (so that the last thread's tid + 1 is one past both arrays),
// blockDim.x·4 bytes of dynamic shared memory.
extern "C" __global__ void sim_planted_smem_oob_f32(const SimTestParams p) {
    __shared__ float s[256];
    LF_DYNAMIC_SMEM(float, d);
    lf::u64 g = lf::global_thread();
    unsigned tid = threadIdx.x;
    bool last = tid == blockDim.x - 1;
    s[tid + (p.oob == 1 && last ? 1 : 0)] = static_cast<const float*>(p.in)[g];
    d[tid + (p.oob == 2 && last ? 1 : 0)] = 1.0f;
    __syncthreads();
    static_cast<float*>(p.out)[g] = s[tid] + d[tid];
}

// out: f32[grid threads], 1 per thread that got past the barrier. Thread g == n traps.
extern "C" __global__ void sim_planted_trap(const SimTestParams p) {
    lf::u64 g = lf::global_thread();
    if (g == p.n) __trap();
    __syncthreads();
    static_cast<float*>(p.out)[g] = 1.0f;
}

// out: f32[grid threads]. Fails its assert unless in is non-null.
extern "C" __global__ void sim_planted_assert(const SimTestParams p) {
    assert(p.in != nullptr);
    static_cast<float*>(p.out)[lf::global_thread()] = 1.0f;
}

// out: f32[grid threads]. 1-D blocks, a multiple of 32 threads.
extern "C" __global__ void sim_planted_exited_lane_shfl(const SimTestParams p) {
    if (threadIdx.x % 32 >= 16) return;
    static_cast<float*>(p.out)[lf::global_thread()] = __shfl_xor_sync(kFull, 1.0f, 1);
}

// in, out: f32[grid threads]; out[g] = the sum of in over g's warp.
extern "C" __global__ void sim_planted_full_mask_sum_f32(const SimTestParams p) {
    lf::u64 g = lf::global_thread();
    static_cast<float*>(p.out)[g] = warp_sum(static_cast<const float*>(p.in)[g]);
}

// out: f32[grid threads]. 1-D blocks, a multiple of 32 threads.
extern "C" __global__ void sim_planted_shfl_vs_syncthreads(const SimTestParams p) {
    float v = 1.0f;
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(kFull, v, 1);
    }
    static_cast<float*>(p.out)[lf::global_thread()] = v;
}

// out: unused. Thread g == n throws, the others wait in __syncthreads().
extern "C" __global__ void sim_planted_cpp_exception(const SimTestParams p) {
#if defined(LORAFUSE_SIM)
    if (lf::global_thread() == p.n) throw std::runtime_error("planted exception");
#endif
    __syncthreads();
}

// ---- Self-tests ----------------------------------------------------------------------------

// in: f32[n], out: f32[8n], n = grid threads; 1-D blocks, a multiple of 32 threads.
// out[8g + k], over g's warp:
//   k=0  the sum of in (xor butterfly)         k=1  inclusive prefix sum of in (shfl_up scan)
//   k=2  in[lane+3], own value past lane 28    k=3  in[lane & ~7 | 3] (shfl width 8)
//   k=4  xor 16 with width 16: own value for lanes < 16, in[lane-16] above
//   k=5  2·in[(lane+1) % 32] shuffled as a double
//   k=6  bf16(in[lane+1]) within 16-lane segments (own value at lanes 15, 31)
//   k=7  shfl_up by 33: the delta is taken mod 32, so in[lane-1], own value at lane 0
extern "C" __global__ void sim_selftest_shfl_f32(const SimTestParams p) {
    const float* in = static_cast<const float*>(p.in);
    float* out = static_cast<float*>(p.out) + 8 * lf::global_thread();
    unsigned lane = threadIdx.x % 32;
    float x = in[lf::global_thread()];
    out[0] = warp_sum(x);
    float scan = x;
    for (unsigned d = 1; d < 32; d *= 2) {
        float up = __shfl_up_sync(kFull, scan, d);
        if (lane >= d) scan += up;
    }
    out[1] = scan;
    out[2] = __shfl_down_sync(kFull, x, 3);
    out[3] = __shfl_sync(kFull, x, 3, 8);
    out[4] = __shfl_xor_sync(kFull, x, 16, 16);
    out[5] = float(__shfl_sync(kFull, 2.0 * x, int(lane + 1) % 32));
    out[6] = __bfloat162float(__shfl_down_sync(kFull, __float2bfloat16_rn(x), 1, 16));
    out[7] = __shfl_up_sync(kFull, x, 33);
}

// in: f32[n], out: u32[4n], n = grid threads; 1-D blocks, a multiple of 32 threads.
// out[4g + k]: k=0 __ballot_sync(in > 0), k=1 __any_sync(in > 0), k=2 __all_sync(in > 0),
// k=3 __activemask() after a __syncwarp().
extern "C" __global__ void sim_selftest_vote(const SimTestParams p) {
    lf::u64 g = lf::global_thread();
    unsigned* out = static_cast<unsigned*>(p.out) + 4 * g;
    int positive = static_cast<const float*>(p.in)[g] > 0.0f;
    out[0] = __ballot_sync(kFull, positive);
    out[1] = unsigned(__any_sync(kFull, positive));
    out[2] = unsigned(__all_sync(kFull, positive));
    __syncwarp();
    out[3] = __activemask();
}

// out: u32[2 · grid threads]. Lanes >= n return at once; the others write
// out[2g] = __activemask() and out[2g + 1] = lane 0's g, shuffled within that mask.
// 1-D blocks of any size (a partial last warp is fine).
extern "C" __global__ void sim_selftest_activemask(const SimTestParams p) {
    unsigned lane = threadIdx.x % 32;
    if (lane >= p.n) return;
    lf::u64 g = lf::global_thread();
    unsigned* out = static_cast<unsigned*>(p.out) + 2 * g;
    unsigned mask = __activemask();
    out[0] = mask;
    out[1] = __shfl_sync(mask, unsigned(g), 0);
}

// aux: SimAtomicsOut (see planted_bugs.h), n = grid threads; 1-D geometry.
extern "C" __global__ void sim_selftest_atomics(const SimTestParams p) {
    __shared__ unsigned block_count;
    SimAtomicsOut* o = static_cast<SimAtomicsOut*>(p.aux);
    unsigned g = unsigned(lf::global_thread());
    atomicAdd(&o->count, 1ull);
    atomicMax(&o->max_id, int(g));
    atomicMin(&o->min_id, g + 5);
    int old = atomicAdd(&o->cas_sum, 0);
    int assumed;
    do {
        assumed = old;
        old = atomicCAS(&o->cas_sum, assumed, assumed + 2);
    } while (old != assumed);
    atomicOr(&o->or_bits, 1u << (g % 32));
    atomicSub(&o->sub, 1);
    atomicAdd(&o->half_sum, 0.5);
    atomicAdd(&o->fsum, 1.0f);
    atomicExch(&o->exch, float(g));
    if (threadIdx.x == 0) block_count = 0;
    __syncthreads();
    atomicAdd(&block_count, 1u);
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(&o->block_sum, block_count);
}

// in, out: f32[n], n = grid threads; 1-D geometry, 2·blockDim.x·4 bytes of dynamic shared
// memory. out[g] = in[mirror of g in its block] + 2·in[next thread in its block, cyclic].
// Traps if the dynamic shared memory is not 16-byte aligned.
extern "C" __global__ void sim_selftest_dynamic_smem_f32(const SimTestParams p) {
    LF_DYNAMIC_SMEM(float, s);
    if (reinterpret_cast<unsigned long long>(s) % 16 != 0) __trap();
    lf::u64 g = lf::global_thread();
    unsigned tid = threadIdx.x, bd = blockDim.x;
    float x = static_cast<const float*>(p.in)[g];
    s[tid] = x;
    s[bd + tid] = 2.0f * x;
    __syncthreads();
    static_cast<float*>(p.out)[g] = s[bd - 1 - tid] + s[bd + (tid + 1) % bd];
}

// in: f32[n]; out: f32[gridDim.x], each block's sum of in (elements past n count 0);
// aux: u32[3·gridDim.x], per block __syncthreads_count / _and / _or of (in > 0) over its
// threads (threads past n pass 0). 1-D blocks of a power-of-two size up to 1024. The
// shared array lives in a helper template, as in real kernels, and every block reuses it.
extern "C" __global__ void sim_selftest_block_reduce_f32(const SimTestParams p) {
    lf::u64 g = lf::global_thread();
    float x = g < p.n ? static_cast<const float*>(p.in)[g] : 0.0f;
    int count = __syncthreads_count(x > 0.0f);
    int all = __syncthreads_and(x > 0.0f);
    int any = __syncthreads_or(x > 0.0f);
    float sum = block_sum<float>(x);
    if (threadIdx.x == 0) {
        static_cast<float*>(p.out)[blockIdx.x] = sum;
        unsigned* aux = static_cast<unsigned*>(p.aux) + 3 * blockIdx.x;
        aux[0] = unsigned(count);
        aux[1] = unsigned(all);
        aux[2] = unsigned(any);
    }
}

// out: u32[8 · grid threads], at 8 · (linear block id · threads per block + linear tid):
// threadIdx.xyz, blockIdx.xyz, the linear tid of lane 0 of this thread's warp, and
// __syncthreads_count(1). aux: u32[6], blockDim.xyz and gridDim.xyz. Any 3-D geometry whose
// block size is a multiple of 32.
extern "C" __global__ void sim_selftest_geometry(const SimTestParams p) {
    unsigned tid = linear_tid();
    unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    lf::u64 block = (lf::u64(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    unsigned* out = static_cast<unsigned*>(p.out) + 8 * (block * threads + tid);
    out[0] = threadIdx.x;
    out[1] = threadIdx.y;
    out[2] = threadIdx.z;
    out[3] = blockIdx.x;
    out[4] = blockIdx.y;
    out[5] = blockIdx.z;
    out[6] = __shfl_sync(kFull, tid, 0);
    out[7] = unsigned(__syncthreads_count(1));
    if (block == 0 && tid == 0) {
        unsigned* aux = static_cast<unsigned*>(p.aux);
        aux[0] = blockDim.x;
        aux[1] = blockDim.y;
        aux[2] = blockDim.z;
        aux[3] = gridDim.x;
        aux[4] = gridDim.y;
        aux[5] = gridDim.z;
    }
}

// in: f32[n]; out: u16[4n], the bits of bf16 (nearest even), bf16 (toward zero), f16
// (nearest even), f16 (toward zero) of in[i]; aux: f32[4n]: bf16 and f16 (nearest even)
// back to f32, then the high half of __floats2bfloat162_rn(0, in[i]) and of
// __floats2half2_rn(0, in[i]) through __bfloat1622float2 / __half22float2. Grid-stride.
extern "C" __global__ void sim_selftest_convert(const SimTestParams p) {
    const float* in = static_cast<const float*>(p.in);
    unsigned short* bits = static_cast<unsigned short*>(p.out);
    float* back = static_cast<float*>(p.aux);
    for (lf::u64 i = lf::global_thread(); i < p.n; i += lf::grid_stride()) {
        float x = in[i];
        bf16 b = __float2bfloat16_rn(x);
        f16 h = __float2half_rn(x);
        bits[4 * i + 0] = __bfloat16_as_ushort(b);
        bits[4 * i + 1] = __bfloat16_as_ushort(__float2bfloat16_rz(x));
        bits[4 * i + 2] = __half_as_ushort(h);
        bits[4 * i + 3] = __half_as_ushort(__float2half_rz(x));
        back[4 * i + 0] = __bfloat162float(__ushort_as_bfloat16(bits[4 * i + 0]));
        back[4 * i + 1] = __half2float(__ushort_as_half(bits[4 * i + 2]));
        back[4 * i + 2] = __bfloat1622float2(__floats2bfloat162_rn(0.0f, x)).y;
        back[4 * i + 3] = __half22float2(__floats2half2_rn(0.0f, x)).y;
    }
}

// ---- Planted bugs of the stricter model: cp.async, warp-serial barriers, block order,
// ---- alignment, stale shared memory, the dynamic shared memory opt-in ----------------------

// cp.async into static shared memory. in: f32[512]; out: f32[8 · 64]. One block of 64 threads
// (2 warps). Thread t copies in[4t..4t+3] into tile 0 and in[256 + 4t..] into tile 1 (16 bytes
// each, src_bytes = 16, or `arg` in mode 5), one commit group per tile, then, by `mode`:
//   0  wait<0>, __syncthreads(), read both tiles                    (control: correct)
//   1  __syncthreads() but no wait, read both tiles                 (planted: NaN)
//   2  wait<1> (too large: only tile 0's group has landed), read both (planted: tile 1 NaN)
//   3  wait<1>, read tile 0 only; tile 1 reads as written by wait<0> at the end (control)
//   4  tile 1's copy never committed, then wait<0>: it is covered by no wait, and the thread
//      exits with it in flight (planted: launch error)
//   5  as 0 with src_bytes = arg: the rest of each 16 bytes zero-filled (control)
//   6  a misaligned destination, 7  a misaligned source (launch errors)
//   8  as 3 without the final wait: exits with tile 1's copy in flight (launch error)
// Modes 1 and 2 end with a barrier and wait<0>, so they exit clean and show only the early
// reads' NaN.
// out[8t + k] = tile 0 of thread (t + 1) % 64 (k < 4), tile 1 (k >= 4): both warps' data.
extern "C" __global__ void sim_planted_cp_async_f32(const SimTestParams p) {
    __shared__ __align__(16) float tile[2][256];
    const float* in = static_cast<const float*>(p.in);
    float* out = static_cast<float*>(p.out);
    const unsigned t = threadIdx.x, u = (t + 1) % 64;
    const int bytes = p.mode == 5 ? p.arg : 16;
    float* dst0 = &tile[0][4 * t];
    const float* src0 = in + 4 * t;
    if (p.mode == 6) dst0 += 1;
    if (p.mode == 7) src0 += 1;
    lf::cp_async16(dst0, src0, bytes);
    lf::cp_async_commit();
    lf::cp_async16(&tile[1][4 * t], in + 256 + 4 * t, bytes);
    if (p.mode != 4) lf::cp_async_commit();
    if (p.mode == 0 || p.mode == 4 || p.mode == 5) lf::cp_async_wait<0>();
    if (p.mode == 2 || p.mode == 3 || p.mode == 8) lf::cp_async_wait<1>();
    __syncthreads();
    for (int k = 0; k < 4; ++k) out[8 * t + k] = tile[0][4 * u + k];
    if (p.mode == 3) {
        lf::cp_async_wait<0>();
        __syncthreads();
    }
    for (int k = 0; k < 4; ++k) out[8 * t + 4 + k] = tile[1][4 * u + k];
    if (p.mode == 1 || p.mode == 2) {
        __syncthreads();  // every read done before any copy lands
        lf::cp_async_wait<0>();
    }
}

// A tiled block reduction with the loop-ending barrier optional, the shape of every GEMM's
// k-loop: per tile, the block stages 128 values in shared memory, __syncthreads(), every thread
// adds all 128 (other warps' values included), then __syncthreads() again — only when
// barrier = 1. in: f32[n], n a multiple of 128; out: f32[128], each thread's total (the sum of
// in). One block of 128 threads (4 warps). Without the second barrier the first warp to finish
// a tile overwrites its part of it with the next tile while the other warps still read it: the
// warp-serial schedule makes that happen on every run.
extern "C" __global__ void sim_planted_tiled_sum_f32(const SimTestParams p) {
    __shared__ float tile[128];
    const float* in = static_cast<const float*>(p.in);
    const unsigned t = threadIdx.x;
    float acc = 0.0f;
    for (lf::u64 k0 = 0; k0 < p.n; k0 += 128) {
        tile[t] = in[k0 + t];
        __syncthreads();
        for (unsigned j = 0; j < 128; ++j) acc += tile[(t + j) % 128];
        if (p.barrier) __syncthreads();
    }
    static_cast<float*>(p.out)[t] = acc;
}

// Thread 0 of each block writes one value to shared memory, every thread reads it; the
// __syncthreads() between only when barrier = 1. in: f32[gridDim.x]; out: f32[grid threads],
// out[g] = in[blockIdx.x]. Blocks of 64 threads or more (2+ warps): warp 0 never runs first,
// so without the barrier another warp reads the (poisoned) value before it is written.
extern "C" __global__ void sim_planted_broadcast_f32(const SimTestParams p) {
    __shared__ float value;
    if (threadIdx.x == 0) value = static_cast<const float*>(p.in)[blockIdx.x];
    if (p.barrier) __syncthreads();
    static_cast<float*>(p.out)[lf::global_thread()] = value;
}

// out: f32[gridDim.x]. mode 1 (planted): block b > 0 writes out[b] = out[b - 1] + 1, block 0
// writes 0 — right only if the blocks run in order. mode 0 (control): out[b] = b. Thread 0 of
// each block writes; any block size.
extern "C" __global__ void sim_planted_block_chain_f32(const SimTestParams p) {
    float* out = static_cast<float*>(p.out);
    if (threadIdx.x != 0) return;
    const unsigned b = blockIdx.x;
    out[b] = p.mode == 1 && b > 0 ? out[b - 1] + 1.0f : float(b);
}

// Misaligned 16-byte accesses. One block of 32 threads; in: f32[256] (16-byte aligned), out:
// u32[32 · 4]. Every lane copies 16 bytes of in into shared memory with lf::copy16, then the
// warp loads them with ldmatrix_x4 and ldmatrix_x2 (bf16 bits) and writes its registers. By
// `mode`: 0 all aligned (control); 1 copy16 from in + 1 float; 2 copy16 to a misaligned
// shared address; 3 lane 5's ldmatrix_x4 row address 8 bytes off; 4 lane 3's ldmatrix_x2 row
// address 4 bytes off; 5 lane 7's ldmatrix_x4 row in global memory; 6 a cp.async into
// global memory (launch errors).
extern "C" __global__ void sim_planted_misaligned(const SimTestParams p) {
    __shared__ __align__(16) bf16 rows[32 * 8 + 8];
    const float* in = static_cast<const float*>(p.in);
    unsigned* out = static_cast<unsigned*>(p.out);
    const unsigned lane = threadIdx.x;
    if (p.mode == 5) {
        unsigned r[4];
        const bf16* global_rows = reinterpret_cast<const bf16*>(in);
        lf::ldmatrix_x4(r, lane == 7 ? global_rows + 8 * lane : rows + 8 * lane);
        out[lane] = r[0];
        return;
    }
    if (p.mode == 6) {
        lf::cp_async16(out + 4 * lane, in + 4 * lane, 16);
        lf::cp_async_commit();
        lf::cp_async_wait<0>();
        return;
    }
    const float* src = in + 4 * lane + (p.mode == 1 ? 1 : 0);
    bf16* dst = rows + 8 * lane + (p.mode == 2 ? 2 : 0);
    lf::copy16(dst, src);
    __syncwarp();
    const bf16* row4 = rows + 8 * lane + (p.mode == 3 && lane == 5 ? 4 : 0);
    const bf16* row2 = rows + 8 * lane + (p.mode == 4 && lane == 3 ? 2 : 0);
    unsigned r4[4], r2[2];
    lf::ldmatrix_x4(r4, row4);
    lf::ldmatrix_x2(r2, row2);
    out[4 * lane + 0] = r4[0];
    out[4 * lane + 1] = r4[3];
    out[4 * lane + 2] = r2[0];
    out[4 * lane + 3] = r2[1];
}

// Static shared memory between blocks. out: f32[grid threads]; blocks of 64 threads.
// mode 1 (planted): out[g] = s[tid] read before any write, then s[tid] = blockIdx.x + 1 (so a
// block that inherited the previous block's array would read that). mode 0 (control):
// s[tid] = blockIdx.x + tid, __syncthreads(), out[g] = s[(tid + 1) % 64].
namespace {
// The kernel's body, with its static tile declared in a function template (modes 2, 3):
// g++ ignores `section` on a template's static locals, so build.rs moves those into
// lf_sim_shared after compiling; this checks that they are poisoned too.
template <class T>
__device__ void stale_static_smem(T* s, const SimTestParams& p, unsigned mode) {
    T* out = static_cast<T*>(p.out);
    const unsigned t = threadIdx.x;
    if (mode == 1) {
        out[lf::global_thread()] = s[t];
        s[t] = T(blockIdx.x + 1);
        return;
    }
    s[t] = T(blockIdx.x + t);
    __syncthreads();
    out[lf::global_thread()] = s[(t + 1) % 64];
}

template <class T>
__device__ void stale_static_smem_in_template(const SimTestParams& p) {
    __shared__ T s[64];
    stale_static_smem(s, p, p.mode - 2);
}
}  // namespace

extern "C" __global__ void sim_planted_stale_static_smem_f32(const SimTestParams p) {
    if (p.mode >= 2) {
        stale_static_smem_in_template<float>(p);
        return;
    }
    __shared__ float s[64];
    stale_static_smem(s, p, p.mode);
}

// Dynamic shared memory of any size: n = its floats. out: f32[blockDim.x]; one block.
// d[i] = i over the whole buffer, __syncthreads(), out[t] = d[n - 1 - t].
extern "C" __global__ void sim_selftest_big_smem_f32(const SimTestParams p) {
    LF_DYNAMIC_SMEM(float, d);
    for (lf::u64 i = threadIdx.x; i < p.n; i += blockDim.x) d[i] = float(i);
    __syncthreads();
    static_cast<float*>(p.out)[threadIdx.x] = d[p.n - 1 - threadIdx.x];
}

// The ldmatrix forms against the PTX ISA's definition. One block of 32 threads; out:
// u32[384]. Shared memory holds four 8×8 matrices of 16-bit values, M_j[r][c] = 1 + 64j + 8r + c
// (raw bits), row r of matrix j at the scrambled row slot (5·(8j + r)) % 32 of a 32×16 array
// (16-byte aligned rows, 8 values used), so that only the row addresses tie rows to matrices.
// Lane l passes the address of row l % 8 of matrix l / 8; for the .x2 forms lanes 16..31 pass
// a bogus (misaligned, unmapped) address, which ldmatrix ignores. out[base + 4l + j] (x4) and
// out[base + 2l + j] (x2) with base 0: x4, 128: x4.trans, 256: x2, 320: x2.trans.
extern "C" __global__ void sim_selftest_ldmatrix(const SimTestParams p) {
    __shared__ __align__(16) bf16 m[32 * 16];
    unsigned* out = static_cast<unsigned*>(p.out);
    const unsigned l = threadIdx.x;
    for (unsigned jr = 0; jr < 32; ++jr) {  // lane l writes column l % 8 of half the rows
        if (jr % 4 != l / 8) continue;
        const unsigned slot = (5 * jr) % 32, c = l % 8;
        m[slot * 16 + c] = __ushort_as_bfloat16((unsigned short)(1 + 64 * (jr / 8) + 8 * (jr % 8) + c));
    }
    __syncthreads();
    const bf16* row = m + ((5 * l) % 32) * 16;
    const bf16* row2 = l < 16 ? row : reinterpret_cast<const bf16*>(static_cast<unsigned long long>(0x13));
    unsigned r[4];
    lf::ldmatrix_x4(r, row);
    for (int j = 0; j < 4; ++j) out[4 * l + j] = r[j];
    lf::ldmatrix_x4_trans(r, row);
    for (int j = 0; j < 4; ++j) out[128 + 4 * l + j] = r[j];
    lf::ldmatrix_x2(r, row2);
    for (int j = 0; j < 2; ++j) out[256 + 2 * l + j] = r[j];
    lf::ldmatrix_x2_trans(r, row2);
    for (int j = 0; j < 2; ++j) out[320 + 2 * l + j] = r[j];
}

// ---- Hopper's asynchronous machinery (simulator only: sm_90a wrappers of common.cuh) ----

namespace {

// The byte offset of element (r, k) of a K-major 16-bit operand laid out for the descriptor
// swizzle `mode` (0 none, 1 128 B, 2 64 B, 3 32 B), `k_total` values per row: written here from
// the row's point of view — the 16-byte chunk index XORed with the row's place in its 8-row
// group, scaled to the span — independently of the simulator's address-bit formulation.
__device__ __forceinline__ unsigned operand_offset(unsigned mode, unsigned k_total, unsigned r, unsigned k) {
    if (mode == 0) return (r / 8) * (k_total / 8) * 128 + (k / 8) * 128 + (r % 8) * 16 + (k % 8) * 2;
    const unsigned span = mode == 1 ? 128 : mode == 2 ? 64 : 32;
    const unsigned chunk = (2 * k) / 16, phase = (r % 8) / (128 / span);
    return (r / 8) * 8 * span + (r % 8) * span + 16 * (chunk ^ phase) + (2 * k) % 16;
}

// The byte offset of element (mn, k) of an MN-major 16-bit operand (M or N contiguous) for the
// descriptor swizzle `mode`, also written from the atom's point of view: an atom is 8 k-rows of
// `span` bytes (16 without swizzle), each holding span / 2 consecutive mn; a row's 16-byte chunk
// index XORed with the row's place in its pattern; atoms `mn_stride` bytes apart along mn and
// `k_stride` apart along k (multiples of the atom's bytes, so the pattern lines up).
__device__ __forceinline__ unsigned mn_operand_offset(unsigned mode, unsigned mn_stride, unsigned k_stride,
                                                      unsigned mn, unsigned k) {
    const unsigned span = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 16;
    const unsigned per = span / 2, row = k % 8, e = mn % per;
    const unsigned phase = mode == 0 ? 0 : row / (128 / span);
    return (mn / per) * mn_stride + (k / 8) * k_stride + row * span + 16 * (((2 * e) / 16) ^ phase) + (2 * e) % 16;
}

// The descriptor of an MN-major operand at `base` with those strides. The PTX ISA swaps the
// fields' roles with the swizzle: without it LBO is the k stride and SBO the mn stride; swizzled,
// LBO is the mn stride and SBO the k stride. `swap` (planted) fills them the other way round.
__device__ __forceinline__ lf::u64 mn_desc(const void* base, unsigned mode, unsigned mn_stride, unsigned k_stride,
                                           bool swap) {
    unsigned lbo = mode == 0 ? k_stride : mn_stride, sbo = mode == 0 ? mn_stride : k_stride;
    if (swap) {
        const unsigned t = lbo;
        lbo = sbo;
        sbo = t;
    }
    return lf::make_smem_desc(base, lbo, sbo, lf::Swizzle(mode));
}

// One m64nNk16 in the form and layouts of the `layout` bits (below).
template <typename T, int N>
__device__ __forceinline__ void wgmma_selftest_issue(float (&d)[N / 2], unsigned layout, const unsigned (&a)[4],
                                                     lf::u64 da, lf::u64 db, bool accumulate) {
    const bool trans_a = layout & 1, trans_b = layout & 2;
    if (layout & 4) {
        if (trans_b) {
            lf::wgmma_rs_m64nNk16<T, N, true>(d, a, db, accumulate);
        } else {
            lf::wgmma_rs_m64nNk16<T, N, false>(d, a, db, accumulate);
        }
    } else if (trans_a && trans_b) {
        lf::wgmma_m64nNk16<T, N, true, true>(d, da, db, accumulate);
    } else if (trans_a) {
        lf::wgmma_m64nNk16<T, N, true, false>(d, da, db, accumulate);
    } else if (trans_b) {
        lf::wgmma_m64nNk16<T, N, false, true>(d, da, db, accumulate);
    } else {
        lf::wgmma_m64nNk16<T, N>(d, da, db, accumulate);
    }
}

// sim_selftest_wgmma_*: out (f32 64×N, row-major) = A·Bᵀ for A (T 64×K) in `in` and B (T N×K)
// in `aux`, both row-major, through shared memory and wgmma m64nNk16 with N = arg (8, 16, 64, 128
// or 256) and the operand layouts of swizzle `mode` (K = 32 without swizzle, else span / 2), one
// k16 step per wgmma, chained on the accumulators. One block of 128 threads, 40960 bytes of
// dynamic shared memory (A at 0, B at 8192). The bits of `n` choose the layouts and form:
//   1  A MN-major (imm-trans-a; its atoms packed along M first),
//   2  B MN-major (imm-trans-b; its atoms packed along K first, as TMA boxes of span / 2
//      columns × K rows land: SBO = 8·span),
//   4  A from registers (wgmma_rs: each thread's fragment read from `in`; bit 1 unused).
// Planted bugs by the bits of `barrier`:
//   1  no fence.proxy.async between the stores and the wgmma (launch error),
//   2  the descriptors name the wrong swizzle (128 B for none, 64 B for 128 B, 128 B otherwise):
//      a wrong product,
//   4  the accumulators read before wgmma_wait (NaN),
//   8  B stored K-major but read with imm-trans-b (with n bit 2; its K-major descriptors): a
//      wrong product,
//   16 the MN-major B's descriptor with LBO and SBO swapped (n bit 2): a wrong product,
//   32 thread 37 changes one of its A registers between the issue and the wait (n bit 4):
//      launch error,
//   64 warp 1 issues with imm-trans-b flipped (not warpgroup-uniform: launch error).
template <typename T, int N>
__device__ void wgmma_selftest(const SimTestParams& p) {
    LF_DYNAMIC_SMEM(unsigned char, smem);
    const T* a = static_cast<const T*>(p.in);
    const T* b = static_cast<const T*>(p.aux);
    float* out = static_cast<float*>(p.out);
    const unsigned mode = unsigned(p.mode), t = threadIdx.x, layout = unsigned(p.n);
    const unsigned span = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
    const unsigned k_total = span == 0 ? 32 : span / 2;
    const bool a_mn = (layout & 5) == 1, b_mn = (layout & 2) && !(p.barrier & 8);
    // MN-major atoms: 8 k-rows of `row` bytes, `per` elements of M/N each.
    const unsigned row = span == 0 ? 16 : span, per = row / 2, atom = 8 * row;
    const unsigned a_mn_stride = atom, a_k_stride = (64 / per) * atom;
    const unsigned b_k_stride = atom, b_mn_stride = (k_total / 8) * atom;
    for (unsigned i = t; i < 64 * k_total; i += blockDim.x) {
        const unsigned r = i / k_total, k = i % k_total;
        const unsigned off = a_mn ? mn_operand_offset(mode, a_mn_stride, a_k_stride, r, k)
                                  : operand_offset(mode, k_total, r, k);
        *reinterpret_cast<T*>(smem + off) = a[i];
    }
    for (unsigned i = t; i < N * k_total; i += blockDim.x) {
        const unsigned c = i / k_total, k = i % k_total;
        const unsigned off = b_mn ? mn_operand_offset(mode, b_mn_stride, b_k_stride, c, k)
                                  : operand_offset(mode, k_total, c, k);
        *reinterpret_cast<T*>(smem + 8192 + off) = b[i];
    }
    if (!(p.barrier & 1)) lf::fence_proxy_async();
    __syncthreads();
    // The register form's A fragments, one per k16 step: (row g, columns 2q, 2q+1), (g + 8, ...),
    // (g, 2q + 8, 2q + 9), (g + 8, ...), the lower column in the low half; unchanged until the wait.
    const unsigned short* a_bits = reinterpret_cast<const unsigned short*>(a);
    const unsigned w4 = (t / 32) % 4, lane = t % 32, g = 16 * w4 + lane / 4, q = lane % 4;
    unsigned frag[4][4] = {};
    if (layout & 4) {
        for (unsigned kk = 0; kk < k_total / 16; ++kk) {
            for (unsigned j = 0; j < 4; ++j) {
                const unsigned r = g + 8 * (j % 2), c = 16 * kk + 2 * q + 8 * (j / 2);
                frag[kk][j] = unsigned(a_bits[r * k_total + c]) | unsigned(a_bits[r * k_total + c + 1]) << 16;
            }
        }
    }
    const unsigned desc_mode = (p.barrier & 2) ? (mode == 1 ? 2u : 1u) : mode;
    float d[N / 2];
    lf::wgmma_fence();
    for (unsigned kk = 0; kk < k_total / 16; ++kk) {
        // The k16 step, K-major: two core matrices (2·LBO) further without swizzle, 32 bytes
        // further inside the swizzled rows; MN-major: two 8-k-row groups further.
        const unsigned step = span == 0 ? 256 * kk : 32 * kk;
        const lf::u64 da =
            a_mn ? mn_desc(smem + 2 * a_k_stride * kk, desc_mode, a_mn_stride, a_k_stride, false)
            : span == 0 ? lf::make_smem_desc(smem + step, 128, (k_total / 8) * 128, lf::Swizzle(desc_mode))
                        : lf::make_smem_desc(smem + step, 16, 8 * span, lf::Swizzle(desc_mode));
        const lf::u64 db =
            b_mn ? mn_desc(smem + 8192 + 2 * b_k_stride * kk, desc_mode, b_mn_stride, b_k_stride, p.barrier & 16)
            : span == 0 ? lf::make_smem_desc(smem + 8192 + step, 128, (k_total / 8) * 128, lf::Swizzle(desc_mode))
                        : lf::make_smem_desc(smem + 8192 + step, 16, 8 * span, lf::Swizzle(desc_mode));
        const unsigned form = (p.barrier & 64) && t / 32 == 1 ? layout ^ 2 : layout;
        wgmma_selftest_issue<T, N>(d, form, frag[kk], da, db, kk > 0);
    }
    lf::wgmma_commit();
    if ((p.barrier & 32) && t == 37) frag[0][1] ^= 1u;  // planted: PTX forbids this before the wait
    if (!(p.barrier & 4)) lf::wgmma_wait<0>();
    for (int i = 0; i < N / 2; ++i) {
        const unsigned r = 16 * w4 + lane / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
        out[r * N + col] = d[i];
    }
    if (p.barrier & 4) lf::wgmma_wait<0>();
}

template <typename T>
__device__ void wgmma_selftest_n(const SimTestParams& p) {
    switch (p.arg) {
        case 8: wgmma_selftest<T, 8>(p); break;
        case 16: wgmma_selftest<T, 16>(p); break;
        case 64: wgmma_selftest<T, 64>(p); break;
        case 128: wgmma_selftest<T, 128>(p); break;
        case 256: wgmma_selftest<T, 256>(p); break;
        default: assert(!"wgmma self-test: N = 8, 16, 64, 128 or 256");
    }
}

}  // namespace

extern "C" __global__ void sim_selftest_wgmma_bf16(const SimTestParams p) { wgmma_selftest_n<bf16>(p); }
extern "C" __global__ void sim_selftest_wgmma_f16(const SimTestParams p) { wgmma_selftest_n<f16>(p); }

// One TMA copy of a 2-D box of 16-bit elements into shared memory, signalled on an mbarrier.
// aux: the tensor map (LfSimTensorMap); n: the box's bytes; (oob, arg): the box's element
// coordinates (inner, outer), which may reach outside the tensor. out: u16[n / 2], the
// shared-memory image of the box (swizzled as the map says). One block of 128 threads,
// 1024 + n bytes of dynamic shared memory (the mbarrier at 0, the box at 1024). mode 1
// (planted): the threads wait with parity 1 on the fresh mbarrier, which returns at once (the
// phase before the first counts as completed): they read the poisoned destination.
extern "C" __global__ void sim_selftest_tma(const SimTestParams p) {
    LF_DYNAMIC_SMEM(unsigned char, smem);
    lf::u64* bar = reinterpret_cast<lf::u64*>(smem);
    unsigned short* tile = reinterpret_cast<unsigned short*>(smem + 1024);
    const unsigned t = threadIdx.x;
    if (t == 0) lf::mbarrier_init(bar, 1);
    __syncthreads();
    if (t == 0) {
        lf::mbarrier_arrive_expect_tx(bar, unsigned(p.n));
        lf::tma_load_2d(tile, static_cast<const lf::TensorMap*>(p.aux), p.oob, p.arg, bar);
    }
    lf::mbarrier_wait_parity(bar, p.mode == 1 ? 1u : 0u);
    for (lf::u64 i = t; i < p.n / 2; i += blockDim.x) static_cast<unsigned short*>(p.out)[i] = tile[i];
}

// Producer/consumer warp specialisation with no block barrier in the loop: 256 threads,
// warpgroup 1 the producer (setmaxnreg.dec, then thread 128 alone issues one TMA copy per
// tile into 2 stages), warpgroup 0 the consumers (setmaxnreg.inc; per tile: wait for the stage's
// `full` mbarrier, read, a named barrier among the 128 consumers, then thread 0 arrives on the
// stage's `empty` mbarrier). aux: the tensor map of an f32 tensor of n·8 rows × 16 columns, box
// 16 × 8 (one tile = 128 values); n tiles. out: f32[128], out[t] = Σ over tiles of value t.
// 1024 + 2·512 bytes of dynamic shared memory. Planted bugs by `mode`:
//   1  the producer waits on `empty` with the wrong parity (0 on a fresh barrier): deadlock,
//   2  the consumers wait on `full` with the wrong parity: they read poison (NaN),
//   3  the consumers never arrive on `empty`: deadlock once the stages are used up (n ≥ 3),
//   4  warp 1 asks setmaxnreg for a different count (not warpgroup-uniform: launch error),
//   5  the named barrier counts 256 threads where 128 arrive: deadlock.
extern "C" __global__ void sim_selftest_pipeline_f32(const SimTestParams p) {
    LF_DYNAMIC_SMEM(unsigned char, smem);
    lf::u64* full = reinterpret_cast<lf::u64*>(smem);
    lf::u64* empty = full + 2;
    float* stage = reinterpret_cast<float*>(smem + 1024);
    const unsigned t = threadIdx.x;
    const unsigned tiles = unsigned(p.n);
    if (t == 0) {
        for (int s = 0; s < 2; ++s) {
            lf::mbarrier_init(&full[s], 1);
            lf::mbarrier_init(&empty[s], 1);
        }
    }
    __syncthreads();
    if (t >= 128) {
        lf::setmaxnreg_dec<40>();
        if (t != 128) return;
        for (unsigned i = 0; i < tiles; ++i) {
            const unsigned s = i % 2, parity = ((i / 2) & 1u) ^ (p.mode == 1 ? 0u : 1u);
            lf::mbarrier_wait_parity(&empty[s], parity);
            lf::mbarrier_arrive_expect_tx(&full[s], 512);
            lf::tma_load_2d(stage + 128 * s, static_cast<const lf::TensorMap*>(p.aux), 0, int(8 * i), &full[s]);
        }
        return;
    }
    if (p.mode == 4 && t / 32 == 1) {
        lf::setmaxnreg_inc<240>();
    } else {
        lf::setmaxnreg_inc<232>();
    }
    float acc = 0.0f;
    for (unsigned i = 0; i < tiles; ++i) {
        const unsigned s = i % 2, parity = ((i / 2) & 1u) ^ (p.mode == 2 ? 1u : 0u);
        lf::mbarrier_wait_parity(&full[s], parity);
        acc += stage[128 * s + t];
        lf::named_barrier_sync(1, p.mode == 5 ? 256 : 128);  // every consumer has read the stage
        if (t == 0 && p.mode != 3) lf::mbarrier_arrive(&empty[s]);
    }
    static_cast<float*>(p.out)[t] = acc;
}

// Warpgroup misuse. out: f32[blockDim.x]. Every thread calls setmaxnreg.inc 64 and writes 1.
// mode 1: warp 2 returns first (its warpgroup's collective can never complete: launch error);
// launched with a block that is not whole warpgroups (e.g. 96 threads): launch error.
extern "C" __global__ void sim_planted_warpgroup(const SimTestParams p) {
    if (p.mode == 1 && threadIdx.x / 32 == 2) return;
    lf::setmaxnreg_inc<64>();
    static_cast<float*>(p.out)[threadIdx.x] = 1.0f;
}
