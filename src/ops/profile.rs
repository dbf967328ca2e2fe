//! Per-thread op counters, so tests can check how much work a step does (for example that
//! a LoRA step runs fewer GEMMs than a full fine-tuning step).

use std::cell::Cell;

thread_local! {
    static GEMMS: Cell<u64> = const { Cell::new(0) };
    static GEMM_FLOPS: Cell<u64> = const { Cell::new(0) };
}

/// Counts since the last [`reset`] on this thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// GEMM calls issued by ops (each `m×k · k×n` product counts once).
    pub gemms: u64,
    /// Their FLOPs, `2·m·n·k` each.
    pub gemm_flops: u64,
}

/// Records one GEMM of `m×k · k×n` (ops call this; the device layer does not).
pub(crate) fn count_gemm(m: usize, n: usize, k: usize) {
    GEMMS.with(|c| c.set(c.get() + 1));
    GEMM_FLOPS.with(|c| c.set(c.get() + 2 * (m * n * k) as u64));
}

/// The counts on this thread since the last [`reset`].
pub fn counts() -> Counts {
    Counts {
        gemms: GEMMS.with(|c| c.get()),
        gemm_flops: GEMM_FLOPS.with(|c| c.get()),
    }
}

/// Resets this thread's counters.
pub fn reset() {
    GEMMS.with(|c| c.set(0));
    GEMM_FLOPS.with(|c| c.set(0));
}
