// planted_bugs.h — the parameter struct of the simulator's test kernels (planted_bugs.cu),
// and the output record of sim_selftest_atomics, shared with the C++ drivers that launch
// them (victim_main.cpp, selftest_main.cpp). Rust twins, when the crate's tests launch these
// kernels: `#[repr(C)]` structs with the same fields (pointers as u64); SimTestParams is 48
// bytes, SimAtomicsOut 48, both 8-byte aligned.
#pragma once

struct SimTestParams {
    void* out;             // output; type and layout per kernel
    const void* in;        // input, or null
    void* aux;             // second output, or null
    unsigned long long n;  // elements (per kernel: see its comment)
    int oob;               // sim_planted_oob_write_f32: 1 writes out[n], one past the end;
                           // sim_planted_smem_oob_f32: 1 / 2 overflow static / dynamic shared
    int barrier;           // sim_planted_missing_barrier_f32 (and the other barrier kernels):
                           // 1 keeps the __syncthreads()
    int mode;              // which variant of a planted kernel runs (per kernel: its comment)
    int arg;               // a small integer argument (per kernel)
};

// What sim_selftest_atomics accumulates over its n threads (g = global thread id); the
// host zeroes it, except min_id = 0xffffffff.
struct SimAtomicsOut {
    unsigned long long count;  // atomicAdd(1ull): n
    int max_id;                // atomicMax(g): n - 1
    unsigned min_id;           // atomicMin(g + 5): 5
    int cas_sum;               // += 2 by an atomicCAS loop: 2n
    unsigned or_bits;          // atomicOr(1 << g % 32): all ones for n ≥ 32
    int sub;                   // atomicSub(1): -n
    unsigned block_sum;        // Σ over blocks of a shared-memory atomicAdd count: n
    double half_sum;           // atomicAdd(0.5): n / 2
    float fsum;                // atomicAdd(1.0f): n (exact up to 2^24)
    float exch;                // atomicExch(g): some g in [0, n)
};
