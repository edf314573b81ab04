// Warpgroup MMA helpers and accumulator layout views shared by the forward and backward.
#pragma once

#include <cute/tensor.hpp>

namespace prefixlm {

using namespace cute;

// `v` as lane 0 of the warp holds it, for a value every lane already holds (a tile index, a
// warpgroup index): after the broadcast the compiler knows it is warp-uniform, so addresses
// and wgmma descriptors derived from it are built in uniform registers. Derived from
// threadIdx or a shared-memory load, they are built in vector registers and moved over with
// R2UR (two per HGMMA for a descriptor).
__device__ inline int warp_uniform(int v) { return __shfl_sync(0xffffffff, v, 0); }

// A from registers (RS) needs fencing like C; an smem descriptor (SS) does not.
template <class TA>
constexpr bool kOperandInRegisters =
    !is_same_v<typename TA::engine_type::iterator, GMMA::DescriptorIterator>;

// Issues C (+)= A * B over all k-blocks as one wgmma batch and returns without waiting:
// the caller overlaps other work, then calls warpgroup_wait<N>() and fence_after_wait().
// A and B are fragments from partition_fragment_A/B (smem descriptors or registers).
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ inline void warpgroup_gemm_issue(TiledMma& tiled_mma, TA const& tA, TB const& tB,
                                            TC& tC) {
  if constexpr (kOperandInRegisters<TA>) warpgroup_fence_operand(const_cast<TA&>(tA));
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(tiled_mma, tA(_, _, kb), tB(_, _, kb), tC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// After warpgroup_wait: keeps the compiler from touching C (and a register A) early.
template <class TA, class TC>
__device__ inline void fence_after_wait(TA const& tA, TC& tC) {
  warpgroup_fence_operand(tC);
  if constexpr (kOperandInRegisters<TA>) warpgroup_fence_operand(const_cast<TA&>(tA));
}

// Issue and wait.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ inline void warpgroup_gemm(TiledMma& tiled_mma, TA const& tA, TB const& tB, TC& tC) {
  warpgroup_gemm_issue<kZeroInit>(tiled_mma, tA, tB, tC);
  warpgroup_wait<0>();
  fence_after_wait(tA, tC);
}

// View of an SM90 wgmma accumulator ((2, 2, N/8), MMA_M, MMA_N) as (rows, cols):
// ((2, MMA_M), (2, N/8, MMA_N)). Each thread owns 2 rows per MMA_M (r and r + 8).
template <class Layout>
__host__ __device__ constexpr auto accum_rowcol(Layout l) {
  static_assert(decltype(rank<0>(l))::value == 3, "expects a wgmma accumulator layout");
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                     make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// The accumulator of S = Q K^T, reused as the register A operand of O += P V (16-bit inputs):
// a k16 A fragment holds two adjacent 8-column groups, so (2, 2, N/8) splits into
// (2, 2, 2) x (N/16). Result: ((2, 2, 2), MMA_M, (N/16, MMA_N)).
template <class Layout>
__host__ __device__ constexpr auto accum_as_operand_a(Layout l) {
  auto groups = logical_divide(get<0, 2>(l), Tile<_2>{});  // ((2), (N/16))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<0, 0>(groups)), get<1>(l),
                     coalesce(make_layout(get<0, 1>(groups), get<2>(l))));
}

}  // namespace prefixlm
