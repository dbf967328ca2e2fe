// runtime.cpp — the simulator's launcher: runs a kernel of the registry on OS threads, one
// per CUDA thread of a block, and implements the synchronising intrinsics lf_sim.h declares.
//
// Execution model (README.md has the long form):
//   * launches are serialised by one mutex; a persistent pool of worker threads runs them,
//     worker i being the thread with linear id i (x fastest, then y, z) of every block;
//   * the blocks of a grid run one after another in linear block order, the threads of a
//     block concurrently; a gate that all workers pass between blocks resets the block's
//     state, so the `static` shared arrays and the barrier are reused safely;
//   * __syncthreads is a block barrier on which a thread that returned from the kernel
//     counts as arrived (it drops out, as on Volta and later);
//   * a warp is 32 consecutive linear ids; a warp collective waits for every lane of its
//     mask, and is an error (not a deadlock) when a lane of the mask does not exist, has
//     exited, waits in __syncthreads, or waits in a different collective that needs this lane;
//   * __activemask is a convergence point: it waits until no lane of the warp is running
//     (each has exited, waits in __syncthreads or a collective, or is in __activemask too)
//     and returns the lanes in __activemask, so early-returned lanes drop out of the mask
//     however the OS schedules the threads.
//
// Failure: the first error of a launch (a check here, __trap, a C++ exception) is recorded,
// `failed` is set, and every waiter of the block is woken (barrier and warp generation
// counters are bumped); woken waiters, and any thread reaching a barrier or collective
// later, see `failed` and unwind with `Abort`. The remaining blocks are not run.
//
// Synchronisation uses only std::mutex and std::atomic (waits through atomic::wait), so
// ThreadSanitizer sees every happens-before edge the simulator creates.
#include <algorithm>
#include <array>
#include <cstdarg>
#include <cstdio>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "lf_sim.h"

struct LfSimDim {
    uint32_t x, y, z;
};

extern "C" const lf_sim::KernelEntry* const* lf_sim_kernel_table();

namespace {

using lf_sim::detail::WarpOp;

constexpr uint32_t kMaxThreadsPerBlock = 1024;
constexpr uint32_t kMaxBlockDim[3] = {1024, 1024, 64};
constexpr uint32_t kMaxGridDim[3] = {0x7fffffffu, 65535, 65535};
constexpr size_t kMaxDynamicSmem = 227 * 1024;
constexpr uint32_t kNoPhase = 0xffffffffu;

// Unwinds a simulated thread out of its kernel once the launch has failed.
struct Abort {};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

template <class T>
void wait_while_equal(const std::atomic<T>& a, T old) {
    while (a.load(std::memory_order_acquire) == old) a.wait(old, std::memory_order_acquire);
}

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::sync:
            return "__syncwarp";
        case WarpOp::shfl_idx:
            return "__shfl_sync";
        case WarpOp::shfl_up:
            return "__shfl_up_sync";
        case WarpOp::shfl_down:
            return "__shfl_down_sync";
        case WarpOp::shfl_xor:
            return "__shfl_xor_sync";
        case WarpOp::ballot:
            return "__ballot_sync";
        case WarpOp::any:
            return "__any_sync";
        case WarpOp::all:
            return "__all_sync";
    }
    return "?";
}

// The lane a shuffle reads, following the PTX ISA's shfl.sync: the lane argument is taken
// mod 32, and a source outside this lane's width-segment (above it for up/down/xor, which
// may read a lower segment) means "read my own value".
int source_lane(WarpOp op, int lane, int arg, int width) {
    int b = arg & 31;
    int base = lane & ~(width - 1);
    int top = base + width - 1;
    switch (op) {
        case WarpOp::shfl_idx:
            return base | (b & (width - 1));
        case WarpOp::shfl_up:
            return lane - b >= base ? lane - b : lane;
        case WarpOp::shfl_down:
            return lane + b <= top ? lane + b : lane;
        case WarpOp::shfl_xor:
            return (lane ^ b) <= top ? lane ^ b : lane;
        default:
            return lane;
    }
}

// One lane's slot in its warp's exchange; guarded by the warp's mutex except `done`.
struct Lane {
    bool pending = false;  // published, waiting for the rest of its mask
    WarpOp op = WarpOp::sync;
    unsigned value_bytes = 0;
    unsigned mask = 0;
    int src = 0;
    uint64_t value = 0;
    uint64_t out = 0;     // written by the lane that completes the collective
    unsigned ballot = 0;  // (or __activemask), like `done`
    bool in_activemask = false;
    uint32_t sync_phase = kNoPhase;  // the __syncthreads phase this lane entered last
    std::atomic<uint32_t> done{0};   // bumped (release) when its collective or __activemask completes
};

struct Warp {
    std::mutex mu;
    unsigned present = 0;  // lanes that exist (a last, partial warp has fewer)
    unsigned exited = 0;
    std::atomic<uint32_t> epoch{0};  // bumped and notified when any collective completes
    Lane lanes[32];

    void reset(unsigned lanes_present) {
        present = lanes_present;
        exited = 0;
        for (Lane& l : lanes) {
            l.pending = false;
            l.in_activemask = false;
            l.sync_phase = kNoPhase;
        }
    }
    // Completes the lanes waiting in __activemask if no lane of the warp is running any
    // more (`phase`: the block barrier's current phase). Returns whether it did; the caller
    // then calls wake_all once it has released the mutex.
    bool try_complete_activemask(uint32_t phase) {
        unsigned waiting = 0, stopped = exited;
        for (unsigned j = 0; j < 32; ++j) {
            const Lane& l = lanes[j];
            if (l.in_activemask) waiting |= 1u << j;
            if (l.pending || l.in_activemask || l.sync_phase == phase) stopped |= 1u << j;
        }
        if (waiting == 0 || (stopped & present) != present) return false;
        for (unsigned j = 0; j < 32; ++j) {
            if (!(waiting >> j & 1u)) continue;
            lanes[j].out = waiting;
            lanes[j].in_activemask = false;
            lanes[j].done.fetch_add(1, std::memory_order_release);
        }
        return true;
    }
    // Waits until `me`'s collective or __activemask completes (its `done` moves past
    // `done`); throws Abort if the launch fails first.
    void wait_done(const Lane& me, uint32_t done, const std::atomic<bool>& failed) {
        for (;;) {
            uint32_t e = epoch.load(std::memory_order_acquire);
            if (me.done.load(std::memory_order_acquire) != done) return;
            if (failed.load(std::memory_order_acquire)) throw Abort{};
            epoch.wait(e, std::memory_order_acquire);
        }
    }
    void wake_all() {
        epoch.fetch_add(1, std::memory_order_release);
        epoch.notify_all();
    }
};

// __syncthreads for one block. Arrivals are counted under a mutex; waiters sleep on the
// phase counter, which the last arrival (or a failure) bumps.
class BlockBarrier {
public:
    struct Result {
        uint32_t passed;   // arrivals with a nonzero predicate
        uint32_t arrived;  // threads that took part (the block's threads not yet exited)
    };

    void reset(uint32_t threads) {
        expected_ = threads;
        arrived_ = passed_ = 0;
    }
    uint32_t phase() const { return phase_.load(std::memory_order_acquire); }
    // Throws Abort if the launch failed before or while waiting.
    Result arrive_and_wait(bool predicate, const std::atomic<bool>& failed);
    // A thread that returned from the kernel: later phases no longer wait for it.
    void drop();
    void wake_all() {
        phase_.fetch_add(1, std::memory_order_release);
        phase_.notify_all();
    }

private:
    void complete_locked() {
        result_ = Result{passed_, arrived_};
        arrived_ = passed_ = 0;
        phase_.fetch_add(1, std::memory_order_release);
    }

    std::mutex mu_;
    uint32_t expected_ = 0, arrived_ = 0, passed_ = 0;
    Result result_{};
    std::atomic<uint32_t> phase_{0};
};

BlockBarrier::Result BlockBarrier::arrive_and_wait(bool predicate, const std::atomic<bool>& failed) {
    std::unique_lock lock(mu_);
    uint32_t phase = phase_.load(std::memory_order_acquire);
    if (failed.load(std::memory_order_acquire)) throw Abort{};
    ++arrived_;
    passed_ += predicate;
    if (arrived_ == expected_) {
        complete_locked();
        Result r = result_;
        lock.unlock();
        phase_.notify_all();
        return r;
    }
    lock.unlock();
    wait_while_equal(phase_, phase);
    if (failed.load(std::memory_order_acquire)) throw Abort{};
    // Stable until the next phase completes, which needs this thread to arrive again.
    return result_;
}

void BlockBarrier::drop() {
    std::unique_lock lock(mu_);
    --expected_;
    if (arrived_ != 0 && arrived_ == expected_) {
        complete_locked();
        lock.unlock();
        phase_.notify_all();
    }
}

// The state of one launch. Block-level fields change only at the gate, when every worker
// is inside it.
struct Launch {
    const lf_sim::KernelEntry* entry = nullptr;
    std::vector<unsigned char> params;
    dim3 grid, block;
    uint32_t threads = 0;
    uint64_t blocks = 0;
    size_t smem_bytes = 0;

    uint64_t block_id = 0;
    bool finished = false;
    std::unique_ptr<void, void (*)(void*)> dyn_smem{nullptr, nullptr};
    BlockBarrier barrier;
    std::unique_ptr<Warp[]> warps;
    uint32_t warp_count = 0;

    std::mutex gate_mu;
    uint32_t gate_arrived = 0;
    std::atomic<uint32_t> gate_phase{0};

    std::atomic<bool> failed{false};
    std::mutex error_mu;
    std::string error;

    std::atomic<uint32_t> running{0};  // workers still in this launch

    // Prepares block `block_id`; false (with the error recorded) if it cannot.
    bool start_block();
    // Every worker calls this after its thread of the block is done; the last one moves
    // the launch to its next block. Returns whether there is one.
    bool pass_gate();
    void record_failure(const std::string& what);
};

bool Launch::start_block() {
    barrier.reset(threads);
    for (uint32_t w = 0; w < warp_count; ++w) {
        uint32_t lanes = std::min<uint32_t>(32, threads - 32 * w);
        warps[w].reset(lanes == 32 ? 0xffffffffu : (1u << lanes) - 1);
    }
    dyn_smem.reset();
    try {
        void* p = ::operator new(smem_bytes, std::align_val_t{16});
        std::memset(p, 0xff, smem_bytes);
        dyn_smem = {p, [](void* q) { ::operator delete(q, std::align_val_t{16}); }};
    } catch (const std::bad_alloc&) {
        std::lock_guard lock(error_mu);
        error = format("kernel `%s`: cannot allocate %zu bytes of dynamic shared memory", entry->name,
                       smem_bytes);
        failed.store(true, std::memory_order_release);
        return false;
    }
    return true;
}

bool Launch::pass_gate() {
    std::unique_lock lock(gate_mu);
    uint32_t phase = gate_phase.load(std::memory_order_relaxed);
    if (++gate_arrived == threads) {
        gate_arrived = 0;
        finished = failed.load(std::memory_order_acquire) || ++block_id == blocks || !start_block();
        bool more = !finished;
        gate_phase.fetch_add(1, std::memory_order_release);
        lock.unlock();
        gate_phase.notify_all();
        return more;
    }
    lock.unlock();
    wait_while_equal(gate_phase, phase);
    return !finished;
}

// Called by the failing thread, which holds no lock of the launch.
void Launch::record_failure(const std::string& what) {
    {
        std::lock_guard lock(error_mu);
        if (error.empty()) {
            error = format("kernel `%s`: block (%u,%u,%u) thread (%u,%u,%u): ", entry->name, blockIdx.x,
                           blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z) +
                    what;
        }
    }
    failed.store(true, std::memory_order_release);
    barrier.wake_all();
    for (uint32_t w = 0; w < warp_count; ++w) warps[w].wake_all();
}

// Who this OS thread is in the launch it is running.
struct ThreadCtx {
    Launch* launch;
    Warp* warp;
    unsigned lane;
};
thread_local ThreadCtx* tl_ctx = nullptr;

// The calling thread's context; `what` names the intrinsic for the error if there is none.
ThreadCtx& ctx(const char* what) {
    if (tl_ctx == nullptr) throw std::logic_error(std::string(what) + " outside a simulated kernel launch");
    return *tl_ctx;
}

// Marks the calling thread as entering __syncthreads; an error if a lane of its warp waits
// in a collective that needs it (neither could proceed).
void enter_syncthreads(ThreadCtx& c) {
    Launch& L = *c.launch;
    Warp& w = *c.warp;
    std::string err;
    bool completed = false;
    {
        std::lock_guard lock(w.mu);
        if (L.failed.load(std::memory_order_acquire)) throw Abort{};
        for (unsigned j = 0; j < 32 && err.empty(); ++j) {
            const Lane& o = w.lanes[j];
            if (o.pending && (o.mask >> c.lane & 1u)) {
                err = format(
                    "enters __syncthreads() while lane %u of its warp waits for it in %s "
                    "(mask 0x%08x): deadlock",
                    j, op_name(o.op), o.mask);
            }
        }
        w.lanes[c.lane].sync_phase = L.barrier.phase();
        completed = err.empty() && w.try_complete_activemask(w.lanes[c.lane].sync_phase);
    }
    if (completed) w.wake_all();
    if (!err.empty()) lf_sim::fail(err.c_str());
}

BlockBarrier::Result syncthreads(int predicate) {
    ThreadCtx& c = ctx("__syncthreads()");
    enter_syncthreads(c);
    return c.launch->barrier.arrive_and_wait(predicate != 0, c.launch->failed);
}

// The checks a lane's collective must pass before it joins its warp's exchange; "" if none
// fails. Called with the warp's mutex held.
std::string check_collective(const Launch& L, const Warp& w, unsigned me, WarpOp op, unsigned mask,
                             unsigned value_bytes, int src) {
    const char* name = op_name(op);
    unsigned me_bit = 1u << me;
    if (!(mask & me_bit))
        return format("%s with mask 0x%08x, which does not name the calling lane %u", name, mask, me);
    if (unsigned bad = mask & ~w.present) {
        return format("%s with mask 0x%08x names lanes 0x%08x that do not exist (this warp's lanes: 0x%08x)",
                      name, mask, bad, w.present);
    }
    if (unsigned bad = mask & w.exited) {
        return format("%s with mask 0x%08x names lanes 0x%08x that have exited", name, mask, bad);
    }
    if (!(mask >> src & 1u)) {
        return format("%s reads lane %d, which is not in the mask 0x%08x", name, src, mask);
    }
    uint32_t phase = L.barrier.phase();
    for (unsigned j = 0; j < 32; ++j) {
        if (j == me || !(mask >> j & 1u)) continue;
        const Lane& o = w.lanes[j];
        if (o.sync_phase == phase) {
            return format("%s with mask 0x%08x waits for lane %u, which waits in __syncthreads(): deadlock",
                          name, mask, j);
        }
        if (!o.pending) continue;
        if (o.mask == mask && (o.op != op || o.value_bytes != value_bytes)) {
            return format(
                "%s (%u-byte value) with mask 0x%08x while lane %u is in %s (%u-byte value) with "
                "the same mask",
                name, value_bytes, mask, j, op_name(o.op), o.value_bytes);
        }
        if (o.mask != mask && (o.mask & me_bit)) {
            return format(
                "%s with mask 0x%08x while lane %u waits for this lane in %s with mask 0x%08x: deadlock",
                name, mask, j, op_name(o.op), o.mask);
        }
    }
    return {};
}

// A thread returned from (or unwound out of) the kernel. Never throws: it runs in every case.
void exit_thread(ThreadCtx& c) noexcept {
    Launch& L = *c.launch;
    Warp& w = *c.warp;
    std::string err;
    bool completed;
    {
        std::lock_guard lock(w.mu);
        w.exited |= 1u << c.lane;
        for (unsigned j = 0; j < 32 && err.empty(); ++j) {
            const Lane& o = w.lanes[j];
            if (o.pending && (o.mask >> c.lane & 1u)) {
                err = format(
                    "returns from the kernel while lane %u of its warp waits for it in %s (mask 0x%08x)", j,
                    op_name(o.op), o.mask);
            }
        }
        completed = w.try_complete_activemask(L.barrier.phase());
    }
    if (completed) w.wake_all();
    if (!err.empty() && !L.failed.load(std::memory_order_acquire)) L.record_failure(err);
    L.barrier.drop();
}

// Runs one worker's thread of every block of `L`.
void run_thread(Launch& L, uint32_t tid) {
    ThreadCtx c{&L, &L.warps[tid / 32], tid % 32};
    tl_ctx = &c;
    threadIdx = uint3{tid % L.block.x, tid / L.block.x % L.block.y, tid / (L.block.x * L.block.y)};
    blockDim = L.block;
    gridDim = L.grid;
    do {
        uint64_t b = L.block_id;
        blockIdx = uint3{unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                         unsigned(b / (uint64_t(L.grid.x) * L.grid.y))};
        try {
            L.entry->invoke(L.entry->fn, L.params.data());
        } catch (const Abort&) {
            // the launch failed; the error is recorded
        } catch (const std::exception& e) {
            L.record_failure(std::string("C++ exception: ") + e.what());
        } catch (...) {
            L.record_failure("C++ exception of unknown type");
        }
        exit_thread(c);
    } while (L.pass_gate());
    tl_ctx = nullptr;
}

// The worker threads, kept across launches. Never destroyed: exit (from any thread) must
// not wait for or tear down workers, which sleep between launches and hold no resources.
class Pool {
public:
    // Runs `L` on workers 0..L.threads-1 and returns when all are done. Callers hold the
    // launch mutex.
    void run(Launch& L) {
        grow(L.threads);
        current_ = &L;
        L.running.store(L.threads, std::memory_order_relaxed);
        uint32_t done = finished_.load(std::memory_order_relaxed);
        for (uint32_t i = 0; i < L.threads; ++i) {
            workers_[i].fetch_add(1, std::memory_order_release);
            workers_[i].notify_one();
        }
        wait_while_equal(finished_, done);
    }

private:
    void grow(uint32_t n) {
        for (; spawned_ < n; ++spawned_) std::thread(&Pool::work, this, spawned_).detach();
    }

    void work(uint32_t index) {
        uint32_t seen = 0;
        for (;;) {
            wait_while_equal(workers_[index], seen);
            seen = workers_[index].load(std::memory_order_acquire);
            Launch& L = *current_;
            run_thread(L, index);
            // After this the launch may be gone: only the pool is touched.
            if (L.running.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                finished_.fetch_add(1, std::memory_order_release);
                finished_.notify_all();
            }
        }
    }

    std::array<std::atomic<uint32_t>, kMaxThreadsPerBlock> workers_{};  // per-worker launch count
    uint32_t spawned_ = 0;
    Launch* current_ = nullptr;
    std::atomic<uint32_t> finished_{0};  // launches completed
};

std::mutex g_launch_mutex;

Pool& pool() {
    static Pool* p = new Pool;
    return *p;
}

const lf_sim::KernelEntry* find_kernel(const char* name) {
    for (auto e = lf_sim_kernel_table(); *e != nullptr; ++e) {
        if (std::strcmp((*e)->name, name) == 0) return *e;
    }
    return nullptr;
}

std::string check_geometry(const char* name, LfSimDim grid, LfSimDim block, size_t smem) {
    const uint32_t g[3] = {grid.x, grid.y, grid.z}, b[3] = {block.x, block.y, block.z};
    for (int i = 0; i < 3; ++i) {
        if (g[i] == 0 || b[i] == 0) {
            return format("kernel `%s`: grid (%u,%u,%u) block (%u,%u,%u) has a zero dimension", name, grid.x,
                          grid.y, grid.z, block.x, block.y, block.z);
        }
        if (b[i] > kMaxBlockDim[i]) {
            return format("kernel `%s`: blockDim.%c = %u exceeds %u", name, "xyz"[i], b[i], kMaxBlockDim[i]);
        }
        if (g[i] > kMaxGridDim[i]) {
            return format("kernel `%s`: gridDim.%c = %u exceeds %u", name, "xyz"[i], g[i], kMaxGridDim[i]);
        }
    }
    if (uint64_t(block.x) * block.y * block.z > kMaxThreadsPerBlock) {
        return format("kernel `%s`: block (%u,%u,%u) has more than %u threads", name, block.x, block.y,
                      block.z, kMaxThreadsPerBlock);
    }
    if (smem > kMaxDynamicSmem) {
        return format("kernel `%s`: %zu bytes of dynamic shared memory exceed %zu", name, smem,
                      kMaxDynamicSmem);
    }
    return {};
}

int32_t report(char* err, size_t cap, const std::string& msg) {
    if (err != nullptr && cap > 0) {
        size_t n = std::min(msg.size(), cap - 1);
        std::memcpy(err, msg.data(), n);
        err[n] = '\0';
    }
    return 1;
}

}  // namespace

// ---- Intrinsics declared in lf_sim.h -------------------------------------------------------

void* lf_sim::dynamic_smem() { return ctx("dynamic_smem()").launch->dyn_smem.get(); }

void lf_sim::fail(const char* what) {
    ctx((std::string("lf_sim::fail(\"") + what + "\")").c_str()).launch->record_failure(what);
    throw Abort{};
}

void lf_sim::fail_assert(const char* expr, const char* file, int line, const char* func) {
    fail(format("assertion `%s` failed (%s:%d, in %s)", expr, file, line, func).c_str());
}

void lf_sim::require_aligned(const void* p, size_t align, const char* what) {
    if ((reinterpret_cast<uintptr_t>(p) & (align - 1)) != 0)
        fail(format("misaligned %s: address %p is not %zu-byte aligned", what, p, align).c_str());
}

// First version: the copy happens at the issue (the wait is then trivially satisfied).
// TODO(sim): defer the copy to the covering wait and poison the destination until then.
void lf_sim::cp_async16(void* dst, const void* src, int src_bytes) {
    require_aligned(dst, 16, "cp.async destination");
    require_aligned(src, 16, "cp.async source");
    if (src_bytes < 0 || src_bytes > 16) fail(format("cp.async: src_bytes %d outside 0..16", src_bytes).c_str());
    unsigned char tmp[16] = {};
    std::memcpy(tmp, src, size_t(src_bytes));
    std::memcpy(dst, tmp, 16);
}
void lf_sim::cp_async_commit() {}
void lf_sim::cp_async_wait(int) {}

void __syncthreads() { syncthreads(0); }
int __syncthreads_count(int predicate) { return int(syncthreads(predicate).passed); }
int __syncthreads_and(int predicate) {
    BlockBarrier::Result r = syncthreads(predicate);
    return r.passed == r.arrived;
}
int __syncthreads_or(int predicate) { return syncthreads(predicate).passed != 0; }

unsigned __activemask() {
    ThreadCtx& c = ctx("__activemask()");
    Launch& L = *c.launch;
    Warp& w = *c.warp;
    Lane& me = w.lanes[c.lane];
    std::unique_lock lock(w.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    me.in_activemask = true;
    if (w.try_complete_activemask(L.barrier.phase())) {
        unsigned r = unsigned(me.out);
        lock.unlock();
        w.wake_all();
        return r;
    }
    uint32_t done = me.done.load(std::memory_order_relaxed);
    lock.unlock();
    w.wait_done(me, done, L.failed);
    return unsigned(me.out);
}

lf_sim::detail::WarpResult lf_sim::detail::warp_collective(WarpOp op, unsigned mask, std::uint64_t value,
                                                           unsigned value_bytes, int arg, int width) {
    ThreadCtx& c = ctx(op_name(op));
    Launch& L = *c.launch;
    Warp& w = *c.warp;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
        fail(format("%s with width %d (not a power of two in [1, 32])", op_name(op), width).c_str());
    }
    int src = source_lane(op, int(c.lane), arg, width);
    Lane& me = w.lanes[c.lane];
    std::unique_lock lock(w.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    std::string err = check_collective(L, w, c.lane, op, mask, value_bytes, src);
    if (!err.empty()) {
        lock.unlock();
        fail(err.c_str());
    }
    me.pending = true;
    me.op = op;
    me.value_bytes = value_bytes;
    me.mask = mask;
    me.src = src;
    me.value = value;
    bool complete = true;
    for (unsigned j = 0; j < 32 && complete; ++j) {
        if (mask >> j & 1u) complete = w.lanes[j].pending && w.lanes[j].mask == mask;
    }
    if (complete) {
        // This lane arrived last: hand every lane of the mask its result.
        unsigned ballot = 0;
        for (unsigned j = 0; j < 32; ++j) {
            if ((mask >> j & 1u) && w.lanes[j].value != 0) ballot |= 1u << j;
        }
        for (unsigned j = 0; j < 32; ++j) {
            if (!(mask >> j & 1u)) continue;
            Lane& o = w.lanes[j];
            o.out = w.lanes[o.src].value;
            o.ballot = ballot;
            o.pending = false;
            o.done.fetch_add(1, std::memory_order_release);
        }
        WarpResult r{me.out, me.ballot};
        lock.unlock();
        w.wake_all();
        return r;
    }
    // This lane now waits, which may let lanes in __activemask go on.
    bool activemask_done = w.try_complete_activemask(L.barrier.phase());
    uint32_t done = me.done.load(std::memory_order_relaxed);
    lock.unlock();
    if (activemask_done) w.wake_all();
    w.wait_done(me, done, L.failed);
    return WarpResult{me.out, me.ballot};
}

// ---- The C ABI -------------------------------------------------------------------------------

extern "C" int32_t lf_sim_launch(const char* kernel, LfSimDim grid, LfSimDim block, size_t dynamic_smem_bytes,
                                 const void* params, size_t params_bytes, char* err, size_t err_cap) {
    try {
        if (kernel == nullptr) return report(err, err_cap, "lf_sim_launch: null kernel name");
        const lf_sim::KernelEntry* entry = find_kernel(kernel);
        if (entry == nullptr) return report(err, err_cap, format("unknown kernel `%s`", kernel));
        if (params_bytes != entry->param_bytes || (params == nullptr && params_bytes != 0)) {
            return report(err, err_cap,
                          format("kernel `%s` takes %zu bytes of parameters, got %zu%s", kernel,
                                 entry->param_bytes, params_bytes, params == nullptr ? " (null)" : ""));
        }
        std::string bad = check_geometry(kernel, grid, block, dynamic_smem_bytes);
        if (!bad.empty()) return report(err, err_cap, bad);

        std::lock_guard lock(g_launch_mutex);
        auto L = std::make_unique<Launch>();
        L->entry = entry;
        L->params.assign(static_cast<const unsigned char*>(params),
                         static_cast<const unsigned char*>(params) + params_bytes);
        L->grid = dim3(grid.x, grid.y, grid.z);
        L->block = dim3(block.x, block.y, block.z);
        L->threads = block.x * block.y * block.z;
        L->blocks = uint64_t(grid.x) * grid.y * grid.z;
        L->smem_bytes = dynamic_smem_bytes;
        L->warp_count = (L->threads + 31) / 32;
        L->warps = std::make_unique<Warp[]>(L->warp_count);
        if (!L->start_block()) return report(err, err_cap, L->error);
        pool().run(*L);
        return L->failed.load(std::memory_order_acquire) ? report(err, err_cap, L->error) : 0;
    } catch (const std::exception& e) {
        return report(err, err_cap, std::string("simulator: ") + e.what());
    }
}

extern "C" size_t lf_sim_kernel_count(void) {
    size_t n = 0;
    for (auto e = lf_sim_kernel_table(); *e != nullptr; ++e) ++n;
    return n;
}

extern "C" const char* lf_sim_kernel_name(size_t i) {
    return i < lf_sim_kernel_count() ? lf_sim_kernel_table()[i]->name : nullptr;
}
