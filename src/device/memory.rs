//! Device-memory accounting: bytes in use and the peak, per device, counted by every
//! device allocation of the crate (tensors, optimizer state, kernel scratch). On the CPU,
//! the process's heap, counted by [`CountingAllocator`] when the program installs it.
//!
//! On a GPU the allocations come from the driver's stream-ordered pool
//! (`cuMemAllocAsync`), which the CUDA backend tells to keep freed memory
//! (`CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` = max) instead of returning it at each
//! synchronisation, so a training step reuses the previous step's memory — the caching
//! allocator is the driver's. These counters report what the crate holds, not what the
//! pool has reserved.

use crate::Device;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// What one device's allocations and host transfers amount to (see
/// [`Device::memory_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Bytes held by live allocations now.
    pub in_use_bytes: u64,
    /// The largest `in_use_bytes` since the process started or the last
    /// [`Device::reset_peak_memory`].
    pub peak_bytes: u64,
    /// Allocations made so far (a step that reuses memory still allocates: the count
    /// shows how many buffers a step asks for).
    pub allocations: u64,
    /// Device-to-host copies so far (each one waits for the device: a training step
    /// that issues none never stalls the host).
    pub reads_to_host: u64,
    /// Host-to-device copies so far.
    pub writes_from_host: u64,
}

struct Counters {
    in_use: AtomicU64,
    peak: AtomicU64,
    allocations: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
}

impl Counters {
    const fn new() -> Counters {
        Counters {
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }
}

/// GPUs past this ordinal share the last slot (no machine we target has that many).
const MAX_GPUS: usize = 64;
static SIM: Counters = Counters::new();
static CUDA: [Counters; MAX_GPUS] = [const { Counters::new() }; MAX_GPUS];
static CPU: Counters = Counters::new();

fn counters(device: Device) -> &'static Counters {
    match device {
        Device::Sim => &SIM,
        Device::Cuda(n) => &CUDA[n.min(MAX_GPUS - 1)],
        Device::Cpu => &CPU,
    }
}

/// A global allocator that counts the host heap for [`Device::memory_stats`] on the CPU
/// (bytes in use, the peak, allocations) and otherwise is the system allocator. The
/// `lorafuse` binary installs it; a program embedding the crate opts in with
///
/// ```
/// use lorafuse::device::CountingAllocator;
/// use lorafuse::Device;
///
/// #[global_allocator]
/// static HEAP: CountingAllocator = CountingAllocator;
///
/// fn main() {
///     let before = Device::Cpu.memory_stats();
///     let v = vec![0u8; 1 << 20];
///     assert!(CountingAllocator::installed());
///     assert!(Device::Cpu.memory_stats().in_use_bytes >= before.in_use_bytes + (1 << 20));
///     drop(v);
/// }
/// ```
///
/// Without it, the CPU's counters stay at zero. The cost is three relaxed atomic updates
/// per allocation.
pub struct CountingAllocator;

/// Set by the first allocation through [`CountingAllocator`].
static HEAP_COUNTED: AtomicBool = AtomicBool::new(false);

impl CountingAllocator {
    /// Whether this process's heap is counted (the allocator is installed).
    pub fn installed() -> bool {
        HEAP_COUNTED.load(Ordering::Relaxed)
    }
}

fn heap_grew(bytes: usize) {
    let now = CPU.in_use.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    CPU.peak.fetch_max(now, Ordering::Relaxed);
}

/// Counts a new block of `bytes` at `p` (nothing when the allocation failed) and returns `p`.
fn counted(p: *mut u8, bytes: usize) -> *mut u8 {
    if !p.is_null() {
        HEAP_COUNTED.store(true, Ordering::Relaxed);
        CPU.allocations.fetch_add(1, Ordering::Relaxed);
        heap_grew(bytes);
    }
    p
}

fn heap_shrank(bytes: usize) {
    CPU.in_use.fetch_sub(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it
// keeps `System`'s guarantees; the counters are atomics and never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract (non-zero size), passed on as is.
        counted(unsafe { System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        counted(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        heap_shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block is gone and the new one is held (on failure, nothing changed).
            heap_grew(new_size);
            heap_shrank(layout.size());
        }
        p
    }
}

/// Counts an allocation of `bytes` on `device`.
pub(crate) fn allocated(device: Device, bytes: usize) {
    let c = counters(device);
    let now = c.in_use.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    c.peak.fetch_max(now, Ordering::Relaxed);
    c.allocations.fetch_add(1, Ordering::Relaxed);
}

/// Counts a device-to-host copy from `device`.
pub(crate) fn read_to_host(device: Device) {
    counters(device).reads.fetch_add(1, Ordering::Relaxed);
}

/// Counts a host-to-device copy to `device`.
pub(crate) fn written_from_host(device: Device) {
    counters(device).writes.fetch_add(1, Ordering::Relaxed);
}

/// Counts the release of an allocation of `bytes` on `device`.
pub(crate) fn freed(device: Device, bytes: usize) {
    counters(device)
        .in_use
        .fetch_sub(bytes as u64, Ordering::Relaxed);
}

impl Device {
    /// The bytes this process's tensors and buffers hold on this device, and the peak.
    /// On the CPU: the whole heap of the process (tensors, the host buffer pool, the tape
    /// and everything else) when the program installs [`CountingAllocator`], as the
    /// `lorafuse` binary does; all zeros otherwise.
    ///
    /// ```
    /// use lorafuse::{DType, Device, Tensor};
    /// let before = Device::Sim.memory_stats();
    /// let t = Tensor::zeros([1024], DType::F32, &Device::Sim)?;
    /// assert!(Device::Sim.memory_stats().peak_bytes >= before.in_use_bytes + 4096);
    /// # drop(t);
    /// # Ok::<(), lorafuse::Error>(())
    /// ```
    pub fn memory_stats(&self) -> MemoryStats {
        let c = counters(*self);
        MemoryStats {
            in_use_bytes: c.in_use.load(Ordering::Relaxed),
            peak_bytes: c.peak.load(Ordering::Relaxed),
            allocations: c.allocations.load(Ordering::Relaxed),
            reads_to_host: c.reads.load(Ordering::Relaxed),
            writes_from_host: c.writes.load(Ordering::Relaxed),
        }
    }

    /// Restarts the peak from the bytes in use now (e.g. before the step to measure).
    pub fn reset_peak_memory(&self) {
        let c = counters(*self);
        c.peak
            .store(c.in_use.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn allocations_are_counted() {
        // Other tests allocate on the simulator concurrently, so only what this test's
        // own buffer guarantees is asserted.
        let d = Device::Sim;
        let bytes = 3 << 20;
        let t = Tensor::zeros([bytes / 4], DType::F32, &d).unwrap();
        let with = d.memory_stats();
        assert!(with.in_use_bytes >= bytes as u64, "{with:?}");
        assert!(with.peak_bytes >= with.in_use_bytes, "{with:?}");
        assert!(with.allocations >= 1);
        d.reset_peak_memory();
        assert!(d.memory_stats().peak_bytes >= bytes as u64);
        drop(t);
        assert_eq!(Device::Cpu.memory_stats(), Default::default());
    }
}
