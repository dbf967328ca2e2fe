// victim_main.cpp — the driver of the planted-bug tests (DESIGN §7). build.rs links it with
// the runtime, the registry and every kernel, once under AddressSanitizer and once under
// ThreadSanitizer; a test runs it as a child process and reads its stderr.
//
//   victim_main oob_write                 ASan must report heap-buffer-overflow
//   victim_main oob_write_control         clean: prints "ok", exits 0
//   victim_main missing_barrier           TSan must report a data race
//   victim_main missing_barrier_control   clean: prints "ok", exits 0
//   victim_main shared_oob                ASan must report global-buffer-overflow (a
//                                         static __shared__ array)
//   victim_main dynamic_smem_oob          ASan must report heap-buffer-overflow (dynamic
//                                         shared memory)
//   victim_main smem_oob_control          clean: prints "ok", exits 0
//
// A planted scenario prints "launched" and exits 0 if it gets that far: the sanitizer's
// report (and its exit status: ASan aborts, TSan exits 66) is the outcome. Buffers are
// malloc'ed at their exact size so ASan's red zones sit right after them. Launches go
// through lf_sim_launch, the entry point the Rust crate uses.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "planted_bugs.h"

struct LfSimDim {
    uint32_t x, y, z;
};
extern "C" int32_t lf_sim_launch(const char* kernel, LfSimDim grid, LfSimDim block, size_t dynamic_smem_bytes,
                                 const void* params, size_t params_bytes, char* err, size_t err_cap);

namespace {

bool launch(const char* kernel, uint32_t blocks, uint32_t threads, const SimTestParams& p, size_t smem = 0) {
    char err[1024];
    if (lf_sim_launch(kernel, {blocks, 1, 1}, {threads, 1, 1}, smem, &p, sizeof p, err, sizeof err) != 0) {
        std::fprintf(stderr, "launch failed: %s\n", err);
        return false;
    }
    return true;
}

// out[i] = i over n = 1000 floats, in 4 blocks of 256 threads; `oob` also writes out[n].
int oob_write(bool planted) {
    const unsigned long long n = 1000;
    float* out = static_cast<float*>(std::malloc(n * sizeof(float)));
    SimTestParams p{};
    p.out = out;
    p.n = n;
    p.oob = planted;
    if (!launch("sim_planted_oob_write_f32", 4, 256, p)) return 1;
    for (unsigned long long i = 0; i < n && !planted; ++i) {
        if (out[i] != float(i)) {
            std::fprintf(stderr, "out[%llu] = %g, expected %llu\n", i, out[i], i);
            return 1;
        }
    }
    std::free(out);
    std::puts(planted ? "launched" : "ok");
    return 0;
}

// One block of 256 threads reverses 256 floats through shared memory; `planted` drops the
// barrier between the writes and the reads.
int missing_barrier(bool planted) {
    const unsigned long long n = 256;
    float* in = static_cast<float*>(std::malloc(n * sizeof(float)));
    float* out = static_cast<float*>(std::malloc(n * sizeof(float)));
    for (unsigned long long i = 0; i < n; ++i) in[i] = float(i);
    SimTestParams p{};
    p.out = out;
    p.in = in;
    p.n = n;
    p.barrier = !planted;
    if (!launch("sim_planted_missing_barrier_f32", 1, 256, p)) return 1;
    for (unsigned long long i = 0; i < n && !planted; ++i) {
        if (out[i] != float(n - 1 - i)) {
            std::fprintf(stderr, "out[%llu] = %g, expected %llu\n", i, out[i], n - 1 - i);
            return 1;
        }
    }
    std::free(in);
    std::free(out);
    std::puts(planted ? "launched" : "ok");
    return 0;
}

// in[i] = i through static and dynamic shared memory, one block of 256 threads; `oob` 1 or
// 2 overflows the static or the dynamic array.
int smem_oob(int oob) {
    const unsigned long long n = 256;
    float* in = static_cast<float*>(std::malloc(n * sizeof(float)));
    float* out = static_cast<float*>(std::malloc(n * sizeof(float)));
    for (unsigned long long i = 0; i < n; ++i) in[i] = float(i);
    SimTestParams p{};
    p.out = out;
    p.in = in;
    p.n = n;
    p.oob = oob;
    if (!launch("sim_planted_smem_oob_f32", 1, 256, p, n * sizeof(float))) return 1;
    for (unsigned long long i = 0; i < n && oob == 0; ++i) {
        if (out[i] != float(i) + 1.0f) {
            std::fprintf(stderr, "out[%llu] = %g, expected %llu\n", i, out[i], i + 1);
            return 1;
        }
    }
    std::free(in);
    std::free(out);
    std::puts(oob != 0 ? "launched" : "ok");
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    const char* s = argc == 2 ? argv[1] : "";
    if (std::strcmp(s, "oob_write") == 0) return oob_write(true);
    if (std::strcmp(s, "oob_write_control") == 0) return oob_write(false);
    if (std::strcmp(s, "missing_barrier") == 0) return missing_barrier(true);
    if (std::strcmp(s, "missing_barrier_control") == 0) return missing_barrier(false);
    if (std::strcmp(s, "shared_oob") == 0) return smem_oob(1);
    if (std::strcmp(s, "dynamic_smem_oob") == 0) return smem_oob(2);
    if (std::strcmp(s, "smem_oob_control") == 0) return smem_oob(0);
    std::fprintf(stderr,
                 "usage: %s oob_write | oob_write_control | missing_barrier | missing_barrier_control | "
                 "shared_oob | dynamic_smem_oob | smem_oob_control\n",
                 argc > 0 ? argv[0] : "victim_main");
    return 2;
}
