//! The simulator backend (DESIGN §7): `kernels/*.cu` compiled by the host C++ compiler
//! against `kernels/sim/lf_sim.h` and linked into this crate as `liblorafuse_sim.a`.
//!
//! "Device" memory is host memory, allocated here so that the simulator can check what a
//! kernel did with it: every buffer is poisoned (all bytes 0xFF, a NaN in f32, bf16 and
//! f16) when allocated, and sits between two red zones whose bytes are checked after every
//! launch, so a kernel that writes past either end of any live buffer fails its launch
//! with [`Error::Kernel`]. The AddressSanitizer and ThreadSanitizer builds of the
//! simulator (see `build.rs` and `tests/simulator.rs`) catch what this cannot: reads out
//! of bounds and shared-memory races.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use super::LaunchConfig;
use crate::{Error, Result};

/// Bytes of red zone on each side of a buffer.
const RED_ZONE: usize = 256;
/// The red zone's byte pattern (not a NaN pattern, not zero: an unlikely value to write).
const RED_BYTE: u8 = 0xA5;
/// Fresh buffers hold this byte everywhere: NaN in every float dtype we store.
pub(crate) const POISON_BYTE: u8 = 0xFF;

#[repr(C)]
#[derive(Clone, Copy)]
struct LfSimDim {
    x: u32,
    y: u32,
    z: u32,
}

// SAFETY: these declarations match the C definitions they link to (the same
// parameter and return types), which is what an `unsafe extern` block asserts.
unsafe extern "C" {
    fn lf_sim_launch(
        kernel: *const c_char,
        grid: LfSimDim,
        block: LfSimDim,
        dynamic_smem_bytes: usize,
        params: *const c_void,
        params_bytes: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
    #[cfg_attr(not(test), allow(dead_code))]
    fn lf_sim_set_max_dynamic_smem(
        kernel: *const c_char,
        bytes: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
}

// The emulated cuTensorMapEncodeTiled (the Hopper kernels' tensor maps, the self-tests').
// SAFETY: this declaration matches the C definition it links to (the same parameter and
// return types), which is what an `unsafe extern` block asserts.
unsafe extern "C" {
    fn lf_sim_tensor_map_encode_2d(
        map: *mut c_void,
        elem_bytes: u32,
        base: *const c_void,
        dim0: u64,
        dim1: u64,
        stride1_bytes: u64,
        box0: u32,
        box1: u32,
        swizzle_bytes: u32,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
}

/// A 2-D tensor map (the simulator's CUtensorMap: 128 bytes, to be placed 64-byte aligned)
/// over the tensor at device address `base` with `dims` elements (`dims[0]` contiguous),
/// `stride1` bytes between rows, a `box_dims` box and `swizzle` bytes (0, 32, 64, 128).
pub(crate) fn tensor_map_2d(
    base: u64,
    elem_bytes: u32,
    dims: [u64; 2],
    stride1: u64,
    box_dims: [u32; 2],
    swizzle: u32,
) -> Result<[u8; 128]> {
    #[repr(C, align(64))]
    struct Map([u8; 128]);
    let mut map = Map([0; 128]);
    let mut err = [0 as c_char; 256];
    // SAFETY: `map` is 128 writable bytes, 64-byte aligned; `err` is writable for its length;
    // `base` is only stored in the map, read by later launches.
    let rc = unsafe {
        lf_sim_tensor_map_encode_2d(
            map.0.as_mut_ptr().cast(),
            elem_bytes,
            base as usize as *const c_void,
            dims[0],
            dims[1],
            stride1,
            box_dims[0],
            box_dims[1],
            swizzle,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the simulator wrote a NUL-terminated message into `err`.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return Err(Error::invalid(msg));
    }
    Ok(map.0)
}

// The registry's introspection, for the tidy and size tests.
#[cfg(test)]
// SAFETY: these declarations match the C definitions they link to (the same
// parameter and return types), which is what an `unsafe extern` block asserts.
unsafe extern "C" {
    fn lf_sim_kernel_count() -> usize;
    fn lf_sim_kernel_name(i: usize) -> *const c_char;
    fn lf_sim_param_bytes(kernel: *const c_char) -> usize;
    fn lf_sim_seed() -> u64;
}

/// Live buffers by the address of their first data byte: the red-zone checker walks them.
/// One lock also serialises launches with the checks and frees, so a check never reads a
/// buffer that is being freed or written by another launch.
static LIVE: Mutex<BTreeMap<usize, Live>> = Mutex::new(BTreeMap::new());

#[derive(Clone, Copy)]
struct Live {
    /// The allocation's start (the lower red zone).
    base: usize,
    /// Data bytes.
    len: usize,
}

fn live() -> MutexGuard<'static, BTreeMap<usize, Live>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A simulated device allocation: `len` data bytes between two red zones, 16-byte aligned.
/// Held by raw pointer so that the red-zone checker and the kernels (which write through
/// raw pointers too) never alias a Rust reference to the whole allocation.
pub(crate) struct SimBuffer {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a `SimBuffer` owns its allocation exclusively (like a `Box<[u8]>`); access to the
// data goes through `&self`/`&mut self` methods, and the checker only touches the red zones
// under the `LIVE` lock.
unsafe impl Send for SimBuffer {}
// SAFETY: as above; `&SimBuffer` only hands out shared slices of the data.
unsafe impl Sync for SimBuffer {}

impl std::fmt::Debug for SimBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimBuffer({} bytes)", self.len)
    }
}

fn layout(len: usize) -> Result<Layout> {
    Layout::from_size_align(2 * RED_ZONE + len, 16)
        .map_err(|_| Error::invalid(format!("simulator: cannot allocate {len} bytes")))
}

impl SimBuffer {
    /// A poisoned buffer of `len` bytes.
    pub(crate) fn new(len: usize) -> Result<SimBuffer> {
        let layout = layout(len)?;
        // SAFETY: the layout's size is at least 2·RED_ZONE > 0.
        let base = NonNull::new(unsafe { std::alloc::alloc(layout) }).ok_or_else(|| {
            Error::invalid(format!("simulator: out of host memory for {len} bytes"))
        })?;
        // SAFETY: `base` points to `layout.size()` freshly allocated, writable bytes.
        unsafe {
            std::ptr::write_bytes(base.as_ptr(), RED_BYTE, RED_ZONE);
            std::ptr::write_bytes(base.as_ptr().add(RED_ZONE), POISON_BYTE, len);
            std::ptr::write_bytes(base.as_ptr().add(RED_ZONE + len), RED_BYTE, RED_ZONE);
        }
        let b = SimBuffer { base, len };
        live().insert(
            b.device_ptr() as usize,
            Live {
                base: base.as_ptr() as usize,
                len,
            },
        );
        super::memory::allocated(crate::Device::Sim, len);
        Ok(b)
    }

    /// Data bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The data, for host-side copies (the simulator's "memcpy").
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the data region is `len` initialised bytes inside our allocation.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(RED_ZONE), self.len) }
    }

    /// The data, mutably.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(RED_ZONE), self.len) }
    }

    /// The "device pointer" kernels get: the address of the first data byte.
    pub(crate) fn device_ptr(&self) -> u64 {
        (self.base.as_ptr() as usize + RED_ZONE) as u64
    }
}

impl Drop for SimBuffer {
    fn drop(&mut self) {
        super::memory::freed(crate::Device::Sim, self.len);
        let mut live = live();
        live.remove(&(self.device_ptr() as usize));
        let layout = layout(self.len).expect("the layout was valid at allocation");
        // SAFETY: `base` came from `alloc(layout)` with this same layout; holding the
        // `LIVE` lock means no launch or check is using the memory now.
        unsafe { std::alloc::dealloc(self.base.as_ptr(), layout) };
    }
}

/// Launches `kernel` on the simulator with one by-value parameter struct, then checks
/// every live buffer's red zones.
pub(crate) fn launch<P: bytemuck::Pod>(kernel: &str, cfg: &LaunchConfig, params: &P) -> Result<()> {
    let err = |msg: String| Error::Kernel {
        kernel: kernel.to_string(),
        msg,
    };
    let name = CString::new(kernel).map_err(|_| err("kernel name contains NUL".into()))?;
    let dim = |d: [u32; 3]| LfSimDim {
        x: d[0],
        y: d[1],
        z: d[2],
    };
    let mut msg = vec![0u8; 1024];
    let guard = live();
    // SAFETY: `name` is a NUL-terminated string that outlives the call; `params` points to
    // `size_of::<P>()` readable bytes (the simulator checks that size against the kernel's
    // parameter struct before reading); `msg` is a writable buffer of `msg.len()` bytes. The
    // kernel dereferences the device pointers inside `params`: they are data addresses of
    // live `SimBuffer`s, which cannot be freed meanwhile because their `Drop` needs the
    // `LIVE` lock we hold, and the callers hold the tensors' storage locks (write for
    // outputs), so no Rust reference to those bytes is used during the launch.
    let rc = unsafe {
        lf_sim_launch(
            name.as_ptr(),
            dim(cfg.grid),
            dim(cfg.block),
            cfg.shared_bytes as usize,
            (params as *const P).cast(),
            std::mem::size_of::<P>(),
            msg.as_mut_ptr().cast(),
            msg.len(),
        )
    };
    if rc != 0 {
        let text = CStr::from_bytes_until_nul(&msg)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(&msg).into_owned());
        return Err(err(text));
    }
    check_red_zones(&guard).map_err(err)
}

/// Records that `kernel` may use up to `bytes` of dynamic shared memory (the simulator's
/// twin of `cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)`); without it a launch with
/// more than 48 KiB fails.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn opt_in_dynamic_shared(kernel: &str, bytes: u32) -> Result<()> {
    let err = |msg: String| Error::Kernel {
        kernel: kernel.to_string(),
        msg,
    };
    let name = CString::new(kernel).map_err(|_| err("kernel name contains NUL".into()))?;
    let mut msg = vec![0u8; 512];
    // SAFETY: `name` is NUL-terminated and outlives the call; `msg` is a writable buffer of
    // `msg.len()` bytes; the call reads and writes nothing else of ours.
    let rc = unsafe {
        lf_sim_set_max_dynamic_smem(
            name.as_ptr(),
            bytes as usize,
            msg.as_mut_ptr().cast(),
            msg.len(),
        )
    };
    if rc != 0 {
        let text = CStr::from_bytes_until_nul(&msg)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Err(err(text));
    }
    Ok(())
}

#[cfg(test)]
/// The seed of this process's block and warp orders: `LORAFUSE_SIM_SEED` if it was set
/// (decimal or `0x` hex), else a random one. Set it to replay a run's orders.
pub(crate) fn seed() -> u64 {
    // SAFETY: reads a value computed once; no arguments.
    unsafe { lf_sim_seed() }
}

/// Every live buffer's red zones still hold their pattern, or which buffer was overrun.
fn check_red_zones(live: &BTreeMap<usize, Live>) -> std::result::Result<(), String> {
    for (&data, l) in live {
        // SAFETY: `l.base .. data + l.len + RED_ZONE` lies inside the live allocation of
        // `Box<[u128]>` that registered it (at least 2·RED_ZONE + len bytes); it cannot be
        // freed while we hold the `LIVE` lock, and no launch runs meanwhile (same lock).
        let (below, above) = unsafe {
            (
                std::slice::from_raw_parts(l.base as *const u8, RED_ZONE),
                std::slice::from_raw_parts((data + l.len) as *const u8, RED_ZONE),
            )
        };
        let bad_below = below.iter().rposition(|&b| b != RED_BYTE);
        let bad_above = above.iter().position(|&b| b != RED_BYTE);
        if bad_below.is_some() || bad_above.is_some() {
            let where_ = match (bad_below, bad_above) {
                (Some(i), _) => format!("{} bytes before its start", RED_ZONE - i),
                (None, Some(i)) => format!("{} bytes past its end", i + 1),
                (None, None) => unreachable!("checked above"),
            };
            // Restore the pattern so one bug is reported once, by the launch that caused it.
            // SAFETY: as above; the bytes are ours and no kernel is running.
            unsafe {
                std::ptr::write_bytes(l.base as *mut u8, RED_BYTE, RED_ZONE);
                std::ptr::write_bytes((data + l.len) as *mut u8, RED_BYTE, RED_ZONE);
            }
            return Err(format!(
                "out-of-bounds write: a {}-byte buffer was written {where_}",
                l.len
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
/// The kernel symbols the simulator library holds (its registry, in build order).
pub(crate) fn kernel_names() -> Vec<String> {
    // SAFETY: the registry is a static table built by build.rs; every index below the
    // count names a static NUL-terminated string.
    unsafe {
        (0..lf_sim_kernel_count())
            .map(|i| {
                CStr::from_ptr(lf_sim_kernel_name(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

#[cfg(test)]
/// The size of `kernel`'s parameter struct as the C++ compiler laid it out, if the
/// simulator has that kernel.
pub(crate) fn param_bytes(kernel: &str) -> Option<usize> {
    let name = CString::new(kernel).ok()?;
    // SAFETY: `name` is NUL-terminated and outlives the call, which only reads it.
    let n = unsafe { lf_sim_param_bytes(name.as_ptr()) };
    (n > 0).then_some(n)
}
