//! Mutation testing on the simulator: proof that every barrier and every wait a kernel
//! reaches (`cp.async`, mbarrier, wgmma) is load-bearing, i.e. that deleting any one of them
//! fails the kernel's test.
//!
//! Each `__syncthreads()`, `lf::cp_async_wait<N>()`, `lf::mbarrier_wait_parity()` and
//! `lf::wgmma_wait<N>()` of a simulated kernel is a *site*,
//! named by the file and line of its call (`kernels/sim/lf_sim.h`). A probe (a small kernel
//! test that panics when the result is wrong) first runs with the sites recorded, then once
//! per site with that site deleted: every such run must fail, by a wrong result, a NaN read
//! from a `cp.async` destination before its wait, or a launch error. A site whose deletion
//! passes is a missing check (or a barrier the kernel does not need), and the test names it.
//!
//! Settings are per launching thread, so tests that run side by side do not see each other's
//! mutants.

use std::cell::Cell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

// SAFETY: these declarations match the C definitions they link to (the same
// parameter and return types), which is what an `unsafe extern` block asserts.
unsafe extern "C" {
    fn lf_sim_set_mutant(
        kind: i32,
        file: *const c_char,
        line: u32,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
    fn lf_sim_record_sites(on: i32);
    fn lf_sim_recorded_site_count() -> usize;
    fn lf_sim_recorded_site(
        i: usize,
        kernel: *mut *const c_char,
        kind: *mut i32,
        file: *mut *const c_char,
        line: *mut u32,
    ) -> i32;
}

/// What a site is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum SiteKind {
    /// `__syncthreads()`.
    Barrier,
    /// `lf::cp_async_wait<N>()`.
    CpAsyncWait,
    /// `lf::mbarrier_wait_parity()`.
    MbarrierWait,
    /// `lf::wgmma_wait<N>()`.
    WgmmaWait,
}

impl SiteKind {
    /// The simulator's code (`lf_sim::SiteKind`).
    fn code(self) -> i32 {
        match self {
            SiteKind::Barrier => 0,
            SiteKind::CpAsyncWait => 1,
            SiteKind::MbarrierWait => 2,
            SiteKind::WgmmaWait => 3,
        }
    }

    fn from_code(code: i32) -> SiteKind {
        match code {
            0 => SiteKind::Barrier,
            1 => SiteKind::CpAsyncWait,
            2 => SiteKind::MbarrierWait,
            _ => SiteKind::WgmmaWait,
        }
    }
}

/// One barrier or wait of a kernel's source, and the kernels that reached it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Site {
    /// The call's kind.
    pub kind: SiteKind,
    /// The call's source file, as the simulator's compiler named it.
    pub file: String,
    /// The call's line.
    pub line: u32,
    /// The kernels (symbols) whose launches reached it.
    pub kernels: Vec<String>,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let file = self.file.rsplit('/').next().unwrap_or(&self.file);
        let kind = match self.kind {
            SiteKind::Barrier => "__syncthreads()",
            SiteKind::CpAsyncWait => "cp_async_wait",
            SiteKind::MbarrierWait => "mbarrier_wait_parity",
            SiteKind::WgmmaWait => "wgmma_wait",
        };
        write!(
            f,
            "{kind} at {file}:{} ({})",
            self.line,
            self.kernels.join(", ")
        )
    }
}

/// Deletes `site` in this thread's launches until dropped.
struct Mutant;

impl Mutant {
    fn set(site: &Site) -> Mutant {
        let kind = site.kind.code();
        let file = CString::new(site.file.as_str()).expect("a recorded file name has no NUL");
        let mut msg = vec![0u8; 256];
        // SAFETY: `file` is NUL-terminated and outlives the call, which copies it; `msg` is a
        // writable buffer of `msg.len()` bytes.
        let rc = unsafe {
            lf_sim_set_mutant(
                kind,
                file.as_ptr(),
                site.line,
                msg.as_mut_ptr().cast(),
                msg.len(),
            )
        };
        assert_eq!(rc, 0, "{}", String::from_utf8_lossy(&msg));
        Mutant
    }
}

impl Drop for Mutant {
    fn drop(&mut self) {
        // SAFETY: kind -1 clears this thread's mutant; no pointer is read.
        unsafe { lf_sim_set_mutant(-1, std::ptr::null(), 0, std::ptr::null_mut(), 0) };
    }
}

/// Runs `f` with this thread's launches recording the sites they reach; returns them, one
/// entry per site with every kernel that reached it.
pub(crate) fn record_sites<R>(f: impl FnOnce() -> R) -> (R, Vec<Site>) {
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: stops recording on this thread; no arguments are pointers.
            unsafe { lf_sim_record_sites(0) };
        }
    }
    // SAFETY: starts recording on this thread (emptying its record); no pointer arguments.
    unsafe { lf_sim_record_sites(1) };
    let stop = Stop;
    let r = f();
    drop(stop);
    let mut sites: Vec<Site> = Vec::new();
    // SAFETY: reads the count of this thread's record, which nothing else changes.
    let n = unsafe { lf_sim_recorded_site_count() };
    for i in 0..n {
        let (mut kernel, mut file) = (std::ptr::null(), std::ptr::null());
        let (mut kind, mut line) = (0i32, 0u32);
        // SAFETY: `i` is below the count; the out-pointers are valid locals; the strings the
        // simulator hands back live until the next recording on this thread and are copied
        // before it.
        let (kernel, file) = unsafe {
            assert_eq!(
                lf_sim_recorded_site(i, &mut kernel, &mut kind, &mut file, &mut line),
                0
            );
            (
                CStr::from_ptr(kernel).to_string_lossy().into_owned(),
                CStr::from_ptr(file).to_string_lossy().into_owned(),
            )
        };
        let kind = SiteKind::from_code(kind);
        match sites
            .iter_mut()
            .find(|s| s.kind == kind && s.file == file && s.line == line)
        {
            Some(s) if !s.kernels.contains(&kernel) => s.kernels.push(kernel),
            Some(_) => {}
            None => sites.push(Site {
                kind,
                file,
                line,
                kernels: vec![kernel],
            }),
        }
    }
    sites.sort();
    (r, sites)
}

thread_local! {
    /// Set while this thread runs a mutant: its expected panics are not printed.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent on a thread running a mutant and defers
/// to the previous hook everywhere else.
fn quiet_mutant_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info)
            }
        }));
    });
}

/// Whether any of `probes` fails (panics) with `site` deleted; stops at the first that does.
fn fails_without(site: &Site, probes: &[&dyn Fn()]) -> bool {
    quiet_mutant_panics();
    let _mutant = Mutant::set(site);
    QUIET.with(|q| q.set(true));
    let failed = probes
        .iter()
        .any(|probe| catch_unwind(AssertUnwindSafe(probe)).is_err());
    QUIET.with(|q| q.set(false));
    failed
}

/// [`assert_every_site_is_load_bearing`] for a Hopper (sm_90a) kernel, which must also reach
/// a site of each kind its pipeline has: the block barrier after the mbarriers' init, an
/// mbarrier wait and a wgmma wait.
pub(crate) fn assert_every_hopper_site_is_load_bearing(
    what: &str,
    kernels: &[&str],
    probes: &[&dyn Fn()],
) {
    let sites = assert_every_site_is_load_bearing(what, kernels, probes);
    for kind in [
        SiteKind::Barrier,
        SiteKind::MbarrierWait,
        SiteKind::WgmmaWait,
    ] {
        assert!(
            sites.iter().any(|s| s.kind == kind),
            "{what}: no {kind:?} site reached: {sites:?}"
        );
    }
}

/// Asserts that each of `probes` (small kernel tests that panic on a wrong result) passes as
/// it is, that together they reach at least one site of each kernel whose symbol starts with
/// one of `kernels`, and that deleting any one of those sites makes a probe that reached it
/// fail. Returns the sites checked.
pub(crate) fn assert_every_site_is_load_bearing(
    what: &str,
    kernels: &[&str],
    probes: &[&dyn Fn()],
) -> Vec<Site> {
    let ours = |k: &String| kernels.iter().any(|p| k.starts_with(p));
    // Each site with the probes that reached it: a mutant reruns only those.
    let mut sites: Vec<(Site, Vec<usize>)> = Vec::new();
    for (i, probe) in probes.iter().enumerate() {
        let ((), reached) = record_sites(probe);
        for site in reached.into_iter().filter(|s| s.kernels.iter().any(ours)) {
            match sites
                .iter_mut()
                .find(|(s, _)| (s.kind, &s.file, s.line) == (site.kind, &site.file, site.line))
            {
                Some((s, users)) => {
                    for k in site.kernels {
                        if !s.kernels.contains(&k) {
                            s.kernels.push(k);
                        }
                    }
                    users.push(i);
                }
                None => sites.push((site, vec![i])),
            }
        }
    }
    sites.sort_by(|a, b| a.0.cmp(&b.0));
    for prefix in kernels {
        assert!(
            sites
                .iter()
                .any(|(s, _)| s.kernels.iter().any(|k| k.starts_with(prefix))),
            "{what}: the probes reached no barrier or wait of a `{prefix}*` kernel"
        );
    }
    let survivors: Vec<String> = sites
        .iter()
        .filter(|(s, users)| {
            let users: Vec<&dyn Fn()> = users.iter().map(|&i| probes[i]).collect();
            !fails_without(s, &users)
        })
        .map(|(s, _)| s.to_string())
        .collect();
    assert!(
        survivors.is_empty(),
        "{what}: the probes still pass with one of these deleted (of {} sites):\n  {}",
        sites.len(),
        survivors.join("\n  ")
    );
    sites.into_iter().map(|(s, _)| s).collect()
}
