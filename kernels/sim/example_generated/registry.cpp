// registry.cpp — an example of the kernel table build.rs generates over every module's
// entries (here only planted_bugs.cu's), for selftest.sh. The runtime looks kernels up in it.
#include "lf_sim.h"
#include <string_view>
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_oob_write_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_missing_barrier_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_smem_oob_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_trap;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_assert;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_exited_lane_shfl;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_full_mask_sum_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_shfl_vs_syncthreads;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_cpp_exception;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_shfl_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_vote;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_activemask;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_atomics;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_dynamic_smem_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_block_reduce_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_geometry;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_convert;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_cp_async_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_tiled_sum_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_broadcast_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_block_chain_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_misaligned;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_stale_static_smem_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_big_smem_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_ldmatrix;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_wgmma_bf16;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_wgmma_f16;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_tma;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_selftest_pipeline_f32;
extern "C" const lf_sim::KernelEntry lf_sim_entry_sim_planted_warpgroup;
static const lf_sim::KernelEntry* const lf_sim_table[] = {
    &lf_sim_entry_sim_planted_oob_write_f32,
    &lf_sim_entry_sim_planted_missing_barrier_f32,
    &lf_sim_entry_sim_planted_smem_oob_f32,
    &lf_sim_entry_sim_planted_trap,
    &lf_sim_entry_sim_planted_assert,
    &lf_sim_entry_sim_planted_exited_lane_shfl,
    &lf_sim_entry_sim_planted_full_mask_sum_f32,
    &lf_sim_entry_sim_planted_shfl_vs_syncthreads,
    &lf_sim_entry_sim_planted_cpp_exception,
    &lf_sim_entry_sim_selftest_shfl_f32,
    &lf_sim_entry_sim_selftest_vote,
    &lf_sim_entry_sim_selftest_activemask,
    &lf_sim_entry_sim_selftest_atomics,
    &lf_sim_entry_sim_selftest_dynamic_smem_f32,
    &lf_sim_entry_sim_selftest_block_reduce_f32,
    &lf_sim_entry_sim_selftest_geometry,
    &lf_sim_entry_sim_selftest_convert,
    &lf_sim_entry_sim_planted_cp_async_f32,
    &lf_sim_entry_sim_planted_tiled_sum_f32,
    &lf_sim_entry_sim_planted_broadcast_f32,
    &lf_sim_entry_sim_planted_block_chain_f32,
    &lf_sim_entry_sim_planted_misaligned,
    &lf_sim_entry_sim_planted_stale_static_smem_f32,
    &lf_sim_entry_sim_selftest_big_smem_f32,
    &lf_sim_entry_sim_selftest_ldmatrix,
    &lf_sim_entry_sim_selftest_wgmma_bf16,
    &lf_sim_entry_sim_selftest_wgmma_f16,
    &lf_sim_entry_sim_selftest_tma,
    &lf_sim_entry_sim_selftest_pipeline_f32,
    &lf_sim_entry_sim_planted_warpgroup,
    nullptr,
};
extern "C" const lf_sim::KernelEntry* const* lf_sim_kernel_table() { return lf_sim_table; }
// The size of a kernel's parameter struct, or 0 for an unknown kernel (for the size tests).
extern "C" size_t lf_sim_param_bytes(const char* name) {
    for (auto e = lf_sim_table; *e; ++e)
        if (std::string_view((*e)->name) == name) return (*e)->param_bytes;
    return 0;
}
