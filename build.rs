//! Build script. Today the crate has no CUDA sources to compile (see kernels/README.md);
//! the nvcc → PTX/cubin and NVRTC-embedding steps arrive with the kernel toolchain. It
//! only tells cargo when to rerun, so adding a kernel triggers a rebuild.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
