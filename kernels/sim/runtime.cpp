// runtime.cpp — the simulator's launcher: runs a kernel of the registry on OS threads, one
// per CUDA thread of a block, and implements the synchronising intrinsics lf_sim.h declares.
//
// Execution model (README.md has the long form):
//   * launches are serialised by one mutex; a persistent pool of worker threads runs them,
//     worker i being the thread with linear id i (x fastest, then y, z) of every block;
//   * the blocks of a grid run one after another, in a seeded random order (a permutation
//     per launch, never the identity when there are two blocks or more); a gate that all
//     workers pass between blocks resets the block's state and poisons its shared memory
//     (static and dynamic: 0xFF bytes);
//   * within a block the warps run ONE AT A TIME (warp-serial scheduling): the running warp's
//     lanes run concurrently (so warp collectives work) until each of them waits in
//     __syncthreads or has exited; then the next warp of the phase's order (a seeded
//     permutation, drawn again after every barrier, in which warp 0 never runs first) runs.
//     A warp that runs past a missing barrier therefore reads or overwrites shared memory
//     before the others, deterministically. The hand-over ("baton") is a raw futex on a
//     relaxed atomic, which ThreadSanitizer does not see as synchronisation, so a missing
//     barrier is still a data race to it;
//   * __syncthreads is a block barrier on which a thread that returned from the kernel
//     counts as arrived (it drops out, as on Volta and later);
//   * a warp is 32 consecutive linear ids; a warp collective waits for every lane of its
//     mask, and is an error (not a deadlock) when a lane of the mask does not exist, has
//     exited, waits in __syncthreads, or waits in a different collective that needs this lane;
//   * __activemask is a convergence point: it waits until no lane of the warp is running
//     (each has exited, waits in __syncthreads or a collective, or is in __activemask too)
//     and returns the lanes in __activemask, so early-returned lanes drop out of the mask
//     however the OS schedules the threads;
//   * cp.async (lf::cp_async16) follows the PTX ISA: a copy's source is read at the issue,
//     its destination holds poison until the cp_async_wait that covers its group.
//
// Failure: the first error of a launch (a check here, __trap, a C++ exception) is recorded,
// `failed` is set, and every waiter of the block is woken (barrier and warp generation
// counters are bumped, every warp is handed the baton); woken waiters, and any thread
// reaching a barrier or collective later, see `failed` and unwind with `Abort`. The
// remaining blocks are not run.
//
// Synchronisation uses std::mutex and std::atomic (waits through atomic::wait), so
// ThreadSanitizer sees every happens-before edge the simulator creates — except the warp
// baton, deliberately (see above): it orders nothing a kernel could rely on.
#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <tuple>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "lf_sim.h"

struct LfSimDim {
    uint32_t x, y, z;
};

extern "C" const lf_sim::KernelEntry* const* lf_sim_kernel_table();

// Static __shared__ arrays live in the section lf_sim_shared (lf_sim.h), except in the
// AddressSanitizer build; the linker defines these two symbols around it. Weak, so that a
// build with no such array links too (both are then null).
extern "C" __attribute__((weak)) unsigned char __start_lf_sim_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_lf_sim_shared[];

namespace {

using lf_sim::detail::WarpOp;

constexpr uint32_t kMaxThreadsPerBlock = 1024;
constexpr uint32_t kMaxBlockDim[3] = {1024, 1024, 64};
constexpr uint32_t kMaxGridDim[3] = {0x7fffffffu, 65535, 65535};
constexpr size_t kMaxDynamicSmem = 227 * 1024;
// Above this a kernel needs an opt-in (lf_sim_set_max_dynamic_smem), as on CUDA
// (cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)).
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr uint32_t kNoPhase = 0xffffffffu;
// A warp's baton value once the launch failed: every waiter wakes and unwinds.
constexpr uint32_t kFailGo = 0xffffffffu;

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

// The warp baton's wait and wake: a raw futex on the atomic's word, invisible to
// ThreadSanitizer (std::atomic::wait's waiter pool would create happens-before edges
// between unrelated waiters and hide the very races the warp-serial schedule exposes).
void baton_wait(std::atomic<uint32_t>& a, uint32_t old) {
#if defined(__linux__)
    static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t));
    // A bounded sleep: the schedule's flags (`Lane::ready`, the running warp) are relaxed
    // atomics beside this word, so a waiter re-checks them now and then in any case.
    struct timespec limit = {0, 20 * 1000 * 1000};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&a), FUTEX_WAIT_PRIVATE, old, &limit, nullptr, 0);
#else
    a.wait(old, std::memory_order_relaxed);
#endif
}
void baton_wake(std::atomic<uint32_t>& a) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&a), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
    a.notify_all();
#endif
}

// splitmix64: the seeded orders of blocks and warps.
uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
struct Rng {
    uint64_t state = 0;
    uint64_t next() { return mix64(state += 0x9E3779B97F4A7C15ull); }
    // Uniform in [0, n), n > 0 (the modulo bias is irrelevant here).
    uint64_t below(uint64_t n) { return next() % n; }
};

// The process's seed: LORAFUSE_SIM_SEED (decimal or 0x-hex) if set, else random.
uint64_t process_seed() {
    static const uint64_t seed = [] {
        if (const char* e = std::getenv("LORAFUSE_SIM_SEED"); e != nullptr && *e != '\0')
            return uint64_t(std::strtoull(e, nullptr, 0));
        std::random_device rd;
        uint64_t t = uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
        return mix64((uint64_t(rd()) << 32 | rd()) ^ t);
    }();
    return seed;
}

// Whether warps run one at a time (the default) or all at once (LORAFUSE_SIM_WARPS=concurrent,
// the old model: faster on many cores, but a missing barrier then shows only by luck).
bool serial_warps() {
    static const bool serial = [] {
        const char* e = std::getenv("LORAFUSE_SIM_WARPS");
        return e == nullptr || std::strcmp(e, "concurrent") != 0;
    }();
    return serial;
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
    bool cond_wait = false;          // waits in an mbarrier, named barrier or warpgroup collective
    std::atomic<uint32_t> done{0};   // bumped (release) when its collective or __activemask completes
    // Runnable (1) or blocked in a wait (0): the block schedule's, written under its mutex.
    std::atomic<uint32_t> ready{1};
};

struct Warp {
    std::mutex mu;
    unsigned present = 0;  // lanes that exist (a last, partial warp has fewer)
    unsigned exited = 0;
    std::atomic<uint32_t> epoch{0};  // bumped and notified when any collective completes
    // The warp baton: the scheduling epoch in which this warp was last handed the block (or
    // kFailGo). Written under the barrier's mutex, read relaxed (see baton_wait).
    std::atomic<uint32_t> go{0};
    Lane lanes[32];

    void reset(unsigned lanes_present) {
        present = lanes_present;
        exited = 0;
        for (Lane& l : lanes) {
            l.pending = false;
            l.in_activemask = false;
            l.sync_phase = kNoPhase;
            l.cond_wait = false;
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
            if (l.pending || l.in_activemask || l.cond_wait || l.sync_phase == phase) stopped |= 1u << j;
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

// __syncthreads, the warp-serial schedule and every other way a thread can stop and wait for
// other warps (mbarrier waits, named barriers, warpgroup collectives) for one block. All of it
// is kept under one mutex (`mu`). Every lane is either runnable (`ready`) or blocked in a wait;
// exactly one warp holds the baton (`running_`), and a runnable lane runs only while its warp
// holds it. The running warp keeps the baton until none of its live lanes is runnable; then it
// passes to the next warp of the current order (cyclically) that has a runnable lane. A wait
// that completes makes its lanes runnable again (they run when their warp next gets the baton).
// When no warp has a runnable lane and the block barrier cannot complete, the block is
// deadlocked: a launch error naming what each warp waits in, never a hang. When the block
// barrier completes, a new order is drawn (warp 0 never first) and its first warp runs.
class BlockBarrier {
public:
    struct Result {
        uint32_t passed;   // arrivals with a nonzero predicate
        uint32_t arrived;  // threads that took part (the block's threads not yet exited)
    };

    // A new block of `threads` threads over `warp_count` warps; its first warp gets the baton.
    // Called when no thread runs.
    void reset(uint32_t threads, Warp* warps, uint32_t warp_count, Rng* rng) {
        expected_ = threads;
        arrived_ = passed_ = 0;
        warps_ = warps;
        rng_ = rng;
        failed_ = false;
        live_.assign(warp_count, 0);
        blocked_.assign(warp_count, 0);
        what_.assign(size_t(warp_count) * 32, nullptr);
        for (uint32_t w = 0; w < warp_count; ++w) {
            live_[w] = std::min<uint32_t>(32, threads - 32 * w);
            for (Lane& l : warps_[w].lanes) l.ready.store(1, std::memory_order_relaxed);
        }
        running_.store(-1, std::memory_order_relaxed);
        new_order_locked();
    }
    uint32_t phase() const { return phase_.load(std::memory_order_acquire); }
    // Arrives at __syncthreads and waits for the phase to complete and the baton. Throws Abort
    // if the launch failed; returns a deadlock message (without waiting) if nothing could run.
    Result arrive_and_wait(uint32_t warp, unsigned lane, bool predicate, const std::atomic<bool>& failed,
                           std::string* deadlock);
    // A thread of `warp` returned from the kernel: later phases no longer wait for it. Returns
    // a deadlock message if the threads left can no longer run, else "".
    std::string drop(uint32_t warp);
    // Waits until `lane` of `warp` is runnable and (warp-serial) its warp holds the baton;
    // throws Abort on failure.
    void wait_turn(uint32_t warp, unsigned lane, const std::atomic<bool>& failed) {
        std::atomic<uint32_t>& go = warps_[warp].go;
        const std::atomic<uint32_t>& ready = warps_[warp].lanes[lane].ready;
        for (;;) {
            uint32_t g = go.load(std::memory_order_relaxed);
            if (g == kFailGo || failed.load(std::memory_order_relaxed)) throw Abort{};
            if (ready.load(std::memory_order_relaxed) != 0 &&
                (!serial_warps() || running_.load(std::memory_order_relaxed) == int32_t(warp)))
                return;
            baton_wait(go, g);
        }
    }
    // The launch failed: every warp gets the baton (its waiters wake and unwind).
    void fail_all() {
        std::lock_guard lock(mu);
        failed_ = true;
        for (size_t w = 0; w < live_.size(); ++w) {
            warps_[w].go.store(kFailGo, std::memory_order_relaxed);
            baton_wake(warps_[w].go);
        }
    }
    void wake_all() {
        phase_.fetch_add(1, std::memory_order_release);
        phase_.notify_all();
    }

    // ---- For the waits built on the schedule (under `mu`) ----
    // `lane` of `warp` stops, waiting in `what` (a string literal, for deadlock messages).
    void block_locked(uint32_t warp, unsigned lane, const char* what) {
        warps_[warp].lanes[lane].ready.store(0, std::memory_order_relaxed);
        what_[size_t(warp) * 32 + lane] = what;
        ++blocked_[warp];
    }
    // The wait of `lane` of `warp` completed: it runs again when its warp holds the baton.
    void unblock_locked(uint32_t warp, unsigned lane) {
        Lane& l = warps_[warp].lanes[lane];
        if (l.ready.load(std::memory_order_relaxed) != 0) return;
        l.ready.store(1, std::memory_order_relaxed);
        what_[size_t(warp) * 32 + lane] = nullptr;
        --blocked_[warp];
        if (!serial_warps() || running_.load(std::memory_order_relaxed) == int32_t(warp)) wake_locked(warp);
    }
    // Hands the baton on if the running warp has no runnable lane left; "" or, when no warp
    // can run and the block barrier cannot complete, the deadlock's description.
    std::string advance_locked() {
        const uint32_t n = uint32_t(order_.size());
        if (!serial_warps()) {
            for (uint32_t w = 0; w < n; ++w)
                if (live_[w] > blocked_[w]) return {};
        } else {
            int32_t r = running_.load(std::memory_order_relaxed);
            if (r >= 0 && live_[uint32_t(r)] > blocked_[uint32_t(r)]) return {};
            for (uint32_t i = 1; i <= n; ++i) {
                uint32_t q = (pos_ + i) % n, w = order_[q];
                if (live_[w] > blocked_[w]) {
                    pos_ = q;
                    give_locked(w);
                    return {};
                }
            }
            running_.store(-1, std::memory_order_relaxed);
        }
        if (expected_ == 0 || arrived_ == expected_) return {};
        return deadlock_locked();
    }

    std::mutex mu;

private:
    std::string deadlock_locked() const {
        std::string s = "deadlock: no thread of the block can run (";
        bool first = true;
        for (uint32_t w = 0; w < live_.size(); ++w) {
            if (live_[w] == 0) continue;
            std::map<std::string, unsigned> counts;
            for (unsigned j = 0; j < 32; ++j) {
                const char* what = what_[size_t(w) * 32 + j];
                if (what != nullptr) ++counts[what];
            }
            for (const auto& [what, k] : counts) {
                s += format("%swarp %u: %u lane%s in %s", first ? "" : "; ", w, k, k == 1 ? "" : "s",
                            what.c_str());
                first = false;
            }
        }
        return s + ")";
    }
    void complete_locked() {
        result_ = Result{passed_, arrived_};
        arrived_ = passed_ = 0;
        phase_.fetch_add(1, std::memory_order_release);
        // Every live lane waited in this barrier: all run again, in a new order.
        for (uint32_t w = 0; w < live_.size(); ++w) {
            blocked_[w] = 0;
            for (unsigned j = 0; j < 32; ++j) {
                warps_[w].lanes[j].ready.store(1, std::memory_order_relaxed);
                what_[size_t(w) * 32 + j] = nullptr;
            }
            if (!serial_warps()) wake_locked(w);
        }
        new_order_locked();
    }
    // A fresh order of the warps, in which warp 0 does not run first when another warp has
    // live lanes (so "warp 0 writes, the others read" and "warp 0 reads, the others overwrite"
    // without a barrier both go wrong every time); the first warp with live lanes gets the baton.
    void new_order_locked() {
        const uint32_t n = uint32_t(live_.size());
        order_.resize(n);
        for (uint32_t i = 0; i < n; ++i) order_[i] = i;
        for (uint32_t i = n; i > 1; --i) std::swap(order_[i - 1], order_[rng_->below(i)]);
        pos_ = 0;
        while (pos_ < n && live_[order_[pos_]] == 0) ++pos_;
        if (pos_ < n && order_[pos_] == 0) {
            for (uint32_t q = pos_ + 1; q < n; ++q) {
                if (live_[order_[q]] != 0) {
                    std::swap(order_[pos_], order_[q]);
                    break;
                }
            }
        }
        if (pos_ < n) {
            give_locked(order_[pos_]);
        } else {
            pos_ = 0;
            running_.store(-1, std::memory_order_relaxed);
        }
    }
    void give_locked(uint32_t w) {
        running_.store(int32_t(w), std::memory_order_relaxed);
        wake_locked(w);
    }
    void wake_locked(uint32_t w) {
        if (failed_) return;
        warps_[w].go.fetch_add(1, std::memory_order_relaxed);
        if (warps_[w].go.load(std::memory_order_relaxed) == kFailGo) warps_[w].go.store(0, std::memory_order_relaxed);
        baton_wake(warps_[w].go);
    }

    uint32_t expected_ = 0, arrived_ = 0, passed_ = 0;
    Result result_{};
    std::atomic<uint32_t> phase_{0};
    // The schedule (under mu).
    Warp* warps_ = nullptr;
    Rng* rng_ = nullptr;
    bool failed_ = false;
    std::vector<uint32_t> live_;        // per warp: lanes not exited
    std::vector<uint32_t> blocked_;     // per warp: live lanes waiting (not runnable)
    std::vector<const char*> what_;     // per thread: what it waits in, or null
    std::vector<uint32_t> order_;       // this phase's order of the warps
    uint32_t pos_ = 0;                  // the running warp's position in order_
    std::atomic<int32_t> running_{-1};  // the warp holding the baton, -1 for none
};

BlockBarrier::Result BlockBarrier::arrive_and_wait(uint32_t warp, unsigned lane, bool predicate,
                                                   const std::atomic<bool>& failed, std::string* deadlock) {
    std::unique_lock lock(mu);
    uint32_t phase = phase_.load(std::memory_order_acquire);
    if (failed.load(std::memory_order_acquire)) throw Abort{};
    ++arrived_;
    passed_ += predicate;
    block_locked(warp, lane, "__syncthreads()");
    bool completed = arrived_ == expected_;
    if (completed) {
        complete_locked();
    } else {
        *deadlock = advance_locked();
    }
    lock.unlock();
    if (completed) phase_.notify_all();
    if (!deadlock->empty()) return {};
    if (serial_warps()) {
        wait_turn(warp, lane, failed);
        // The baton orders nothing (for ThreadSanitizer); the barrier's phase does.
        while (phase_.load(std::memory_order_acquire) == phase) {
            if (failed.load(std::memory_order_acquire)) throw Abort{};
            std::this_thread::yield();
        }
    } else {
        wait_while_equal(phase_, phase);
    }
    if (failed.load(std::memory_order_acquire)) throw Abort{};
    // Stable until the next phase completes, which needs this thread to arrive again.
    return result_;
}

std::string BlockBarrier::drop(uint32_t warp) {
    std::unique_lock lock(mu);
    --expected_;
    --live_[warp];
    if (arrived_ != 0 && arrived_ == expected_) {
        complete_locked();
        lock.unlock();
        phase_.notify_all();
        return {};
    }
    return advance_locked();
}

// Hopper's asynchronous machinery for one block (README: "Hopper"), under the block
// schedule's mutex (BlockBarrier::mu); reset at every block's start.
struct TmaChunk {  // 16 bytes a TMA copy lands when its mbarrier phase completes
    uint32_t off;  // shared-window address (swizzled)
    unsigned char bytes[16];
};
struct Mbarrier {
    uint32_t count = 0;    // arrivals per phase
    uint32_t pending = 0;  // arrivals still missing in the current phase
    int64_t tx = 0;        // the transaction count: expected minus completed bytes
    uint32_t phase = 0;    // phases completed
    uint32_t init_tid = 0, init_phase = 0;  // who initialised it, in which __syncthreads phase
    std::vector<TmaChunk> landing;                          // copies signalling this phase
    std::vector<std::pair<uint32_t, unsigned>> waiters;     // (warp, lane) in try_wait
    bool deferred = false;  // complete, with copies, but nobody has observed it yet (below)
};
struct NamedBarrier {
    uint32_t expected = 0, arrived = 0;
    std::vector<std::pair<uint32_t, unsigned>> waiters;
};
enum class WgOp : int { none, wgmma, wgmma_rs, setmaxnreg };
const char* wg_op_name(WgOp op) {
    return op == WgOp::wgmma      ? "wgmma.mma_async"
           : op == WgOp::wgmma_rs ? "wgmma.mma_async (A in registers)"
                                  : "setmaxnreg";
}
// What every thread of a warpgroup must pass identically to a warpgroup collective: wgmma's
// descriptors (a is 0 in the register form), N, type (0 bf16, 1 f16), scale-d, imm-trans-a/b;
// setmaxnreg's count (n) and direction (flag).
struct WgOperands {
    uint64_t a = 0, b = 0;
    int n = 0, type = 0, flag = 0;
    bool trans_a = false, trans_b = false;
    bool operator==(const WgOperands&) const = default;
};
std::string describe(WgOp op, const WgOperands& o) {
    if (op == WgOp::setmaxnreg) return format("%s %d", o.flag ? "inc" : "dec", o.n);
    std::string s = op == WgOp::wgmma ? format("desc-a 0x%016llx, ", (unsigned long long)o.a) : std::string();
    s += format("desc-b 0x%016llx, m64n%dk16, %s, scale-d %d, ", (unsigned long long)o.b, o.n,
                o.type == 0 ? "bf16" : "f16", o.flag);
    if (op == WgOp::wgmma) s += format("imm-trans-a %d, ", int(o.trans_a));
    return s + format("imm-trans-b %d", int(o.trans_b));
}
struct WarpgroupSlot {  // the warpgroup collective its threads are in
    uint32_t arrived = 0, exited = 0;
    WgOp op = WgOp::none;
    WgOperands operands;
    // Completed collectives, and the registers each thread (by its index in the warpgroup)
    // deposited in the register form of wgmma, by the parity of the collective's number: a thread
    // reads its quad's registers after the collective completes, and the same half is written
    // again only in the collective after next, which no thread enters before every thread has
    // arrived at the next one, i.e. has left this one (and read what it needed).
    uint64_t generation = 0;
    uint32_t regs[2][128][4] = {};
    std::vector<std::pair<uint32_t, unsigned>> waiters;
};
struct HopperBlock {
    std::map<uintptr_t, Mbarrier> mbarriers;
    NamedBarrier named[16];
    std::vector<WarpgroupSlot> warpgroups;
    // The async proxy's view of dynamic shared memory: what a fence.proxy.async last made
    // visible to it, plus what TMA copies wrote. Empty until the block first uses the proxy;
    // the block starts with it equal to the poison, as shared memory itself.
    std::vector<unsigned char> view;

    void reset(uint32_t warp_count) {
        mbarriers.clear();
        for (NamedBarrier& b : named) b = NamedBarrier{};
        warpgroups.assign((warp_count + 3) / 4, WarpgroupSlot{});
        view.clear();
    }
};

// The state of one launch. Block-level fields change only at the gate, when every worker
// is inside it.
struct Launch {
    const lf_sim::KernelEntry* entry = nullptr;
    std::vector<unsigned char> params;
    dim3 grid, block;
    uint32_t threads = 0;
    uint64_t blocks = 0;
    size_t smem_bytes = 0;

    uint64_t block_id = 0;  // the position in the run order, not the block's index
    uint64_t block_index = 0;  // the linear index of the block at block_id
    bool finished = false;
    std::unique_ptr<void, void (*)(void*)> dyn_smem{nullptr, nullptr};
    BlockBarrier barrier;
    HopperBlock hopper;  // under barrier.mu
    std::unique_ptr<Warp[]> warps;
    uint32_t warp_count = 0;

    // The seeded orders: one Rng per launch; the block order as a table (grids up to
    // kMaxPermTable blocks) or an affine map i -> (a·i + c) mod blocks with gcd(a, blocks) = 1.
    Rng rng;
    std::vector<uint32_t> block_perm;
    uint64_t perm_a = 1, perm_c = 0;

    // Draws the block order: a permutation, never the identity for two blocks or more.
    void draw_block_order();
    uint64_t block_at(uint64_t i) const {
        if (!block_perm.empty()) return block_perm[i];
        return uint64_t((unsigned __int128)i * perm_a % blocks + perm_c) % blocks;
    }

    std::mutex gate_mu;
    uint32_t gate_arrived = 0;
    std::atomic<uint32_t> gate_phase{0};

    std::atomic<bool> failed{false};
    std::mutex error_mu;
    std::string error;

    std::atomic<uint32_t> running{0};  // workers still in this launch

    // Mutation testing (lf_sim.h): the one site this launch deletes (kind -1: none), and
    // whether it records the sites its threads reach.
    int mutant_kind = -1;
    std::string mutant_file;
    unsigned mutant_line = 0;
    bool record_sites = false;
    std::mutex sites_mu;
    std::set<std::tuple<int, std::string, unsigned>> sites;

    // Prepares block `block_id`; false (with the error recorded) if it cannot.
    bool start_block();
    // Every worker calls this after its thread of the block is done; the last one moves
    // the launch to its next block. Returns whether there is one.
    bool pass_gate();
    void record_failure(const std::string& what);
};

constexpr uint64_t kMaxPermTable = uint64_t(1) << 22;

void Launch::draw_block_order() {
    if (blocks <= kMaxPermTable) {
        block_perm.resize(blocks);
        for (uint32_t i = 0; i < blocks; ++i) block_perm[i] = i;
        for (uint64_t i = blocks; i > 1; --i) std::swap(block_perm[i - 1], block_perm[rng.below(i)]);
        bool identity = true;
        for (uint32_t i = 0; i < blocks && identity; ++i) identity = block_perm[i] == i;
        if (identity && blocks > 1) std::swap(block_perm[0], block_perm[1]);
        return;
    }
    perm_c = rng.below(blocks);
    do {
        perm_a = 1 + rng.below(blocks - 1);
    } while (std::gcd(perm_a, blocks) != 1 || (perm_a == 1 && perm_c == 0));
}

bool Launch::start_block() {
    block_index = block_at(block_id);
    for (uint32_t w = 0; w < warp_count; ++w) {
        uint32_t lanes = std::min<uint32_t>(32, threads - 32 * w);
        warps[w].reset(lanes == 32 ? 0xffffffffu : (1u << lanes) - 1);
    }
    barrier.reset(threads, warps.get(), warp_count, &rng);
    hopper.reset(warp_count);
    // CUDA leaves shared memory uninitialised: poison every static __shared__ array.
    unsigned char *s0 = __start_lf_sim_shared, *s1 = __stop_lf_sim_shared;
    if (s0 != nullptr && s1 > s0) std::memset(s0, 0xff, size_t(s1 - s0));
    dyn_smem.reset();
    try {
        // 1024-byte aligned (the shared window's address 0, so the 128-byte swizzle pattern
        // of TMA and wgmma lines up with the buffer as on a GPU).
        void* p = ::operator new(smem_bytes, std::align_val_t{1024});
        std::memset(p, 0xff, smem_bytes);
        dyn_smem = {p, [](void* q) { ::operator delete(q, std::align_val_t{1024}); }};
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
        for (const auto& [addr, m] : hopper.mbarriers) {
            if (m.landing.empty() || failed.load(std::memory_order_acquire)) continue;
            std::lock_guard elock(error_mu);
            error = format("kernel `%s`: block (%u,%u,%u): ends with a TMA copy in flight (%zu bytes into shared "
                           "memory whose mbarrier at %p never completed its phase %u)",
                           entry->name, blockIdx.x, blockIdx.y, blockIdx.z, 16 * m.landing.size(),
                           reinterpret_cast<void*>(addr), m.phase);
            failed.store(true, std::memory_order_release);
            break;
        }
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
    barrier.fail_all();
    barrier.wake_all();
    for (uint32_t w = 0; w < warp_count; ++w) warps[w].wake_all();
}

// Who this OS thread is in the launch it is running.
struct ThreadCtx {
    Launch* launch;
    Warp* warp;
    unsigned lane;
    uint32_t warp_index;
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
    std::string deadlock;
    BlockBarrier::Result r =
        c.launch->barrier.arrive_and_wait(c.warp_index, c.lane, predicate != 0, c.launch->failed, &deadlock);
    if (!deadlock.empty()) lf_sim::fail(deadlock.c_str());
    return r;
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
        if (o.cond_wait) {
            return format("%s with mask 0x%08x waits for lane %u, which waits in an mbarrier, named barrier or "
                          "warpgroup collective: deadlock (lanes of a warp wait for other warps together here)",
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

// One simulated thread's cp.async copies (PTX: cp.async, cp.async.commit_group,
// cp.async.wait_group). A copy reads its source at the issue (the 16 bytes it will write:
// src_bytes of the source, zeros after) and fills its destination with poison; the bytes
// land at the cp_async_wait that covers its group. Copies not yet committed belong to no
// group, so no wait covers them (as in PTX). Copies still pending when the thread exits
// are dropped (see finish).
struct CpAsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
};
struct CpAsyncState {
    std::vector<CpAsyncCopy> open;                   // issued since the last commit
    std::deque<std::vector<CpAsyncCopy>> committed;  // oldest group first

    static void land(std::vector<CpAsyncCopy>& group) {
        for (const CpAsyncCopy& c : group) std::memcpy(c.dst, c.bytes, 16);
        group.clear();
    }
    // cp.async.wait_group n: every committed group but the newest n has landed.
    void wait(size_t n) {
        while (committed.size() > n) {
            land(committed.front());
            committed.pop_front();
        }
    }
    // Copies issued and not yet landed (committed or not).
    size_t pending() const {
        size_t n = open.size();
        for (const auto& g : committed) n += g.size();
        return n;
    }
    // At the thread's exit: whatever is still pending is dropped, never landing (exit_thread
    // fails the launch if any is): landing the copies then would let a lane that reads a
    // neighbour's destination before the wait see the data whenever that neighbour happens
    // to exit first.
    void finish() {
        open.clear();
        committed.clear();
    }
};
thread_local CpAsyncState tl_cp_async;

// ---- Hopper: waits on the block schedule, wgmma state, shared window ----------------------

// Fails the launch with `msg` after releasing `lock` (fail wakes every waiter, which needs
// the schedule's mutex).
[[noreturn]] void fail_unlocked(std::unique_lock<std::mutex>& lock, const std::string& msg) {
    if (lock.owns_lock()) lock.unlock();
    lf_sim::fail(msg.c_str());
}

// The calling lane waits in `what` until another thread unblocks it (it registered itself as
// a waiter of the object first). `lock` holds the schedule's mutex on entry and on return; on
// return this lane's warp holds the baton again. A lane of the warp waiting in a warp
// collective that needs this lane is a deadlock (this lane may wait for another warp, and
// the warp runs as a whole): a launch error.
void block_here(ThreadCtx& c, std::unique_lock<std::mutex>& lock, const char* what) {
    Launch& L = *c.launch;
    Warp& w = *c.warp;
    std::string err;
    bool completed = false;
    {
        std::lock_guard wl(w.mu);
        for (unsigned j = 0; j < 32 && err.empty(); ++j) {
            const Lane& o = w.lanes[j];
            if (o.pending && (o.mask >> c.lane & 1u)) {
                err = format("waits in %s while lane %u of its warp waits for it in %s (mask 0x%08x): deadlock",
                             what, j, op_name(o.op), o.mask);
            }
        }
        w.lanes[c.lane].cond_wait = true;
        completed = err.empty() && w.try_complete_activemask(L.barrier.phase());
    }
    if (completed) w.wake_all();
    if (!err.empty()) fail_unlocked(lock, err);
    L.barrier.block_locked(c.warp_index, c.lane, what);
    std::string dead = L.barrier.advance_locked();
    lock.unlock();
    if (!dead.empty()) lf_sim::fail(dead.c_str());
    L.barrier.wait_turn(c.warp_index, c.lane, L.failed);
    {
        std::lock_guard wl(w.mu);
        w.lanes[c.lane].cond_wait = false;
    }
    // Taking the mutex again orders this lane after the thread that released it.
    lock.lock();
    if (L.failed.load(std::memory_order_acquire)) {
        lock.unlock();
        throw Abort{};
    }
}

// Unblocks the lanes waiting in one object (the schedule's mutex held). Each stops counting as
// "in a condition wait" now, not when it next runs: the lanes of its warp that resume first may
// reach a warp collective that needs it before it has run again (a wgmma collective completing
// for the whole warpgroup, then a __syncwarp), which is no deadlock. (Mutex order: the
// schedule's, then the warp's, as in block_here.)
void unblock_all(Launch& L, std::vector<std::pair<uint32_t, unsigned>>& waiters) {
    for (const auto& [w, lane] : waiters) {
        L.barrier.unblock_locked(w, lane);
        std::lock_guard wl(L.warps[w].mu);
        L.warps[w].lanes[lane].cond_wait = false;
    }
    waiters.clear();
}

// The async proxy's view of dynamic shared memory, created (as the poison) at first use.
std::vector<unsigned char>& async_view(Launch& L) {
    if (L.hopper.view.size() != L.smem_bytes) L.hopper.view.assign(L.smem_bytes, 0xff);
    return L.hopper.view;
}

unsigned char* window_ptr(Launch& L, uint32_t off) { return static_cast<unsigned char*>(L.dyn_smem.get()) + off; }

// A warpgroup collective: the 128 threads of warps 4g..4g+3 must all call it with the same
// operation and operands. Returns once all have. `deposit` (4 registers, or null): this thread's
// A fragment for the register form of wgmma; then `quad` receives the 16 registers of the 4
// threads of the caller's quad (lanes 4·(lane / 4) .. +3 of its warp), in lane order.
void warpgroup_collective(ThreadCtx& c, WgOp op, const char* name, const WgOperands& operands,
                          const uint32_t* deposit = nullptr, uint32_t* quad = nullptr) {
    Launch& L = *c.launch;
    const uint32_t g = c.warp_index / 4, me = 32 * (c.warp_index % 4) + c.lane;
    std::unique_lock lock(L.barrier.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    if (L.threads < 128 * (g + 1)) {
        fail_unlocked(lock, format("%s: warpgroup %u (warps %u..%u) has only %u of its 128 threads in this block "
                                   "(a warpgroup is 4 whole warps starting at a warp index divisible by 4)",
                                   name, g, 4 * g, 4 * g + 3, L.threads - std::min(L.threads, 128 * g)));
    }
    WarpgroupSlot& s = L.hopper.warpgroups[g];
    if (s.exited != 0) {
        fail_unlocked(lock, format("%s: %u thread%s of warpgroup %u ha%s exited; a warpgroup collective needs "
                                   "all 128",
                                   name, s.exited, s.exited == 1 ? "" : "s", g, s.exited == 1 ? "s" : "ve"));
    }
    if (s.arrived == 0) {
        s.op = op;
        s.operands = operands;
    } else if (s.op != op || !(s.operands == operands)) {
        fail_unlocked(lock, format("%s is not warpgroup-uniform: this thread's operands (%s) differ from those of "
                                   "the %u thread%s of warpgroup %u already in %s (%s)",
                                   name, describe(op, operands).c_str(), s.arrived, s.arrived == 1 ? "" : "s", g,
                                   wg_op_name(s.op), describe(s.op, s.operands).c_str()));
    }
    const uint64_t half = s.generation & 1u;
    if (deposit != nullptr) std::memcpy(s.regs[half][me], deposit, sizeof s.regs[half][me]);
    if (++s.arrived == 128) {
        s.arrived = 0;
        s.op = WgOp::none;
        ++s.generation;
        unblock_all(L, s.waiters);
    } else {
        s.waiters.emplace_back(c.warp_index, c.lane);
        block_here(c, lock, name);  // returns with the mutex held again
    }
    if (quad != nullptr) std::memcpy(quad, s.regs[half][me & ~3u], 4 * sizeof s.regs[half][me]);
}

// One thread's wgmma.mma_async operations (PTX: wgmma.fence, commit_group, wait_group). An
// operation's accumulators read NaN from its issue until the wait that covers its group; its
// product is formed at that wait (the latest time the hardware may read shared memory), from
// the async proxy's view of shared memory.
struct WgmmaOp {
    float* d = nullptr;
    int n = 0, type = 0;
    uint64_t a = 0, b = 0;  // the descriptors (a unused in the register form)
    bool scale_d = false, trans_a = false, trans_b = false;
    bool chained = false;
    std::vector<float> c;  // the accumulators at the issue (unless chained on a pending op)
    std::vector<uint16_t> issued;  // the shared-memory operand bits at the issue (wgmma_operand_bits)
    // The register form (wgmma_rs): the thread's own A registers, kept to check at the landing
    // that they still hold their values at the issue, and the 32 A elements its accumulators
    // need (rows g and g + 8, k 0..15), taken at the issue from its quad's registers.
    const uint32_t* a_regs = nullptr;
    uint32_t a_issued[4] = {};
    std::vector<uint16_t> a_bits;
};
struct WgmmaState {
    std::vector<WgmmaOp> open;
    std::deque<std::vector<WgmmaOp>> committed;
    // The value of a chain of operations on the same accumulators that has landed in part:
    // its registers stay poisoned (a later operation of the chain is in flight), so the next
    // operation to land builds on this, not on the registers.
    std::vector<std::pair<float*, std::vector<float>>> chains;
    bool fenced = false;  // a wgmma.fence since the registers were last written by a wait
    size_t pending() const {
        size_t k = open.size();
        for (const auto& g : committed) k += g.size();
        return k;
    }
    const WgmmaOp* pending_on(const float* d) const {
        for (const WgmmaOp& o : open)
            if (o.d == d) return &o;
        for (const auto& g : committed)
            for (const WgmmaOp& o : g)
                if (o.d == d) return &o;
        return nullptr;
    }
};
thread_local WgmmaState tl_wgmma;

// A decoded shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format" of the
// wgmma section): bits 0-13 the start address >> 4 (of an 18-bit shared address), 16-29 the
// leading dimension byte offset >> 4, 32-45 the stride dimension byte offset >> 4, 49-51 the
// matrix base offset, 62-63 the swizzle mode (0 none, 1 128 B, 2 64 B, 3 32 B) — the fields
// of CUTLASS's GmmaDescriptor (cute/arch/mma_sm90_desc.hpp) too.
struct SmemDesc {
    uint32_t start, lbo, sbo, base_offset, mode;
};
SmemDesc decode_desc(uint64_t d) {
    return SmemDesc{uint32_t(d & 0x3fff) << 4, uint32_t((d >> 16) & 0x3fff) << 4, uint32_t((d >> 32) & 0x3fff) << 4,
                    uint32_t((d >> 49) & 7), uint32_t(d >> 62)};
}
// The swizzle of a shared address: bits 4.. (the 16-byte chunk in its 128-byte row) XORed
// with bits 7..: 3 bits for 128 B (CUTLASS Swizzle<3,4,3>), 2 for 64 B, 1 for 32 B; mode
// numbering as in the descriptor.
uint32_t swizzle_addr(uint32_t addr, uint32_t mode) {
    const uint32_t bits = mode == 1 ? 7u : mode == 2 ? 3u : mode == 3 ? 1u : 0u;
    return addr ^ (((addr >> 7) & bits) << 4);
}
uint32_t swizzle_bytes_of(uint32_t mode) { return mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0; }
// The shared address of element (r, k), k < 16, of an operand (r: the row of A, or the column
// of B, i.e. the row of Bᵀ): the canonical layouts of the PTX ISA ("Shared Memory Matrix
// Layout" of wgmma, in CuTe notation with T = 8 16-bit elements), offsets in bytes.
// K-major (imm-trans = 0): no swizzle, ((8,m),(T,2k)):((1T,SBO),(1,LBO)) — 8×16-byte core
// matrices, core matrix (r / 8, k / 8) at (r / 8)·SBO + (k / 8)·LBO, its rows 16 bytes apart;
// swizzled with span W, ((8,m),(T,2k)):((W/16·T,SBO),(1,T)) — rows W bytes apart, 8-row groups
// SBO apart, the 16 k-values contiguous (LBO unused).
// MN-major (imm-trans = 1): no swizzle, ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) — core matrices of
// 8 k-rows × 8 consecutive r (16 bytes), core matrix (r / 8, k / 8) at (r / 8)·SBO + (k / 8)·LBO;
// swizzled with span W, ((T,W/16,m),(8,k)):((1,T,LBO),(W/16·T,SBO)) — atoms of 8 k-rows W bytes
// apart, each holding W/2 consecutive r; atom (r / (W/2), k / 8) at (r / (W/2))·LBO + (k / 8)·SBO.
// Swizzled, the whole address (start + offset) is then swizzled.
uint32_t desc_element(const SmemDesc& d, bool mn_major, uint32_t r, uint32_t k) {
    const uint32_t w = swizzle_bytes_of(d.mode);
    if (!mn_major) {
        if (d.mode == 0) return d.start + (r / 8) * d.sbo + (k / 8) * d.lbo + (r % 8) * 16 + (k % 8) * 2;
        return swizzle_addr(d.start + (r / 8) * d.sbo + (r % 8) * w + k * 2, d.mode);
    }
    if (d.mode == 0) return d.start + (r / 8) * d.sbo + (k / 8) * d.lbo + (k % 8) * 16 + (r % 8) * 2;
    const uint32_t per = w / 2;  // elements of r in one W-byte row of the atom
    return swizzle_addr(d.start + (r / per) * d.lbo + (k / 8) * d.sbo + (k % 8) * w + (r % per) * 2, d.mode);
}

// Reads the 16-bit element at shared address `off` for the async proxy; "" or an error.
std::string async_read16(Launch& L, uint32_t off, const char* operand, uint16_t* out) {
    if (size_t(off) + 2 > L.smem_bytes) {
        return format("wgmma operand %s reads shared address 0x%x, outside the %zu bytes of dynamic shared memory",
                      operand, off, L.smem_bytes);
    }
    const std::vector<unsigned char>& v = async_view(L);
    const unsigned char* real = window_ptr(L, off);
    if (std::memcmp(real, &v[off], 2) != 0) {
        return format("wgmma operand %s reads shared address 0x%x, written by ordinary stores (the generic proxy) "
                      "since the last fence.proxy.async: call lf::fence_proxy_async() between the stores and the "
                      "wgmma (and a barrier if other threads stored)",
                      operand, off);
    }
    std::memcpy(out, &v[off], 2);
    return {};
}

float half_bits_to_f32(uint16_t h, int type) {
    return type == 0 ? lf_sim::detail::bf16_to_f32(h) : lf_sim::detail::f16_to_f32(h);
}

// The 16-bit shared-memory operand elements one thread's part of an m64nNk16 reads, in a fixed
// order: A's rows 16·(warp % 4) + lane / 4 (+ 8), k 0..15 (not in the register form), then B's
// columns with col % 8 / 2 = lane % 4, k 0..15; from the async proxy's view, checked against the
// generic one when `fence_check` (schedule mutex held). "" or the error.
std::string wgmma_operand_bits(Launch& L, const ThreadCtx& c, const WgmmaOp& op, bool fence_check,
                               std::vector<uint16_t>& out) {
    const SmemDesc da = decode_desc(op.a), db = decode_desc(op.b);
    const uint32_t w4 = c.warp_index % 4, g = c.lane / 4, t = c.lane % 4;
    out.clear();
    auto read = [&](uint32_t off, const char* operand) -> std::string {
        uint16_t bits = 0;
        if (fence_check) {
            if (std::string e = async_read16(L, off, operand, &bits); !e.empty()) return e;
        } else {
            if (size_t(off) + 2 > L.smem_bytes)
                return format("wgmma operand %s reads shared address 0x%x, outside the %zu bytes of dynamic shared "
                              "memory",
                              operand, off, L.smem_bytes);
            std::memcpy(&bits, &async_view(L)[off], 2);
        }
        out.push_back(bits);
        return {};
    };
    if (op.a_regs == nullptr) {
        for (uint32_t h = 0; h < 2; ++h)
            for (uint32_t k = 0; k < 16; ++k)
                if (std::string e = read(desc_element(da, op.trans_a, 16 * w4 + g + 8 * h, k), "A"); !e.empty())
                    return e;
    }
    for (uint32_t col = 0; col < uint32_t(op.n); ++col) {
        if (col % 8 / 2 != t) continue;
        for (uint32_t k = 0; k < 16; ++k)
            if (std::string e = read(desc_element(db, op.trans_b, col, k), "B"); !e.empty()) return e;
    }
    return {};
}

// Lands the calling thread's committed wgmma groups but the newest n.
void wgmma_land(ThreadCtx& c, size_t n) {
    WgmmaState& st = tl_wgmma;
    if (st.committed.size() <= n) return;
    Launch& L = *c.launch;
    std::unique_lock lock(L.barrier.mu);
    const uint32_t t = c.lane % 4;
    // Whether an operation on `d` is still pending after operation `j` of the front group.
    auto pending_after = [&st](const float* d, size_t j) {
        const std::vector<WgmmaOp>& front = st.committed.front();
        for (size_t k = j + 1; k < front.size(); ++k)
            if (front[k].d == d) return true;
        for (size_t g = 1; g < st.committed.size(); ++g)
            for (const WgmmaOp& o : st.committed[g])
                if (o.d == d) return true;
        for (const WgmmaOp& o : st.open)
            if (o.d == d) return true;
        return false;
    };
    while (st.committed.size() > n) {
        for (size_t j = 0; j < st.committed.front().size(); ++j) {
            const WgmmaOp& op = st.committed.front()[j];
            // PTX: the A registers of the register form must not be modified before the wait that
            // covers the wgmma (the hardware may read them until then).
            if (op.a_regs != nullptr && std::memcmp(op.a_regs, op.a_issued, sizeof op.a_issued) != 0) {
                uint32_t r = 0;
                while (op.a_regs[r] == op.a_issued[r]) ++r;
                fail_unlocked(lock, format("wgmma.mma_async register operand A changed between the wgmma's issue and "
                                           "the wait that covers it (register a%u: 0x%08x at the issue, 0x%08x at the "
                                           "wait): PTX forbids modifying the A registers until then",
                                           r, op.a_issued[r], op.a_regs[r]));
            }
            std::vector<uint16_t> bits;
            if (std::string e = wgmma_operand_bits(L, c, op, true, bits); !e.empty()) fail_unlocked(lock, e);
            const size_t a_count = op.a_regs == nullptr ? 32 : 0;  // A's elements among `bits`
            if (bits != op.issued) {
                size_t at = 0;
                while (bits[at] == op.issued[at]) ++at;
                fail_unlocked(lock, format("wgmma.mma_async operand %s changed in shared memory between the wgmma's issue "
                                           "and the wait that covers it (the hardware may read it at any time in "
                                           "between): read before its TMA copy landed (a missing mbarrier wait) or "
                                           "overwritten before the wait (a stage released early)",
                                           at < a_count ? "A" : "B"));
            }
            const uint16_t* a_bits = op.a_regs == nullptr ? bits.data() : op.a_bits.data();
            float a[2][16];
            std::vector<float> b(size_t(op.n) * 16);
            for (uint32_t h = 0; h < 2; ++h)
                for (uint32_t k = 0; k < 16; ++k) a[h][k] = half_bits_to_f32(a_bits[16 * h + k], op.type);
            size_t next = a_count;
            for (uint32_t col = 0; col < uint32_t(op.n); ++col) {
                if (col % 8 / 2 != t) continue;  // this thread's columns only
                for (uint32_t k = 0; k < 16; ++k) b[size_t(col) * 16 + k] = half_bits_to_f32(bits[next++], op.type);
            }
            // The accumulator layout of m64nNk16 (PTX ISA, "Register Fragments" of wgmma .f32
            // accumulators): d[i] is row 16·(warp % 4) + lane / 4 + 8·((i / 2) % 2), column
            // 8·(i / 4) + 2·(lane % 4) + i % 2.
            auto chain = std::find_if(st.chains.begin(), st.chains.end(),
                                      [&op](const auto& ch) { return ch.first == op.d; });
            if (op.chained && chain == st.chains.end())
                fail_unlocked(lock, "wgmma_land: a chained operation without its predecessor's value (simulator bug)");
            std::vector<float> out(size_t(op.n / 2));
            for (int i = 0; i < op.n / 2; ++i) {
                const uint32_t h = (uint32_t(i) >> 1) & 1u;
                const uint32_t col = 8 * (uint32_t(i) >> 2) + 2 * t + (uint32_t(i) & 1u);
                float acc = !op.scale_d ? 0.0f : op.chained ? chain->second[size_t(i)] : op.c[size_t(i)];
                for (uint32_t k = 0; k < 16; ++k) acc += a[h][k] * b[size_t(col) * 16 + k];
                out[size_t(i)] = acc;
            }
            if (pending_after(op.d, j)) {
                // Registers in flight for a later operation: they stay poisoned.
                if (chain == st.chains.end()) {
                    st.chains.emplace_back(op.d, std::move(out));
                } else {
                    chain->second = std::move(out);
                }
            } else {
                std::memcpy(op.d, out.data(), sizeof(float) * out.size());
                if (chain != st.chains.end()) st.chains.erase(chain);
                st.fenced = false;  // the registers changed: the next wgmma on them needs a fence
            }
        }
        st.committed.pop_front();
    }
}

// A thread leaves the kernel: the warpgroup collective its group waits in can never complete.
std::string hopper_exit(ThreadCtx& c) {
    Launch& L = *c.launch;
    std::lock_guard lock(L.barrier.mu);
    if (L.hopper.warpgroups.empty()) return {};
    WarpgroupSlot& s = L.hopper.warpgroups[c.warp_index / 4];
    ++s.exited;
    if (s.arrived != 0) {
        return format("returns from the kernel while %u thread%s of its warpgroup wait%s for it in %s", s.arrived,
                      s.arrived == 1 ? "" : "s", s.arrived == 1 ? "s" : "", wg_op_name(s.op));
    }
    return {};
}

// A thread returned from (or unwound out of) the kernel. Never throws: it runs in every case.
void exit_thread(ThreadCtx& c) noexcept {
    Launch& L = *c.launch;
    Warp& w = *c.warp;
    // A copy still in flight at the exit may land, on a GPU, in shared memory that the next
    // block on the SM already uses: every copy must be covered by a wait before the thread
    // ends (an empty group need not be).
    std::string err;
    if (size_t n = tl_cp_async.pending()) {
        err = format("exits with %zu cp.async cop%s still in flight (no cp_async_wait covers %s)", n,
                     n == 1 ? "y" : "ies", n == 1 ? "it" : "them");
    }
    tl_cp_async.finish();
    if (size_t n = tl_wgmma.pending(); n != 0 && err.empty()) {
        err = format("exits with %zu wgmma.mma_async operation%s still in flight (no wgmma_wait covers %s)", n,
                     n == 1 ? "" : "s", n == 1 ? "it" : "them");
    }
    tl_wgmma = WgmmaState{};
    if (std::string e = hopper_exit(c); !e.empty() && err.empty()) err = e;
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
    std::string deadlock = L.barrier.drop(c.warp_index);
    if (!deadlock.empty() && !L.failed.load(std::memory_order_acquire))
        L.record_failure("after this thread's exit: " + deadlock);
}

// Runs one worker's thread of every block of `L`.
void run_thread(Launch& L, uint32_t tid) {
    ThreadCtx c{&L, &L.warps[tid / 32], tid % 32, tid / 32};
    tl_ctx = &c;
    threadIdx = uint3{tid % L.block.x, tid / L.block.x % L.block.y, tid / (L.block.x * L.block.y)};
    blockDim = L.block;
    gridDim = L.grid;
    do {
        uint64_t b = L.block_index;
        blockIdx = uint3{unsigned(b % L.grid.x), unsigned(b / L.grid.x % L.grid.y),
                         unsigned(b / (uint64_t(L.grid.x) * L.grid.y))};
        try {
            L.barrier.wait_turn(c.warp_index, c.lane, L.failed);
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
// Per kernel, the dynamic shared memory it has been opted in to beyond kDefaultDynamicSmem
// (lf_sim_set_max_dynamic_smem); under g_launch_mutex.
std::map<const lf_sim::KernelEntry*, size_t> g_smem_opt_in;

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

void lf_sim::require_shared(const void* p, size_t bytes, const char* what) {
#if !defined(__SANITIZE_ADDRESS__)
    const Launch& L = *ctx(what).launch;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    auto inside = [&](const void* base, size_t size) {
        const uintptr_t b = reinterpret_cast<uintptr_t>(base);
        return base != nullptr && a >= b && a - b <= size && bytes <= size - (a - b);
    };
    const size_t statics = size_t(__stop_lf_sim_shared - __start_lf_sim_shared);
    if (!inside(__start_lf_sim_shared, statics) && !inside(L.dyn_smem.get(), L.smem_bytes))
        fail(format("%s %p is not in shared memory (static __shared__ or dynamic)", what, p).c_str());
#else
    (void)p, (void)bytes, (void)what;
#endif
}

void lf_sim::cp_async16(void* dst, const void* src, int src_bytes) {
    ThreadCtx& c = ctx("cp.async");
    require_aligned(dst, 16, "cp.async destination");
    require_aligned(src, 16, "cp.async source");
    if (src_bytes < 0 || src_bytes > 16) fail(format("cp.async: src_bytes %d outside 0..16", src_bytes).c_str());
    require_shared(dst, 16, "cp.async destination");
    (void)c;
    CpAsyncCopy copy{static_cast<unsigned char*>(dst), {}};
    std::memcpy(copy.bytes, src, size_t(src_bytes));
    std::memset(dst, 0xff, 16);  // poison until the covering wait
    tl_cp_async.open.push_back(copy);
}
void lf_sim::cp_async_commit() {
    ctx("cp.async.commit_group");
    tl_cp_async.committed.push_back(std::move(tl_cp_async.open));
    tl_cp_async.open.clear();
}
void lf_sim::cp_async_wait(int n, const char* file, unsigned line) {
    ctx("cp.async.wait_group");
    if (n < 0) fail(format("cp.async.wait_group %d: negative", n).c_str());
    if (site_deleted(kSiteCpAsyncWait, file, line)) return;
    tl_cp_async.wait(size_t(n));
}

// ---- Hopper intrinsics (lf_sim.h; README: "Hopper") --------------------------------------

uint32_t lf_sim::smem_window(const void* p, size_t bytes, const char* what) {
    Launch& L = *ctx(what).launch;
    const auto* base = static_cast<const unsigned char*>(L.dyn_smem.get());
    const auto* q = static_cast<const unsigned char*>(p);
    if (base == nullptr || q < base || q + bytes > base + L.smem_bytes) {
        fail(format("%s %p (%zu bytes) is not in this block's dynamic shared memory [%p, +%zu): the simulator's "
                    "async proxy (TMA, wgmma descriptors) reaches dynamic shared memory only",
                    what, p, bytes, static_cast<const void*>(base), L.smem_bytes)
                 .c_str());
    }
    return uint32_t(q - base);
}

namespace {
// The fence's snapshot of shared memory for the async proxy. It reads the whole of dynamic
// shared memory, which other lanes of the running warp may be writing at that moment (their
// own stores, which their own fences will publish): the simulator's bookkeeping, not the
// kernel's access, so ThreadSanitizer is told not to see it (no interceptable memcpy either).
__attribute__((no_sanitize("thread"), noinline)) void snapshot_for_async_proxy(unsigned char* view,
                                                                               const unsigned char* smem,
                                                                               size_t bytes) {
    const volatile unsigned char* src = smem;
    for (size_t i = 0; i < bytes; ++i) view[i] = src[i];
}
// A write of the async proxy (a TMA copy's poison when issued, its bytes when its phase
// completes) into the kernel's shared memory. A kernel that reads the destination before
// the covering wait reads the poison, which its test catches every run; ThreadSanitizer
// would report the same read only when the schedule happens to interleave it (the planted
// wrong-parity test failed the TSan self-test in 4 of 6 runs), so it is not shown this
// bookkeeping write, as with the fence's snapshot.
__attribute__((no_sanitize("thread"), noinline)) void async_proxy_write16(unsigned char* dst,
                                                                           const unsigned char* bytes) {
    volatile unsigned char* d = dst;
    for (int i = 0; i < 16; ++i) d[i] = bytes ? bytes[i] : 0xff;
}
}  // namespace

void lf_sim::fence_proxy_async() {
    Launch& L = *ctx("fence.proxy.async").launch;
    std::lock_guard lock(L.barrier.mu);
    std::vector<unsigned char>& v = async_view(L);
    if (!v.empty()) snapshot_for_async_proxy(v.data(), static_cast<const unsigned char*>(L.dyn_smem.get()), v.size());
}

namespace {
// The mbarrier at `bar` for an operation of the calling thread. mbarrier.init is an ordinary
// (generic-proxy) write: another thread may use the object only after a __syncthreads that
// follows the init (a launch error otherwise, which proves that barrier load-bearing; other
// synchronisation the PTX memory model would accept is not recognised).
Mbarrier& find_mbarrier(Launch& L, std::unique_lock<std::mutex>& lock, void* bar, const char* what) {
    auto it = L.hopper.mbarriers.find(reinterpret_cast<uintptr_t>(bar));
    if (it == L.hopper.mbarriers.end())
        fail_unlocked(lock, format("%s on %p, which is not an initialised mbarrier (mbarrier_init first)", what, bar));
    const ThreadCtx& c = ctx(what);
    const uint32_t tid = c.warp_index * 32 + c.lane;
    if (it->second.init_tid != tid && it->second.init_phase == L.barrier.phase())
        fail_unlocked(lock, format("%s on %p, which thread %u initialised with no __syncthreads since: the "
                                   "initialisation is not yet visible to this thread",
                                   what, bar, it->second.init_tid));
    return it->second;
}
// The mbarrier's current phase completes: its TMA copies land (in shared memory and the async
// proxy's view), the phase advances and its waiters run again.
void complete_phase(Launch& L, Mbarrier& m) {
    m.deferred = false;
    std::vector<unsigned char>& v = async_view(L);
    for (const TmaChunk& ch : m.landing) {
        async_proxy_write16(window_ptr(L, ch.off), ch.bytes);
        std::memcpy(&v[ch.off], ch.bytes, 16);
    }
    m.landing.clear();
    ++m.phase;
    m.pending = m.count;
    unblock_all(L, m.waiters);
}
// Completes the mbarrier's current phase if nothing is pending. A phase that carries copies
// and has no waiter yet completes as late as the PTX ISA lets a reader rely on it: when a
// thread next observes the barrier (`observe`: a try_wait, or an arrival or copy, which
// belongs to the next phase). So a reader that skips its wait reads the poison whatever the
// schedule, not data that a producer running ahead happened to land already.
void mbarrier_progress(Launch& L, Mbarrier& m) {
    if (m.pending != 0 || m.tx != 0) return;
    if (!m.landing.empty() && m.waiters.empty()) {
        m.deferred = true;
        return;
    }
    complete_phase(L, m);
}
// A thread observes `m`: a deferred phase completes first.
void observe(Launch& L, Mbarrier& m) {
    if (m.deferred) complete_phase(L, m);
}
void mbarrier_tx(std::unique_lock<std::mutex>& lock, Mbarrier& m, int64_t delta, const char* what) {
    m.tx += delta;
    if (m.tx > 0xfffff || m.tx < -0xfffff)
        fail_unlocked(lock, format("%s: the mbarrier's transaction count %lld leaves the range of the PTX ISA "
                                   "(±(2^20 - 1))",
                                   what, (long long)m.tx));
}
void mbarrier_arrive_impl(void* bar, int64_t tx, const char* what) {
    ThreadCtx& c = ctx(what);
    Launch& L = *c.launch;
    std::unique_lock lock(L.barrier.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    Mbarrier& m = find_mbarrier(L, lock, bar, what);
    observe(L, m);
    mbarrier_tx(lock, m, tx, what);
    if (m.pending == 0) fail_unlocked(lock, format("%s: no arrival pending in the mbarrier's phase", what));
    --m.pending;
    mbarrier_progress(L, m);
}
}  // namespace

void lf_sim::mbarrier_init(void* bar, unsigned count) {
    ThreadCtx& c = ctx("mbarrier.init");
    require_aligned(bar, 8, "mbarrier");
    require_shared(bar, 8, "mbarrier");  // an mbarrier is a shared-memory object (PTX ISA)
    if (count == 0 || count > 0xfffff) fail(format("mbarrier.init with count %u (1..2^20 - 1)", count).c_str());
    Launch& L = *c.launch;
    std::unique_lock lock(L.barrier.mu);
    Mbarrier& m = L.hopper.mbarriers[reinterpret_cast<uintptr_t>(bar)];
    observe(L, m);  // a completed phase nobody observed is no copy in flight
    if (!m.waiters.empty() || !m.landing.empty())
        fail_unlocked(lock, "mbarrier.init of an mbarrier with waiters or TMA copies in flight");
    m = Mbarrier{};
    m.count = m.pending = count;
    m.init_tid = c.warp_index * 32 + c.lane;
    m.init_phase = L.barrier.phase();
}
void lf_sim::mbarrier_arrive(void* bar) { mbarrier_arrive_impl(bar, 0, "mbarrier.arrive"); }
void lf_sim::mbarrier_arrive_expect_tx(void* bar, unsigned bytes) {
    mbarrier_arrive_impl(bar, int64_t(bytes), "mbarrier.arrive.expect_tx");
}
void lf_sim::mbarrier_expect_tx(void* bar, unsigned bytes) {
    ThreadCtx& c = ctx("mbarrier.expect_tx");
    Launch& L = *c.launch;
    std::unique_lock lock(L.barrier.mu);
    Mbarrier& m = find_mbarrier(L, lock, bar, "mbarrier.expect_tx");
    observe(L, m);
    mbarrier_tx(lock, m, int64_t(bytes), "mbarrier.expect_tx");
}
bool lf_sim::mbarrier_try_wait_parity(void* bar, unsigned parity) {
    ThreadCtx& c = ctx("mbarrier.try_wait.parity");
    Launch& L = *c.launch;
    std::unique_lock lock(L.barrier.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    Mbarrier& m = find_mbarrier(L, lock, bar, "mbarrier.try_wait.parity");
    observe(L, m);
    if ((m.phase & 1u) != (parity & 1u)) return true;  // the phase with this parity completed
    m.waiters.emplace_back(c.warp_index, c.lane);
    block_here(c, lock, "mbarrier.try_wait.parity");
    return true;
}

void lf_sim::tma_load_2d(void* dst, const void* map, int c0, int c1, void* bar) {
    ThreadCtx& c = ctx("cp.async.bulk.tensor.2d");
    Launch& L = *c.launch;
    require_aligned(map, 64, "tensor map");
    const auto& t = *static_cast<const LfSimTensorMap*>(map);
    if (t.magic != kTensorMapMagic) fail("cp.async.bulk.tensor.2d: the tensor map was not encoded");
    const uint32_t row_bytes = t.box[0] * t.elem_bytes, total = row_bytes * t.box[1];
    require_aligned(dst, 128, "TMA destination");
    const uint32_t dst_off = smem_window(dst, total, "TMA destination");
    const uint32_t mode = t.swizzle == 128 ? 1 : t.swizzle == 64 ? 2 : t.swizzle == 32 ? 3 : 0;
    std::unique_lock lock(L.barrier.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    Mbarrier& m = find_mbarrier(L, lock, bar, "cp.async.bulk.tensor.2d");
    observe(L, m);
    std::vector<unsigned char>& v = async_view(L);
    const auto* src = static_cast<const unsigned char*>(t.base);
    for (uint32_t r = 0; r < t.box[1]; ++r) {
        const int64_t y = int64_t(c1) + r;
        for (uint32_t cb = 0; cb < row_bytes / 16; ++cb) {
            TmaChunk ch{};
            for (uint32_t k = 0; k < 16; ++k) {
                const uint32_t byte = cb * 16 + k;
                const int64_t x = int64_t(c0) + byte / t.elem_bytes;
                const bool in = x >= 0 && y >= 0 && uint64_t(x) < t.dim[0] && uint64_t(y) < t.dim[1];
                ch.bytes[k] = in ? src[uint64_t(y) * t.stride1 + uint64_t(x) * t.elem_bytes + byte % t.elem_bytes] : 0;
            }
            ch.off = swizzle_addr(dst_off + r * row_bytes + cb * 16, mode);
            async_proxy_write16(window_ptr(L, ch.off), nullptr);  // poison until the phase completes
            std::memset(&v[ch.off], 0xff, 16);
            m.landing.push_back(ch);
        }
    }
    // complete_tx: the copy's bytes count as transferred at once; the data lands with the phase.
    mbarrier_tx(lock, m, -int64_t(total), "cp.async.bulk.tensor.2d complete_tx");
    mbarrier_progress(L, m);
}

void lf_sim::named_barrier(unsigned id, unsigned n, bool wait) {
    const char* what = wait ? "bar.sync (named barrier)" : "bar.arrive (named barrier)";
    ThreadCtx& c = ctx(what);
    Launch& L = *c.launch;
    if (id == 0 || id > 15)
        fail(format("%s %u: ids 1..15 (0 is __syncthreads' barrier)", what, id).c_str());
    if (n == 0 || n % 32 != 0 || n > L.threads)
        fail(format("%s %u, %u: the thread count must be a nonzero multiple of 32, at most the block's %u", what,
                    id, n, L.threads)
                 .c_str());
    std::unique_lock lock(L.barrier.mu);
    if (L.failed.load(std::memory_order_acquire)) throw Abort{};
    NamedBarrier& b = L.hopper.named[id];
    if (b.arrived == 0) {
        b.expected = n;
    } else if (b.expected != n) {
        fail_unlocked(lock, format("%s %u, %u while %u threads wait in it with count %u", what, id, n, b.arrived,
                                   b.expected));
    }
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        unblock_all(L, b.waiters);
        return;
    }
    if (wait) {
        b.waiters.emplace_back(c.warp_index, c.lane);
        block_here(c, lock, what);
    }
}

void lf_sim::setmaxnreg(bool inc, unsigned n) {
    ThreadCtx& c = ctx("setmaxnreg");
    if (n < 24 || n > 256 || n % 8 != 0)
        fail(format("setmaxnreg.%s %u: the count must be a multiple of 8 in 24..256", inc ? "inc" : "dec", n).c_str());
    WgOperands o;
    o.n = int(n);
    o.flag = inc ? 1 : 0;
    warpgroup_collective(c, WgOp::setmaxnreg, "setmaxnreg", o);
}

void lf_sim::wgmma_fence() {
    ctx("wgmma.fence");
    tl_wgmma.fenced = true;
}
void lf_sim::wgmma_commit() {
    ctx("wgmma.commit_group");
    tl_wgmma.committed.push_back(std::move(tl_wgmma.open));
    tl_wgmma.open.clear();
}
void lf_sim::wgmma_wait(int n) {
    ThreadCtx& c = ctx("wgmma.wait_group");
    if (n < 0 || n > 7) fail(format("wgmma.wait_group %d: 0..7", n).c_str());
    wgmma_land(c, size_t(n));
}

namespace {

// Issues one wgmma.mma_async for the calling thread: both forms (a_regs null: A in shared memory
// through desc_a; else the register form, with the thread's 4 A registers).
void wgmma_issue(float* d, int n, int type, uint64_t desc_a, uint64_t desc_b, bool scale_d, bool trans_a,
                 bool trans_b, const uint32_t* a_regs) {
    ThreadCtx& c = ctx("wgmma.mma_async");
    Launch& L = *c.launch;
    if (n < 8 || n > 256 || n % 8 != 0)
        lf_sim::fail(format("wgmma.mma_async m64n%dk16: N must be 8..256, a multiple of 8", n).c_str());
    const bool rs = a_regs != nullptr;
    for (int which = rs ? 1 : 0; which < 2; ++which) {
        const uint64_t desc = which == 0 ? desc_a : desc_b;
        const SmemDesc dd = decode_desc(desc);
        if (dd.base_offset != 0)
            lf_sim::fail(format("wgmma descriptor 0x%016llx: matrix base offset %u (the simulator supports 0: "
                                "operands aligned to their swizzle pattern)",
                                (unsigned long long)desc, dd.base_offset)
                             .c_str());
        if (size_t(dd.start) >= L.smem_bytes)
            lf_sim::fail(format("wgmma descriptor 0x%016llx: start address 0x%x outside the %zu bytes of dynamic "
                                "shared memory",
                                (unsigned long long)desc, dd.start, L.smem_bytes)
                             .c_str());
    }
    WgmmaOp op;
    op.d = d;
    op.n = n;
    op.type = type;
    op.a = rs ? 0 : desc_a;
    op.b = desc_b;
    op.scale_d = scale_d;
    op.trans_a = !rs && trans_a;
    op.trans_b = trans_b;
    if (rs) {
        op.a_regs = a_regs;
        std::memcpy(op.a_issued, a_regs, sizeof op.a_issued);
    }
    // The earliest time the hardware may read the operands, this thread's issue: the landing
    // compares these bytes with those it reads.
    {
        std::unique_lock lock(L.barrier.mu);
        if (std::string e = wgmma_operand_bits(L, c, op, false, op.issued); !e.empty()) fail_unlocked(lock, e);
    }
    WgOperands uniform;
    uniform.a = op.a;
    uniform.b = desc_b;
    uniform.n = n;
    uniform.type = type;
    uniform.flag = scale_d ? 1 : 0;
    uniform.trans_a = op.trans_a;
    uniform.trans_b = trans_b;
    if (rs) {
        // The A fragment (PTX ISA, "Register Fragments" of wgmma m64nNk16, .f16/.bf16 A): the
        // thread with t = lane % 4 holds, of its warp's rows g = 16·(warp % 4) + lane / 4 and
        // g + 8: a0 (g, 2t..2t+1), a1 (g + 8, 2t..2t+1), a2 (g, 2t+8..2t+9), a3 (g + 8,
        // 2t+8..2t+9), the lower column in the low half. This thread's accumulators need rows g
        // and g + 8 whole, held by the 4 threads of its quad.
        uint32_t quad[16];
        warpgroup_collective(c, WgOp::wgmma_rs, "wgmma.mma_async (A in registers)", uniform, a_regs, quad);
        op.a_bits.resize(32);
        for (uint32_t h = 0; h < 2; ++h)
            for (uint32_t k = 0; k < 16; ++k)
                op.a_bits[16 * h + k] = uint16_t(quad[4 * ((k % 8) / 2) + h + 2 * (k / 8)] >> (16 * (k % 2)));
    } else {
        warpgroup_collective(c, WgOp::wgmma, "wgmma.mma_async", uniform);
    }
    WgmmaState& st = tl_wgmma;
    const WgmmaOp* prev = st.pending_on(d);
    if (prev != nullptr && prev->n != n)
        lf_sim::fail(
            format("wgmma.mma_async m64n%dk16 on accumulators still pending in an m64n%dk16", n, prev->n).c_str());
    if (prev == nullptr && !st.fenced)
        lf_sim::fail("wgmma.mma_async reads accumulator registers with no wgmma.fence since they were last written "
                     "(call lf::wgmma_fence() before the first wgmma of a batch)");
    op.chained = prev != nullptr;
    if (prev == nullptr) op.c.assign(d, d + n / 2);
    std::memset(d, 0xff, sizeof(float) * size_t(n / 2));  // NaN until the covering wait
    st.open.push_back(std::move(op));
}

}  // namespace

void lf_sim::wgmma(float* d, int n, int type, uint64_t desc_a, uint64_t desc_b, bool scale_d, bool trans_a,
                   bool trans_b) {
    wgmma_issue(d, n, type, desc_a, desc_b, scale_d, trans_a, trans_b, nullptr);
}
void lf_sim::wgmma_rs(float* d, int n, int type, const uint32_t* a, uint64_t desc_b, bool scale_d, bool trans_b) {
    if (a == nullptr) fail("wgmma.mma_async (A in registers): null A register array");
    wgmma_issue(d, n, type, 0, desc_b, scale_d, false, trans_b, a);
}

bool lf_sim::site_deleted(SiteKind kind, const char* file, unsigned line) {
    Launch& L = *ctx("a barrier or cp.async wait").launch;
    if (L.record_sites) {
        std::lock_guard lock(L.sites_mu);
        L.sites.emplace(int(kind), file, line);
    }
    return L.mutant_kind == int(kind) && L.mutant_line == line && L.mutant_file == file;
}

void __syncthreads(const char* lf_file, unsigned lf_line) {
    if (lf_sim::site_deleted(lf_sim::kSiteBarrier, lf_file, lf_line)) return;
    syncthreads(0);
}
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

// ---- Mutation testing: the launching (host) thread's settings -------------------------------

// Set by lf_sim_set_mutant / lf_sim_record_sites on the thread that launches, and copied into
// each of its launches, so that tests running side by side in one process do not see each
// other's mutants.
struct HostMutation {
    int kind = -1;
    std::string file;
    unsigned line = 0;
    bool record = false;
    // (kernel, kind, file, line) of every site the recorded launches reached, in order.
    std::vector<std::tuple<std::string, int, std::string, unsigned>> recorded;
};
thread_local HostMutation tl_host_mutation;

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
        if (dynamic_smem_bytes > kDefaultDynamicSmem) {
            auto it = g_smem_opt_in.find(entry);
            size_t allowed = it == g_smem_opt_in.end() ? kDefaultDynamicSmem : it->second;
            if (dynamic_smem_bytes > allowed) {
                return report(err, err_cap,
                              format("kernel `%s`: %zu bytes of dynamic shared memory exceed the %zu it may use "
                                     "(above 48 KiB a kernel needs an opt-in: "
                                     "Backend::opt_in_dynamic_shared, as cuFuncSetAttribute on CUDA)",
                                     kernel, dynamic_smem_bytes, allowed));
            }
        }
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
        // The orders depend on the seed, the kernel and its geometry only, so that with
        // LORAFUSE_SIM_SEED set a launch runs the same way whatever ran before it.
        uint64_t h = process_seed();
        for (const char* q = kernel; *q != '\0'; ++q) h = mix64(h ^ uint8_t(*q));
        for (uint32_t v : {grid.x, grid.y, grid.z, block.x, block.y, block.z}) h = mix64(h ^ v);
        L->rng.state = mix64(h ^ dynamic_smem_bytes);
        L->draw_block_order();
        const HostMutation& hm = tl_host_mutation;
        L->mutant_kind = hm.kind;
        L->mutant_file = hm.file;
        L->mutant_line = hm.line;
        L->record_sites = hm.record;
        if (!L->start_block()) return report(err, err_cap, L->error);
        pool().run(*L);
        if (hm.record) {
            std::set<std::tuple<std::string, int, std::string, unsigned>> seen(
                tl_host_mutation.recorded.begin(), tl_host_mutation.recorded.end());
            for (const auto& [kind, file, line] : L->sites) {
                auto site = std::make_tuple(std::string(entry->name), kind, file, line);
                if (seen.insert(site).second) tl_host_mutation.recorded.push_back(site);
            }
        }
        return L->failed.load(std::memory_order_acquire) ? report(err, err_cap, L->error) : 0;
    } catch (const std::exception& e) {
        return report(err, err_cap, std::string("simulator: ") + e.what());
    }
}

// Lets `kernel` use up to `bytes` of dynamic shared memory (above the default 48 KiB, at
// most 227 KiB): the simulator's twin of cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES).
// Returns 0, or nonzero with a message in `err`.
extern "C" int32_t lf_sim_set_max_dynamic_smem(const char* kernel, size_t bytes, char* err, size_t err_cap) {
    if (kernel == nullptr) return report(err, err_cap, "lf_sim_set_max_dynamic_smem: null kernel name");
    const lf_sim::KernelEntry* entry = find_kernel(kernel);
    if (entry == nullptr) return report(err, err_cap, format("unknown kernel `%s`", kernel));
    if (bytes > kMaxDynamicSmem) {
        return report(err, err_cap,
                      format("kernel `%s`: cannot opt in to %zu bytes of dynamic shared memory (at most %zu)",
                             kernel, bytes, kMaxDynamicSmem));
    }
    std::lock_guard lock(g_launch_mutex);
    size_t& allowed = g_smem_opt_in.try_emplace(entry, kDefaultDynamicSmem).first->second;
    allowed = std::max(allowed, bytes);
    return 0;
}

// The seed of this process's block and warp orders (LORAFUSE_SIM_SEED, or a random one).
extern "C" uint64_t lf_sim_seed(void) { return process_seed(); }

extern "C" size_t lf_sim_kernel_count(void) {
    size_t n = 0;
    for (auto e = lf_sim_kernel_table(); *e != nullptr; ++e) ++n;
    return n;
}

extern "C" const char* lf_sim_kernel_name(size_t i) {
    return i < lf_sim_kernel_count() ? lf_sim_kernel_table()[i]->name : nullptr;
}

// Deletes the site (kind 0: __syncthreads, 1: cp.async wait; `file` and `line` as recorded)
// in every later launch from the calling thread; kind < 0 deletes none. Returns 0, or
// nonzero with a message in `err`.
extern "C" int32_t lf_sim_set_mutant(int32_t kind, const char* file, uint32_t line, char* err, size_t err_cap) {
    if (kind > 3) return report(err, err_cap, format("lf_sim_set_mutant: unknown site kind %d", kind));
    if (kind >= 0 && file == nullptr) return report(err, err_cap, "lf_sim_set_mutant: null file");
    tl_host_mutation.kind = kind < 0 ? -1 : kind;
    tl_host_mutation.file = kind < 0 ? std::string() : std::string(file);
    tl_host_mutation.line = kind < 0 ? 0 : line;
    return 0;
}

// Starts (on != 0: the record emptied first) or stops recording the sites that the calling
// thread's launches reach.
extern "C" void lf_sim_record_sites(int32_t on) {
    if (on != 0) tl_host_mutation.recorded.clear();
    tl_host_mutation.record = on != 0;
}

// The number of distinct (kernel, site) pairs recorded.
extern "C" size_t lf_sim_recorded_site_count(void) { return tl_host_mutation.recorded.size(); }

// Recorded site `i`: its kernel, kind, file and line. The strings live until the next
// lf_sim_record_sites(1) on this thread. Returns 0, or -1 when `i` is out of range.
extern "C" int32_t lf_sim_recorded_site(size_t i, const char** kernel, int32_t* kind, const char** file,
                                        uint32_t* line) {
    if (i >= tl_host_mutation.recorded.size()) return -1;
    const auto& [k, kd, f, l] = tl_host_mutation.recorded[i];
    *kernel = k.c_str();
    *kind = kd;
    *file = f.c_str();
    *line = l;
    return 0;
}

extern "C" int32_t lf_sim_tensor_map_encode_2d(void* map, uint32_t elem_bytes, const void* base, uint64_t dim0,
                                               uint64_t dim1, uint64_t stride1_bytes, uint32_t box0, uint32_t box1,
                                               uint32_t swizzle_bytes, char* err, size_t err_cap) {
    const char* why = nullptr;
    if (map == nullptr || (reinterpret_cast<uintptr_t>(map) & 63) != 0) why = "the map must be 64-byte aligned";
    else if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) why = "element size 1, 2, 4 or 8";
    else if (base == nullptr || (reinterpret_cast<uintptr_t>(base) & 15) != 0) why = "the global address must be 16-byte aligned";
    else if (dim0 == 0 || dim1 == 0 || dim0 > (1ull << 32) || dim1 > (1ull << 32)) why = "dimensions 1..2^32";
    else if (stride1_bytes % 16 != 0 || stride1_bytes >= (1ull << 40) || stride1_bytes < dim0 * elem_bytes)
        why = "the stride must be a multiple of 16 bytes, below 2^40, at least one row";
    else if (box0 == 0 || box1 == 0 || box0 > 256 || box1 > 256) why = "box sides 1..256";
    else if (box0 * elem_bytes % 16 != 0) why = "the box's inner side must be a multiple of 16 bytes";
    else if (swizzle_bytes != 0 && swizzle_bytes != 32 && swizzle_bytes != 64 && swizzle_bytes != 128)
        why = "swizzle 0 (none), 32, 64 or 128 bytes";
    else if (swizzle_bytes != 0 && box0 * elem_bytes != swizzle_bytes)
        why = "a swizzled box's inner side must be exactly the swizzle span (the simulator's rule)";
    if (why != nullptr) return report(err, err_cap, std::string("lf_sim_tensor_map_encode_2d: ") + why);
    lf_sim::LfSimTensorMap t{};
    t.magic = lf_sim::kTensorMapMagic;
    t.base = base;
    t.dim[0] = dim0;
    t.dim[1] = dim1;
    t.stride1 = stride1_bytes;
    t.box[0] = box0;
    t.box[1] = box1;
    t.elem_bytes = elem_bytes;
    t.swizzle = swizzle_bytes;
    std::memcpy(map, &t, sizeof t);
    return 0;
}
