// selftest_main.cpp — the simulator's self-test driver (run by selftest.sh, in a plain, an
// AddressSanitizer and a ThreadSanitizer build): launches each sim_selftest_* kernel of
// planted_bugs.cu through lf_sim_launch and checks its results against values computed
// here, checks that every planted runtime error (trap, assert, bad warp masks, deadlocks,
// C++ exceptions, bad launches) comes back as a launch error naming the kernel and thread,
// and that the launcher works normally after each. Prints one PASS/FAIL line per check,
// then the measured launch overhead; exits 1 if any check failed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lf_sim.h"
#include "planted_bugs.h"

struct LfSimDim {
    uint32_t x, y, z;
};
extern "C" int32_t lf_sim_launch(const char* kernel, LfSimDim grid, LfSimDim block, size_t dynamic_smem_bytes,
                                 const void* params, size_t params_bytes, char* err, size_t err_cap);
extern "C" size_t lf_sim_kernel_count(void);
extern "C" const char* lf_sim_kernel_name(size_t i);
extern "C" size_t lf_sim_param_bytes(const char* name);

namespace {

int g_failures = 0;

void check(const std::string& name, bool ok, const std::string& detail = "") {
    if (ok) {
        std::printf("PASS %s\n", name.c_str());
    } else {
        std::printf("FAIL %s: %s\n", name.c_str(), detail.c_str());
        ++g_failures;
    }
}

struct Outcome {
    int32_t rc;
    std::string error;
};

Outcome launch(const char* kernel, LfSimDim grid, LfSimDim block, const SimTestParams& p, size_t smem = 0) {
    char err[1024] = "";
    int32_t rc = lf_sim_launch(kernel, grid, block, smem, &p, sizeof p, err, sizeof err);
    return {rc, err};
}

// Small integers: every sum the kernels form is exact in f32, whatever the order.
std::vector<float> small_ints(size_t n, std::mt19937& rng) {
    std::uniform_int_distribution<int> d(-8, 8);
    std::vector<float> v(n);
    for (float& x : v) x = float(d(rng));
    return v;
}

std::string mismatch(size_t i, double got, double want) {
    return "element " + std::to_string(i) + ": got " + std::to_string(got) + ", expected " +
           std::to_string(want);
}

void test_registry() {
    size_t n = lf_sim_kernel_count();
    bool found = false;
    for (size_t i = 0; i < n; ++i) found |= std::string(lf_sim_kernel_name(i)) == "sim_selftest_shfl_f32";
    check("registry lists the kernels", n >= 16 && found && lf_sim_kernel_name(n) == nullptr,
          std::to_string(n) + " kernels");
    check("registry param bytes", lf_sim_param_bytes("sim_selftest_vote") == sizeof(SimTestParams) &&
                                      lf_sim_param_bytes("no_such_kernel") == 0);
}

void test_shfl(std::mt19937& rng) {
    const uint32_t blocks = 3, threads = 64, n = blocks * threads;
    std::vector<float> in = small_ints(n, rng), out(8 * n, NAN);
    SimTestParams p{};
    p.in = in.data();
    p.out = out.data();
    p.n = n;
    Outcome o = launch("sim_selftest_shfl_f32", {blocks, 1, 1}, {threads, 1, 1}, p);
    std::string bad = o.error;
    for (uint32_t g = 0; g < n && bad.empty(); ++g) {
        uint32_t lane = g % 32, w0 = g - lane;
        auto at = [&](uint32_t l) { return in[w0 + l]; };
        double want[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (uint32_t l = 0; l < 32; ++l) want[0] += at(l);
        for (uint32_t l = 0; l <= lane; ++l) want[1] += at(l);
        want[2] = lane + 3 < 32 ? at(lane + 3) : at(lane);
        want[3] = at((lane & ~7u) | 3);
        want[4] = lane < 16 ? at(lane) : at(lane - 16);
        want[5] = 2.0 * at((lane + 1) % 32);
        want[6] = lane % 16 == 15 ? at(lane) : at(lane + 1);
        want[7] = lane == 0 ? at(0) : at(lane - 1);
        for (int k = 0; k < 8 && bad.empty(); ++k) {
            if (out[8 * g + k] != want[k])
                bad = "k=" + std::to_string(k) + " " + mismatch(g, out[8 * g + k], want[k]);
        }
    }
    check("shuffles: xor reduce, up scan, down, idx/xor with width, double, bf16, delta mod 32", bad.empty(),
          bad);
}

void test_vote() {
    const uint32_t blocks = 2, threads = 64, n = blocks * threads;
    std::vector<float> in(n);
    // Warp 0: every third lane positive; warp 1: all positive; warp 2: none; warp 3: lane 31 only.
    for (uint32_t g = 0; g < n; ++g) {
        uint32_t w = g / 32, lane = g % 32;
        in[g] = (w == 0 && lane % 3 == 0) || w == 1 || (w == 3 && lane == 31) ? 1.0f : -1.0f;
    }
    std::vector<unsigned> out(4 * n, 0xdeadbeef);
    SimTestParams p{};
    p.in = in.data();
    p.out = out.data();
    p.n = n;
    Outcome o = launch("sim_selftest_vote", {blocks, 1, 1}, {threads, 1, 1}, p);
    std::string bad = o.error;
    for (uint32_t g = 0; g < n && bad.empty(); ++g) {
        unsigned ballot = 0;
        for (uint32_t l = 0; l < 32; ++l) ballot |= unsigned(in[g / 32 * 32 + l] > 0) << l;
        unsigned want[4] = {ballot, ballot != 0, ballot == 0xffffffffu, 0xffffffffu};
        for (int k = 0; k < 4 && bad.empty(); ++k) {
            if (out[4 * g + k] != want[k])
                bad = "k=" + std::to_string(k) + " " + mismatch(g, out[4 * g + k], want[k]);
        }
    }
    check("votes: ballot, any, all, activemask", bad.empty(), bad);
}

// 48 threads: warp 0 has 32 lanes, warp 1 has 16; lanes >= `live` return first.
void test_activemask(unsigned live) {
    const uint32_t threads = 48;
    std::vector<unsigned> out(2 * threads, 0xdeadbeef);
    SimTestParams p{};
    p.out = out.data();
    p.n = live;
    Outcome o = launch("sim_selftest_activemask", {1, 1, 1}, {threads, 1, 1}, p);
    std::string bad = o.error;
    for (uint32_t g = 0; g < threads && bad.empty(); ++g) {
        uint32_t lane = g % 32, lanes = g < 32 ? 32 : 16, n = std::min(lanes, live);
        unsigned want[2] = {n == 32 ? 0xffffffffu : (1u << n) - 1, g - lane};
        for (int k = 0; k < 2 && bad.empty(); ++k) {
            unsigned got = out[2 * g + k];
            if (lane >= live ? got != 0xdeadbeef : got != want[k])
                bad = "k=" + std::to_string(k) + " " + mismatch(g, got, want[k]);
        }
    }
    check("__activemask after " + std::to_string(32 - live) + " lanes returned, partial warp", bad.empty(),
          bad);
}

void test_atomics() {
    const uint32_t blocks = 4, threads = 256, n = blocks * threads;
    SimAtomicsOut o{};
    o.min_id = 0xffffffffu;
    SimTestParams p{};
    p.aux = &o;
    p.n = n;
    Outcome r = launch("sim_selftest_atomics", {blocks, 1, 1}, {threads, 1, 1}, p);
    bool ok = r.rc == 0 && o.count == n && o.max_id == int(n - 1) && o.min_id == 5 &&
              o.cas_sum == int(2 * n) && o.or_bits == 0xffffffffu && o.sub == -int(n) && o.block_sum == n &&
              o.half_sum == n / 2.0 && o.fsum == float(n) && o.exch >= 0 && o.exch < n &&
              o.exch == std::floor(o.exch);
    char detail[256];
    std::snprintf(detail, sizeof detail,
                  "%s count %llu max %d min %u cas %d or %08x sub %d block %u half %g f %g x %g",
                  r.error.c_str(), o.count, o.max_id, o.min_id, o.cas_sum, o.or_bits, o.sub, o.block_sum,
                  o.half_sum, o.fsum, o.exch);
    check("atomics: add/sub/max/min/cas/or/exch, global and shared", ok, detail);
}

void test_dynamic_smem(std::mt19937& rng) {
    const uint32_t blocks = 3, threads = 128, n = blocks * threads;
    std::vector<float> in = small_ints(n, rng), out(n, NAN);
    SimTestParams p{};
    p.in = in.data();
    p.out = out.data();
    p.n = n;
    Outcome o = launch("sim_selftest_dynamic_smem_f32", {blocks, 1, 1}, {threads, 1, 1}, p, 2 * threads * 4);
    std::string bad = o.error;
    for (uint32_t g = 0; g < n && bad.empty(); ++g) {
        uint32_t b = g / threads * threads, t = g % threads;
        float want = in[b + threads - 1 - t] + 2.0f * in[b + (t + 1) % threads];
        if (out[g] != want) bad = mismatch(g, out[g], want);
    }
    check("dynamic shared memory, several blocks", bad.empty(), bad);
}

void test_block_reduce(std::mt19937& rng) {
    const uint32_t blocks = 5, threads = 256, n = 1200;  // the last block is partly past n
    std::vector<float> in = small_ints(n, rng), out(blocks, NAN);
    for (uint32_t i = 256; i < 512; ++i) in[i] = 1.0f;  // block 1: all positive
    std::vector<unsigned> aux(3 * blocks, 0xdeadbeef);
    SimTestParams p{};
    p.in = in.data();
    p.out = out.data();
    p.aux = aux.data();
    p.n = n;
    Outcome o = launch("sim_selftest_block_reduce_f32", {blocks, 1, 1}, {threads, 1, 1}, p);
    std::string bad = o.error;
    for (uint32_t b = 0; b < blocks && bad.empty(); ++b) {
        float sum = 0;
        unsigned count = 0;
        for (uint32_t i = b * threads; i < (b + 1) * threads; ++i) {
            float x = i < n ? in[i] : 0.0f;
            sum += x;
            count += x > 0;
        }
        unsigned want[3] = {count, count == threads, count != 0};
        if (out[b] != sum) bad = "sum " + mismatch(b, out[b], sum);
        for (int k = 0; k < 3 && bad.empty(); ++k) {
            if (aux[3 * b + k] != want[k])
                bad = "syncthreads_" + std::to_string(k) + " " + mismatch(b, aux[3 * b + k], want[k]);
        }
    }
    check("static shared memory reused by 5 blocks; __syncthreads_count/and/or", bad.empty(), bad);
}

void test_geometry(LfSimDim grid, LfSimDim block) {
    uint32_t threads = block.x * block.y * block.z, blocks = grid.x * grid.y * grid.z;
    std::vector<unsigned> out(8 * threads * blocks, 0xdeadbeef), aux(6, 0);
    SimTestParams p{};
    p.out = out.data();
    p.aux = aux.data();
    Outcome o = launch("sim_selftest_geometry", grid, block, p);
    std::string bad = o.error;
    unsigned want_aux[6] = {block.x, block.y, block.z, grid.x, grid.y, grid.z};
    for (int k = 0; k < 6 && bad.empty(); ++k) {
        if (aux[k] != want_aux[k]) bad = "blockDim/gridDim " + mismatch(k, aux[k], want_aux[k]);
    }
    for (uint32_t b = 0; b < blocks && bad.empty(); ++b) {
        for (uint32_t t = 0; t < threads && bad.empty(); ++t) {
            unsigned want[8] = {t % block.x,
                                t / block.x % block.y,
                                t / (block.x * block.y),
                                b % grid.x,
                                b / grid.x % grid.y,
                                b / (grid.x * grid.y),
                                t / 32 * 32,
                                threads};
            for (int k = 0; k < 8 && bad.empty(); ++k) {
                unsigned got = out[8 * (b * threads + t) + k];
                if (got != want[k])
                    bad = "k=" + std::to_string(k) + " " + mismatch(b * threads + t, got, want[k]);
            }
        }
    }
    char name[128];
    std::snprintf(name, sizeof name, "geometry grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y, grid.z,
                  block.x, block.y, block.z);
    check(name, bad.empty(), bad);
}

void test_convert() {
    // Values with known answers: (input, bf16 rn, bf16 rz, f16 rn, f16 rz).
    struct Case {
        float x;
        uint16_t b_rn, b_rz, h_rn, h_rz;
    };
    const Case cases[] = {
        {1.0f, 0x3f80, 0x3f80, 0x3c00, 0x3c00},
        {-2.5f, 0xc020, 0xc020, 0xc100, 0xc100},
        {0x1.01p0f, 0x3f80, 0x3f80, 0x3c04, 0x3c04},  // bf16 tie, even stays down
        {0x1.03p0f, 0x3f82, 0x3f81, 0x3c0c, 0x3c0c},  // bf16 tie, odd rounds up
        {65504.0f, 0x4780, 0x477f, 0x7bff, 0x7bff},   // largest f16
        {65520.0f, 0x4780, 0x477f, 0x7c00, 0x7bff},   // f16 tie at the top: to inf
        {0x1p-24f, 0x3380, 0x3380, 0x0001, 0x0001},   // least f16 subnormal
        {0x1p-25f, 0x3300, 0x3300, 0x0000, 0x0000},   // f16 tie to 0
        {0x1.8p-25f, 0x3340, 0x3340, 0x0001, 0x0000},
        {-0.0f, 0x8000, 0x8000, 0x8000, 0x8000},
        {INFINITY, 0x7f80, 0x7f80, 0x7c00, 0x7c00},
        {0x1.fffffep127f, 0x7f80, 0x7f7f, 0x7c00, 0x7bff},  // f32 max: bf16 rn overflows
    };
    const size_t n = sizeof cases / sizeof cases[0] + 1;  // + a NaN
    std::vector<float> in(n);
    for (size_t i = 0; i + 1 < n; ++i) in[i] = cases[i].x;
    in[n - 1] = NAN;
    std::vector<unsigned short> bits(4 * n, 0xdead);
    std::vector<float> back(4 * n, 0);
    SimTestParams p{};
    p.in = in.data();
    p.out = bits.data();
    p.aux = back.data();
    p.n = n;
    Outcome o = launch("sim_selftest_convert", {1, 1, 1}, {32, 1, 1}, p);
    std::string bad = o.error;
    for (size_t i = 0; i + 1 < n && bad.empty(); ++i) {
        const Case& c = cases[i];
        uint16_t want[4] = {c.b_rn, c.b_rz, c.h_rn, c.h_rz};
        for (int k = 0; k < 4 && bad.empty(); ++k) {
            if (bits[4 * i + k] != want[k])
                bad = "bits k=" + std::to_string(k) + " " + mismatch(i, bits[4 * i + k], want[k]);
        }
        float bf = lf_sim::detail::bf16_to_f32(c.b_rn), hf = lf_sim::detail::f16_to_f32(c.h_rn);
        float want_back[4] = {bf, hf, bf, hf};
        for (int k = 0; k < 4 && bad.empty(); ++k) {
            if (std::memcmp(&back[4 * i + k], &want_back[k], 4) != 0)
                bad = "back k=" + std::to_string(k) + " " + mismatch(i, back[4 * i + k], want_back[k]);
        }
    }
    for (int k = 0; k < 4 && bad.empty(); ++k) {
        if (!std::isnan(back[4 * (n - 1) + k])) bad = "NaN did not stay NaN (k=" + std::to_string(k) + ")";
    }
    check("bf16/f16 conversions in device code", bad.empty(), bad);
}

// A clean launch after an error: the pool and the launch state recovered.
bool clean_launch_works() {
    std::vector<float> in(64, 1.0f), out(64, 0.0f);
    SimTestParams p{};
    p.in = in.data();
    p.out = out.data();
    Outcome o = launch("sim_planted_full_mask_sum_f32", {1, 1, 1}, {64, 1, 1}, p);
    for (float x : out) {
        if (x != 32.0f) return false;
    }
    return o.rc == 0;
}

void expect_error(const std::string& name, const char* kernel, LfSimDim grid, LfSimDim block,
                  const SimTestParams& p, const std::vector<std::string>& needles, size_t smem = 0) {
    Outcome o = launch(kernel, grid, block, p, smem);
    bool ok = o.rc != 0;
    for (const std::string& s : needles) ok = ok && o.error.find(s) != std::string::npos;
    bool recovered = clean_launch_works();
    check("error: " + name, ok && recovered,
          (o.rc == 0 ? std::string("launch succeeded") : "message: " + o.error) +
              (recovered ? "" : " (and the next clean launch failed)"));
}

void test_errors() {
    std::vector<float> buf(4096, 1.0f), out(4096, 0.0f);
    SimTestParams p{};
    p.in = buf.data();
    p.out = out.data();
    p.aux = out.data();

    SimTestParams trap = p;
    trap.n = 256 + 5;  // block 1, thread 5
    expect_error("__trap", "sim_planted_trap", {2, 1, 1}, {256, 1, 1}, trap,
                 {"kernel `sim_planted_trap`: block (1,0,0) thread (5,0,0): __trap() called"});
    SimTestParams no_in = p;
    no_in.in = nullptr;
    expect_error("assert", "sim_planted_assert", {1, 1, 1}, {64, 1, 1}, no_in,
                 {"assertion `p.in != nullptr` failed", "planted_bugs.cu"});
    expect_error("shuffle after lanes exited", "sim_planted_exited_lane_shfl", {1, 1, 1}, {64, 1, 1}, p,
                 {"sim_planted_exited_lane_shfl", "exit"});
    expect_error("full mask in a partial warp", "sim_planted_full_mask_sum_f32", {1, 1, 1}, {48, 1, 1}, p,
                 {"__shfl_xor_sync with mask 0xffffffff names lanes 0xffff0000 that do not exist"});
    expect_error("shuffle against __syncthreads", "sim_planted_shfl_vs_syncthreads", {1, 1, 1}, {64, 1, 1}, p,
                 {"deadlock"});
    SimTestParams thrower = p;
    thrower.n = 7;
    expect_error("C++ exception", "sim_planted_cpp_exception", {1, 1, 1}, {128, 1, 1}, thrower,
                 {"thread (7,0,0): C++ exception: planted exception"});
    expect_error("unknown kernel", "no_such_kernel", {1, 1, 1}, {1, 1, 1}, p,
                 {"unknown kernel `no_such_kernel`"});
    expect_error("zero grid dimension", "sim_selftest_vote", {1, 0, 1}, {32, 1, 1}, p, {"zero dimension"});
    expect_error("1025 threads", "sim_selftest_vote", {1, 1, 1}, {1025, 1, 1}, p, {"blockDim.x = 1025"});
    expect_error("32x32x2 threads", "sim_selftest_vote", {1, 1, 1}, {32, 32, 2}, p,
                 {"more than 1024 threads"});
    expect_error("blockDim.z 65", "sim_selftest_vote", {1, 1, 1}, {1, 1, 65}, p, {"blockDim.z = 65"});
    expect_error("gridDim.y 65536", "sim_selftest_vote", {1, 65536, 1}, {32, 1, 1}, p, {"gridDim.y = 65536"});
    expect_error("dynamic smem 227 KiB + 1", "sim_selftest_vote", {1, 1, 1}, {32, 1, 1}, p,
                 {"232449 bytes of dynamic shared memory"}, 227 * 1024 + 1);

    char small[8];
    int32_t rc =
        lf_sim_launch("sim_selftest_vote", {1, 1, 1}, {32, 1, 1}, 0, &p, sizeof p - 8, small, sizeof small);
    check("error: parameter size, message truncated to err_cap", rc != 0 && std::string(small) == "kernel ");
    check("control: full-mask sum in whole warps", clean_launch_works());
}

// ---- Hopper: wgmma, descriptors, TMA, mbarrier, named barriers, warpgroups ----

extern "C" int32_t lf_sim_tensor_map_encode_2d(void* map, uint32_t elem_bytes, const void* base, uint64_t dim0,
                                               uint64_t dim1, uint64_t stride1_bytes, uint32_t box0, uint32_t box1,
                                               uint32_t swizzle_bytes, char* err, size_t err_cap);

// sim_selftest_wgmma_{bf16,f16}: D = A·Bᵀ through shared memory laid out for swizzle `mode`,
// the operand layouts and form `layout` (bits: 1 A MN-major, 2 B MN-major, 4 A from registers).
// flags: the kernel's planted bugs (planted_bugs.cu). Returns "" if D is exact, else why not.
std::string run_wgmma(bool f16, int n, int mode, int layout, int flags, std::mt19937& rng,
                      Outcome* outcome = nullptr) {
    const int span = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
    const int k = span == 0 ? 32 : span / 2;
    std::uniform_int_distribution<int> dist(-4, 4);
    std::vector<float> a(64 * k), b(size_t(n) * k);
    for (float& x : a) x = float(dist(rng));
    for (float& x : b) x = float(dist(rng));
    auto bits = [&](const std::vector<float>& v) {
        std::vector<uint16_t> r(v.size());
        for (size_t i = 0; i < v.size(); ++i)
            r[i] = f16 ? lf_sim::detail::f32_to_f16(v[i], true) : lf_sim::detail::f32_to_bf16_rn(v[i]);
        return r;
    };
    std::vector<uint16_t> ab = bits(a), bb = bits(b);
    std::vector<float> out(64 * size_t(n), -12345.0f);
    SimTestParams p{};
    p.in = ab.data();
    p.aux = bb.data();
    p.out = out.data();
    p.mode = mode;
    p.arg = n;
    p.barrier = flags;
    p.n = (unsigned long long)layout;
    Outcome o = launch(f16 ? "sim_selftest_wgmma_f16" : "sim_selftest_wgmma_bf16", {1, 1, 1}, {128, 1, 1}, p, 40960);
    if (outcome != nullptr) *outcome = o;
    if (o.rc != 0) return "launch failed: " + o.error;
    for (int r = 0; r < 64; ++r) {
        for (int c = 0; c < n; ++c) {
            float want = 0;
            for (int q = 0; q < k; ++q) want += a[size_t(r) * k + q] * b[size_t(c) * k + q];
            float got = out[size_t(r) * n + c];
            if (!(got == want))
                return "D[" + std::to_string(r) + "][" + std::to_string(c) + "]: got " + std::to_string(got) +
                       ", expected " + std::to_string(want);
        }
    }
    return "";
}

void test_wgmma(std::mt19937& rng) {
    for (bool f16 : {false, true}) {
        for (int mode : {0, 1, 2, 3}) {
            for (int n : {8, 16, 64, 256}) {
                if (mode != 1 && n == 256 && f16) continue;  // keep it short
                std::string bad = run_wgmma(f16, n, mode, 0, 0, rng);
                check(std::string("wgmma m64n") + std::to_string(n) + "k16 " + (f16 ? "f16" : "bf16") +
                          ", descriptor swizzle mode " + std::to_string(mode) + ": exact",
                      bad.empty(), bad);
            }
        }
    }
    // Planted bugs: each caught, beside its clean control above.
    for (int mode : {0, 1, 2, 3}) {
        std::string bad = run_wgmma(false, 64, mode, 0, 2, rng);
        check("planted: a descriptor with the wrong swizzle (mode " + std::to_string(mode) + ") gives a wrong D",
              bad.find("expected") != std::string::npos, bad.empty() ? "D was right" : bad);
    }
    std::string early = run_wgmma(false, 64, 1, 0, 4, rng);
    check("planted: accumulators read before wgmma_wait are NaN", early.find("nan") != std::string::npos,
          early.empty() ? "D was right" : early);
    Outcome o{};
    std::string nofence = run_wgmma(false, 64, 1, 0, 1, rng, &o);
    check("planted: no fence.proxy.async before the wgmma is a launch error",
          o.rc != 0 && o.error.find("fence.proxy.async") != std::string::npos, o.error);
    check("control: a clean wgmma launch after the errors", run_wgmma(true, 16, 3, 0, 0, rng).empty());
}

// MN-major operands (imm-trans-a/b) and A from registers (the RS form), in every swizzle mode,
// against the plain product; then their planted bugs, each beside those clean controls.
void test_wgmma_layouts(std::mt19937& rng) {
    const struct {
        int bits;
        const char* name;
    } layouts[] = {{2, "B MN-major"},
                   {1, "A MN-major"},
                   {3, "A and B MN-major"},
                   {4, "A from registers"},
                   {6, "A from registers, B MN-major"}};
    for (int mode : {0, 1, 2, 3}) {
        const int per = mode == 0 ? 8 : mode == 1 ? 64 : mode == 2 ? 32 : 16;  // M/N elements per atom row
        for (const auto& l : layouts) {
            for (int n : {16, 64, 128, 256}) {
                if ((l.bits & 2) && n < per) continue;  // an MN-major B of whole atoms
                const bool f16 = n == 128;
                std::string bad = run_wgmma(f16, n, mode, l.bits, 0, rng);
                check(std::string("wgmma m64n") + std::to_string(n) + "k16 " + (f16 ? "f16" : "bf16") + ", " + l.name +
                          ", swizzle mode " + std::to_string(mode) + ": exact",
                      bad.empty(), bad);
            }
        }
    }
    for (int mode : {0, 1, 2, 3}) {
        for (int bits : {2, 6}) {
            std::string bad = run_wgmma(false, 256, mode, bits, 8, rng);
            check("planted: B stored K-major, read with imm-trans-b (" + std::string(bits & 4 ? "RS" : "SS") +
                      ", mode " + std::to_string(mode) + ") gives a wrong D",
                  bad.find("expected") != std::string::npos, bad.empty() ? "D was right" : bad);
        }
        std::string bad = run_wgmma(false, 256, mode, 2, 16, rng);
        check("planted: an MN-major B descriptor with LBO and SBO swapped (mode " + std::to_string(mode) +
                  ") gives a wrong D",
              bad.find("expected") != std::string::npos, bad.empty() ? "D was right" : bad);
    }
    std::string early = run_wgmma(false, 64, 1, 4, 4, rng);
    check("planted: RS accumulators read before wgmma_wait are NaN", early.find("nan") != std::string::npos,
          early.empty() ? "D was right" : early);
    Outcome o{};
    run_wgmma(false, 64, 1, 4, 32, rng, &o);
    check("planted: an A register written between the RS wgmma's issue and its wait is a launch error",
          o.rc != 0 &&
              o.error.find("register operand A changed between the wgmma's issue and the wait that covers it") !=
                  std::string::npos &&
              o.error.find("thread (37,0,0)") != std::string::npos,
          o.error);
    check("control: a clean RS wgmma launch after the error", run_wgmma(true, 64, 3, 6, 0, rng).empty());
    run_wgmma(false, 64, 1, 2, 64, rng, &o);
    check("planted: imm-trans-b not warpgroup-uniform is a launch error",
          o.rc != 0 && o.error.find("not warpgroup-uniform") != std::string::npos &&
              o.error.find("imm-trans-b") != std::string::npos,
          o.error);
    run_wgmma(false, 64, 1, 6, 64, rng, &o);
    check("planted: RS imm-trans-b not warpgroup-uniform is a launch error",
          o.rc != 0 && o.error.find("not warpgroup-uniform") != std::string::npos, o.error);
}

// The shared-memory image of a TMA box (u16 elements) at (c0, c1) of a rows×cols tensor, with
// swizzle span `sw` (bytes; 0 none): element (x, y) of the box sits in row y, its 16-byte chunk
// index XORed with the row's phase in its pattern — from the TMA's own point of view.
std::vector<uint16_t> tma_image(const std::vector<uint16_t>& g, int rows, int cols, int c0, int c1, int box0,
                                int box1, int sw) {
    std::vector<uint16_t> img(size_t(box0) * box1);
    const int row_bytes = 2 * box0;
    for (int y = 0; y < box1; ++y) {
        for (int x = 0; x < box0; ++x) {
            const int gx = c0 + x, gy = c1 + y;
            const uint16_t v = gx >= 0 && gy >= 0 && gx < cols && gy < rows ? g[size_t(gy) * cols + gx] : 0;
            int byte = 2 * x, chunk = byte / 16;
            if (sw != 0) chunk ^= (y % 8) / (128 / sw);
            img[(size_t(y) * row_bytes + 16 * chunk + byte % 16) / 2] = v;
        }
    }
    return img;
}

void test_tma() {
    const int rows = 40, cols = 72;
    std::vector<uint16_t> g(size_t(rows) * cols);
    for (size_t i = 0; i < g.size(); ++i) g[i] = uint16_t(1 + i);
    struct Case {
        int sw, box0, box1, c0, c1, mode;
    };
    const Case cases[] = {
        {0, 24, 5, 3, 2, 0},  {0, 16, 8, 64, 36, 0},  // a box past both ends: zero fill
        {128, 64, 16, 0, 0, 0}, {128, 64, 8, 40, -3, 0}, {64, 32, 16, 8, 4, 0}, {32, 16, 16, -8, 30, 0},
        {128, 64, 8, 0, 0, 1},  // planted: wrong parity
    };
    for (const Case& k : cases) {
        alignas(64) unsigned char map[128];
        char err[256] = "";
        int32_t rc = lf_sim_tensor_map_encode_2d(map, 2, g.data(), cols, rows, cols * 2, uint32_t(k.box0),
                                                 uint32_t(k.box1), uint32_t(k.sw), err, sizeof err);
        const size_t bytes = size_t(2) * k.box0 * k.box1;
        std::vector<uint16_t> out(bytes / 2, 0xdead);
        SimTestParams p{};
        p.out = out.data();
        p.aux = map;
        p.n = bytes;
        p.oob = k.c0;
        p.arg = k.c1;
        p.mode = k.mode;
        Outcome o = rc == 0 ? launch("sim_selftest_tma", {1, 1, 1}, {128, 1, 1}, p, 1024 + bytes) : Outcome{rc, err};
        std::vector<uint16_t> want = tma_image(g, rows, cols, k.c0, k.c1, k.box0, k.box1, k.sw);
        char name[160];
        std::snprintf(name, sizeof name, "TMA 2-D box %dx%d at (%d,%d), swizzle %d B%s", k.box0, k.box1, k.c0,
                      k.c1, k.sw, k.mode == 1 ? ", planted: wrong mbarrier parity reads poison" : "");
        if (k.mode == 1) {
            // Threads that wait before the copy's phase completes pass at once and read poison;
            // those after wait for the next phase, which never comes: a deadlock. Either fails.
            bool caught = (o.rc == 0 && out[0] == 0xffff) || o.error.find("deadlock") != std::string::npos;
            check(name, caught, o.error.empty() ? "the box was read intact" : o.error);
        } else {
            check(name, o.rc == 0 && out == want, o.error.empty() ? "image differs" : o.error);
        }
    }
    alignas(64) unsigned char map[128];
    char err[256] = "";
    check("tensor map: a swizzled box narrower than the span is refused",
          lf_sim_tensor_map_encode_2d(map, 2, g.data(), cols, rows, cols * 2, 32, 8, 128, err, sizeof err) != 0 &&
              std::string(err).find("swizzle") != std::string::npos,
          err);
}

// sim_selftest_pipeline_f32 with `mode` (planted_bugs.cu).
Outcome run_pipeline(int mode, unsigned tiles, std::vector<float>* result) {
    std::vector<float> g(size_t(tiles) * 8 * 16);
    for (size_t i = 0; i < g.size(); ++i) g[i] = float(int(i % 97) - 40);
    alignas(64) unsigned char map[128];
    char err[256] = "";
    if (lf_sim_tensor_map_encode_2d(map, 4, g.data(), 16, tiles * 8, 64, 16, 8, 0, err, sizeof err) != 0)
        return {1, err};
    std::vector<float> out(128, -1.0f);
    SimTestParams p{};
    p.out = out.data();
    p.aux = map;
    p.n = tiles;
    p.mode = mode;
    Outcome o = launch("sim_selftest_pipeline_f32", {1, 1, 1}, {256, 1, 1}, p, 2048);
    std::vector<float> want(128, 0.0f);
    for (unsigned i = 0; i < tiles; ++i)
        for (int t = 0; t < 128; ++t) want[size_t(t)] += g[size_t(i) * 128 + t];
    if (result != nullptr) *result = out;
    if (o.rc == 0 && out != want && mode == 0) return {2, "wrong sums"};
    return o;
}

void test_pipeline() {
    std::vector<float> out;
    Outcome ok = run_pipeline(0, 7, &out);
    check("producer/consumer warp specialisation: TMA into 2 stages, full/empty mbarriers, named barrier, "
          "setmaxnreg",
          ok.rc == 0, ok.error);
    Outcome o = run_pipeline(1, 7, nullptr);
    check("planted: producer waits on `empty` with the wrong parity: deadlock reported",
          o.rc != 0 && o.error.find("deadlock") != std::string::npos && o.error.find("mbarrier") != std::string::npos,
          o.error);
    o = run_pipeline(2, 7, &out);
    check("planted: consumers wait on `full` with the wrong parity: poison read or deadlock",
          (o.rc == 0 && std::isnan(out[0])) || o.error.find("deadlock") != std::string::npos,
          o.error.empty() ? std::to_string(out[0]) : o.error);
    o = run_pipeline(3, 7, nullptr);
    check("planted: consumers never release a stage: deadlock reported",
          o.rc != 0 && o.error.find("deadlock") != std::string::npos, o.error);
    o = run_pipeline(4, 7, nullptr);
    check("planted: setmaxnreg not warpgroup-uniform", o.rc != 0 && o.error.find("warpgroup-uniform") != std::string::npos,
          o.error);
    o = run_pipeline(5, 7, nullptr);
    check("planted: named barrier counting threads that never arrive: deadlock",
          o.rc != 0 && o.error.find("deadlock") != std::string::npos && o.error.find("bar.sync") != std::string::npos,
          o.error);
    std::vector<float> out2(256);
    SimTestParams p{};
    p.out = out2.data();
    Outcome wg = launch("sim_planted_warpgroup", {2, 1, 1}, {256, 1, 1}, p);
    check("control: setmaxnreg by whole warpgroups", wg.rc == 0, wg.error);
    expect_error("warpgroup collective in a block of 96 threads", "sim_planted_warpgroup", {1, 1, 1}, {96, 1, 1}, p,
                 {"warpgroup 0", "4 whole warps"});
    p.mode = 1;
    expect_error("warpgroup collective after a warp of it exited", "sim_planted_warpgroup", {1, 1, 1}, {128, 1, 1}, p,
                 {"warpgroup", "setmaxnreg"});
}

// Mean milliseconds per launch of the clean oob-write kernel (a trivial store per thread).
double ms_per_launch(uint32_t blocks, int reps) {
    std::vector<float> out(blocks * 256);
    SimTestParams p{};
    p.out = out.data();
    p.n = out.size();
    launch("sim_planted_oob_write_f32", {blocks, 1, 1}, {256, 1, 1}, p);  // warm the pool
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) launch("sim_planted_oob_write_f32", {blocks, 1, 1}, {256, 1, 1}, p);
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
}

}  // namespace

int main() {
    std::mt19937 rng(12345);
    test_registry();
    test_shfl(rng);
    test_vote();
    test_activemask(20);
    test_activemask(32);
    test_atomics();
    test_dynamic_smem(rng);
    test_block_reduce(rng);
    test_geometry({2, 3, 2}, {8, 4, 2});
    test_geometry({1, 1, 3}, {4, 4, 4});
    test_geometry({3, 2, 1}, {32, 1, 1});
    test_geometry({2, 1, 1}, {1024, 1, 1});
    test_convert();
    test_errors();
    test_wgmma(rng);
    test_wgmma_layouts(rng);
    test_tma();
    test_pipeline();
    std::printf("INFO launch overhead: 1 block x 256 threads %.2f ms, 64 blocks x 256 threads %.2f ms\n",
                ms_per_launch(1, 50), ms_per_launch(64, 3));
    return g_failures == 0 ? 0 : 1;
}
