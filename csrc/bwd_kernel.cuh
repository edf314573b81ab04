// Backward main kernel: warp-specialised, persistent, TMA + wgmma (sm_90a).
//
// A tile is (key block of kBlockN = 128 rows (D <= 128), kv head). K and V stay in shared
// memory while the tile loops over the query heads of the kv head's group and, for each, over
// the query blocks of kBlockM rows (64 at D = 128, 128 at D = 64) that can see the key block
// (MaskInfo::query_begin). Per query block, with warpgroup w owning keys [64w, 64w + 64):
//   S^T  = K Q^T,  P^T = exp2(S^T * scale_log2 - lse_log2)       (masked entries exactly 0)
//   dP^T = V dO^T, dS^T = P^T * (dP^T - D)                        (D = rowsum(dO * O))
//   dV += P^T dO,  dK += dS^T Q                                    (P^T, dS^T from registers)
//   dQ  = dS K     dS through shared memory (the warpgroups meet: dQ needs all 128 keys);
//                  each warpgroup computes half of the block's dQ (fp32) into shared memory,
//                  from where the dQ writer writes the whole block to the fp32 accumulator
//                  in global memory with one bulk asynchronous operation (the block's first
//                  write a store, the others reductions), so the compute warpgroups never
//                  wait on it
// dK and dV (summed over the group's query heads) are written once per tile.
// D = 192 and 256 change the step (their dK and dV do not fit in registers per 64 keys):
// D = 256 splits the head dim between the warpgroups (BwdTraits::kSplitD), D = 192 takes 96
// keys per tile and computes dK^T and dV^T (BwdTraits::kDkvT).
//
// CTA = 3 warpgroups: warpgroup 0 holds the producer warp (TMA loads: K and V once per tile,
// Q and dO per query block through a kStages pipeline, with that block's LSE and D as bulk
// copies on the same barrier) and the dQ writers (one thread of warp 1; D = 128 also one of
// warp 2, BwdTraits::kDqWriters); warpgroups 1 and 2 compute. Work comes from the schedule
// (built by the preprocess's first CTA): key-block tiles, then chunks of padding rows of k
// whose dK and dV are written as zeros inside this launch. CTAs take the items dynamically
// in list order (tile_handoff.h): within a sequence, key block 0 (which sees the most query
// blocks under a causal mask) first. Tiles start in list order, so the smallest unfinished
// tile never waits on a later one and the ordered dQ adds of deterministic mode cannot
// deadlock, whether or not every CTA is resident.
//
// NaN/Inf in padding rows never reaches a real gradient: rows of Q and dO past Lq and rows
// of K past Lk are zero-filled in shared memory (they are multiplied by exact zeros in the
// products), and P, dS, LSE and D of such rows are set by select, never by a product.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "bwd_api.h"
#include "gemm.h"
#include "mask.h"
#include "params.h"
#include "scheduler.h"
#include "softmax.h"
#include "tile_handoff.h"

namespace prefixlm {

using namespace cute;

// One query block's dQ, described by the producer warp for the dQ writer.
struct DqJob {
  int64_t offset;  // float offset of the block in the accumulator; < 0 ends the writer
  int flag;        // the block's word in dq_semaphore
  int turn;        // ordered (deterministic) mode: add when the word equals this (dq_turn); else -1
};

// kWindow_ / kSoftcap_: built for a sliding window / a softcap (see FwdTraits).
template <int kHeadDim_, class Element_, bool kWindow_ = false, bool kSoftcap_ = false>
struct BwdTraits {
  static constexpr bool kWindow = kWindow_;
  static constexpr bool kSoftcap = kSoftcap_;
  static_assert(kWindow || !kSoftcap, "softcap kernels also take the window");
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = bwd_block_m(kHeadDim);  // query rows per inner step
  static constexpr int kBlockN = bwd_block_n(kHeadDim);  // key rows per tile
  // D = 192 and 256: dK and dV of 64 keys over all of D take 192 / 256 registers per thread
  // in a warpgroup that owns them, so these two change the step.
  // D = 256 (kSplitD): both warpgroups work on all 64 keys of the tile: they split the
  // queries in S^T and dP^T (64 keys x 32 queries each), and the head dim in dV, dK and dQ
  // (64 x D/2 of each). P^T and dS^T meet in shared memory, from where the dV and dK products
  // read them.
  // D = 192 (kDkvT): tiles of 96 keys, 48 per warpgroup, with the products turned around:
  // S = Q K^T and dP = dO V^T (64 queries x the warpgroup's 48 keys), dV^T += dO^T P and
  // dK^T += Q^T dS (D x 48 keys: the head dim is the products' M, 72 + 72 registers), P and
  // dS through shared memory, dQ split by D as with kSplitD. A key tile of 96 instead of 64
  // loads Q and dO and adds dQ two thirds as often per key.
  static constexpr bool kSplitD = kHeadDim > 192;
  static constexpr bool kDkvT = kHeadDim == 192;
  static_assert(!kSplitD || (kBlockN == 64 && kBlockM == 64), "split-D tiles are 64 x 64");
  static_assert(!kDkvT || (kBlockN == 96 && kBlockM == 64), "dK^T / dV^T tiles are 64 x 96");
  // P (not only dS) goes through shared memory.
  static constexpr bool kPInSmem = kSplitD || kDkvT;
  // Q/dO stages. D = 256 has room for one: K, V, Q, dO (32 KB each), P, dS (8 KB each), dQ
  // (64 KB); D = 192 for one: K, V (36 KB each), Q, dO (24 KB each), P, dS (12 KB each), dQ
  // (48 KB).
  static constexpr int kStages = kHeadDim > 128 ? 1 : 2;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = 128 + kConsumerThreads;
  // D = 64 holds S^T and dP^T of 64 keys x 128 queries (64 registers each) beside dV and dK:
  // dS is computed while fp32 P^T is still live and P^T is converted for dV afterwards, so
  // fp32 P^T, dP^T and a bf16 copy of P^T are never live together. D = 128 has room to issue
  // dV first and compute dS while it runs.
  static constexpr bool kDvBeforeDs = kBlockM == 64;
  // Softcap with dV first from registers (D = 96, 128): the P stage, where t = tanh(S^T
  // scale / c) is at hand, writes P^T straight to its input-precision copy for dV and leaves
  // P^T (1 - t^2) in the fp32 accumulator, which is all dS needs (2 instructions per element
  // instead of recovering t from P^T with a MUFU.LG2 and 4 more in the dS stage).
  static constexpr bool kSoftcapInP = kSoftcap && kDvBeforeDs && !kPInSmem;

  // Warpgroups split the key rows (M) of the products below, or with kSplitD / kDkvT their N.
  using AtomLayoutKeys = Layout<Shape<_2, _1, _1>>;
  using AtomLayoutN = Layout<Shape<_1, _2, _1>>;
  using AtomLayout = conditional_t<kPInSmem, AtomLayoutN, AtomLayoutKeys>;
  // S^T = K Q^T and dP^T = V dO^T: (keys, queries, D), both operands K-major in smem.
  // kDkvT: S = Q K^T and dP = dO V^T, (queries, keys, D).
  using TileShapeSdP = conditional_t<kDkvT, Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>,
                                     Shape<Int<kBlockN>, Int<kBlockM>, Int<kHeadDim>>>;
  using AtomShapeSdP =
      Shape<_64, Int<kDkvT ? kBlockN / 2 : (kSplitD ? kBlockM / 2 : kBlockM)>, Int<kHeadDim>>;
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, AtomShapeSdP>(), AtomLayout{}));
  // dV += P^T dO and dK += dS^T Q: (keys, D, queries); A from registers (kSplitD: from
  // shared memory, keys x queries with the queries contiguous, i.e. K-major), B = dO^T / Q^T
  // read from the row-major (queries, D) tiles, i.e. MN-major.
  // kDkvT: dV^T += dO^T P and dK^T += Q^T dS, (D, keys, queries); A = dO^T / Q^T (MN-major),
  // B = P / dS stored queries-contiguous (K-major).
  using TileShapedKV = conditional_t<kDkvT, Shape<Int<kHeadDim>, Int<kBlockN>, Int<kBlockM>>,
                                     Shape<Int<kBlockN>, Int<kHeadDim>, Int<kBlockM>>>;
  using AtomShapedKV = conditional_t<
      kDkvT, Shape<_64, Int<kBlockN / 2>, Int<kBlockM>>,
      Shape<_64, Int<kSplitD ? kHeadDim / 2 : kHeadDim>, Int<kBlockM>>>;
  using TiledMmadKV = decltype(make_tiled_mma(
      conditional_t<
          kDkvT,
          decltype(GMMA::ss_op_selector<Element, Element, float, AtomShapedKV, GMMA::Major::MN,
                                        GMMA::Major::K>()),
          conditional_t<kSplitD,
                        decltype(GMMA::ss_op_selector<Element, Element, float, AtomShapedKV,
                                                      GMMA::Major::K, GMMA::Major::MN>()),
                        decltype(GMMA::rs_op_selector<Element, Element, float, AtomShapedKV,
                                                      GMMA::Major::K, GMMA::Major::MN>())>>{},
      AtomLayout{}));
  // dQ = dS K: (queries, D, keys) over all the tile's keys, so the warpgroups meet once per
  // block (both halves of dS in smem) and never add partial sums. A = dS stored
  // queries-contiguous (MN-major), B = K^T read from the row-major (keys, D) tile (MN-major).
  // 128 query rows: warpgroup w owns rows [64 w, 64 w + 64). 64 query rows: warpgroup w owns
  // columns [D/2 w, D/2 w + D/2) (at D = 64 a half would be too narrow for a 128-byte
  // swizzled MN-major operand, hence D = 64's 128 rows).
  // D = 96 (kDqSingleWg): warpgroup kDqWarpgroup computes all of it (64 x 96), the other none:
  // one product of N = 96 reads dS once instead of twice, and the dQ hand-off is that
  // warpgroup's alone. Warpgroup 1: warpgroup 0 only arrives at the meeting and runs its dK
  // and its next block's S^T and exponentials while warpgroup 1 computes dQ (the two drift
  // apart by themselves, so D = 96 has no stagger).
  static constexpr bool kDqSplitRows = kBlockM == 128;
  static constexpr bool kDqSingleWg = bwd_dq_single_warpgroup(kHeadDim);
  static constexpr int kDqWarpgroup = 1;
  // The warpgroups' stagger (bwd_stagger_wait): D = 128 only. D = 96 has none (see above);
  // D = 64 measured without it.
  static constexpr bool kStagger = !kDqSingleWg && kBlockM == 64;
  static constexpr int kDqThreads = kDqSingleWg ? 128 : 256;  // threads that hold dQ
  static constexpr int kDqCols = bwd_dq_cols(kHeadDim);  // kHeadDim, or half with two shares
  static_assert(kDqCols % 16 == 0, "a warpgroup's dQ columns are whole atoms");
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDqCols>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      conditional_t<kDqSplitRows, Layout<Shape<_2, _1, _1>>,
                    conditional_t<kDqSingleWg, Layout<Shape<_1, _1, _1>>,
                                  Layout<Shape<_1, _2, _1>>>>{}));
  // dQ block in shared memory, (M, D) fp32 in fragment order (bwd_dq_accum_offset,
  // bwd_store_dq): one contiguous range, added to the accumulator (which keeps this layout,
  // see BwdWorkspace) by a single bulk reduction.
  static constexpr int kDqBlockBytes = kBlockM * kHeadDim * sizeof(float);
  // Two dQ buffers, so the compute warpgroups run a block ahead of the writer: its round
  // trip (a bulk reduction into a busy L2, then waiting for its reads) can take about a
  // block of compute, and with one buffer the warpgroups waited for it (ncu on the per-row
  // reductions of v7, D=128: 13% of all warp stall samples on dq_empty).
  // D = 192 and 256 leave room for one (48 and 64 KB).
  static constexpr int kDqBuffers = kPInSmem ? 1 : 2;
  // dQ writers (bwd_dq_writer). D = 128: one per buffer, each taking every second job, so
  // that one's round trip (deterministic mode: its turn, the write landing, the turn passed
  // on) overlaps the other's: deterministic +5-13%, the other mode +0-2%. D = 64 measured
  // 1-4% slower with two (both modes), D = 96 was not measured: one writer for all buffers.
  static constexpr int kDqWriters = kBlockM == 64 && !kDqSingleWg ? kDqBuffers : 1;
  // dS buffers. With one, a warpgroup waits (ds_free) until both have finished the previous
  // block's dQ product before it overwrites dS. With two, the meeting before each dQ product
  // already orders it: a warpgroup passes block m's meeting only after its dQ product of
  // block m - 1 completed, and the other overwrites that buffer only at block m + 1. D = 128
  // keeps one (two fit since v10: 2-3% slower there, within noise at v12); D = 64's 128-row
  // blocks have room for two.
  // kSplitD and kDkvT keep one, and one of P.
  static constexpr int kDsBuffers = kHeadDim <= 64 ? 2 : 1;
  static_assert(!kDqSingleWg || kDsBuffers == 1,
                "kDqSingleWg's arrive-only meeting relies on ds_free (one dS buffer)");
  // Jobs in flight from the producer to the dQ writer. When the producer describes block b,
  // the compute warpgroups have released block b - kStages, so they wrote dQ of block
  // b - kStages - 1, so the writer has taken block b - kStages - 1 - kDqBuffers: a ring of
  // kDqJobs never makes the producer wait. With a writer per buffer that bound is looser (a
  // writer takes its next job after its current one's round trip); a wait there is safe:
  // the jobs before the slot's are all loaded, so the writers need nothing from the producer.
  static constexpr int kDqJobs = kStages + kDqBuffers + 1;

  // Shared-memory tiles of Q, dO (SmemAtomQ) and K, V (SmemAtomK): rows swizzled over 128,
  // 64 or 32 bytes (atoms of 64, 32 or 16 elements), the widest whose atoms tile every column
  // range a warpgroup's product reads as an MN-major operand: dO^T / Q^T in dV / dK (all of
  // D, its half with kSplitD, 64-row atoms of D with kDkvT), K^T in dQ (kDqCols,
  // TiledMmadQ). So 128 bytes at D = 64, 128, 256 and for Q and dO at D = 192; 64 for K at
  // D = 192 (halves of 96) and for everything at D = 96.
  using SmemAtomQ = KMajorSwizzleAtom<Element, kSplitD ? kHeadDim / 2 : kHeadDim>;
  using SmemAtomK = KMajorSwizzleAtom<Element, kDqCols>;
  using SmemLayoutQ = decltype(tile_to_shape(
      SmemAtomQ{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));  // (M, D, stages)
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                         Step<_2, _1, _3>{})));  // (D, M, stages)
  using SmemLayoutK = decltype(tile_to_shape(SmemAtomK{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // (N, D)
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{},
      make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{})));  // (D, N)
  // dS: (M, N, kDsBuffers), queries contiguous (kPInSmem: P too).
  using SmemLayoutdS = decltype(tile_to_shape(
      GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<Int<kBlockM>, Int<kBlockN>, Int<kDsBuffers>>{}));
  using SmemLayoutdSt = decltype(composition(
      SmemLayoutdS{}, make_ordered_layout(Shape<Int<kBlockN>, Int<kBlockM>, Int<kDsBuffers>>{},
                                          Step<_2, _1, _3>{})));  // (N, M, kDsBuffers)
  // The same tile in the orientation of the S / dP accumulators, which stmatrix writes from:
  // (N, M), or (M, N) with kDkvT.
  using SmemLayoutPdSAcc = conditional_t<kDkvT, SmemLayoutdS, SmemLayoutdSt>;

  // Global tensors as TMA sees them: (rows, D, heads), rows and heads strided.
  using GmemShape = Shape<int32_t, int32_t, int32_t>;
  using GmemStride = Stride<int64_t, _1, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)),
                                          GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{},
                                      take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, SmemLayoutK{},
                                      Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  // Per query block: Q and dO (TMA), LSE and D (bulk copies), all on one barrier.
  static constexpr uint32_t kQdOBytes =
      2 * kBlockM * kHeadDim * sizeof(Element) + 2 * kBlockM * sizeof(float);
  static constexpr uint32_t kKVBytes = 2 * kBlockN * kHeadDim * sizeof(Element);
  using Handoff = TileHandoff<2, kConsumerThreads>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdS>> ds;
    // kPInSmem: P (SmemLayoutdS); a minimal placeholder otherwise.
    alignas(kPInSmem ? 1024 : 16) cute::array_aligned<Element, kPInSmem ? cosize_v<SmemLayoutdS> : 8> p;
    alignas(128) float dq[kDqBuffers][kBlockM * kHeadDim];  // bwd_dq_accum_offset
    DqJob dq_jobs[kDqJobs];
    // Per stage: LSE (log2) and D of the query block's rows (+inf and 0 past Lq).
    alignas(16) float lse[kStages][kBlockM];
    alignas(16) float dpsum[kStages][kBlockM];
    alignas(8) uint64_t qdo_full[kStages];   // Q, dO, LSE and D landed (bulk copies)
    alignas(8) uint64_t qdo_empty[kStages];  // consumers are done with the stage
    alignas(8) uint64_t kv_full;   // TMA of K and V landed
    alignas(8) uint64_t kv_empty;  // consumers are done reading K and V
    alignas(8) uint64_t dq_full[kDqBuffers];   // dq[b] written by the compute threads
    alignas(8) uint64_t dq_empty[kDqBuffers];  // the writer has read dq[b]
    alignas(8) uint64_t job_full[kDqJobs];   // the producer wrote dq_jobs[slot]
    alignas(8) uint64_t job_empty[kDqJobs];  // the writer has read it
    alignas(8) uint64_t ds_free;  // kDsBuffers == 1: both warpgroups' dQ products read dS
    typename Handoff::SharedStorage handoff;
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 CTA can have");
};

template <class Traits>
struct BwdKernelParams {
  BwdParams bp;
  BwdWorkspace ws;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaQ tma_do;
  typename Traits::TmaK tma_k;
  typename Traits::TmaK tma_v;
  int* tile_counter;  // the schedule's ScheduleCounts::tile_counter
  float scale_log2;     // log2(e) times softmax_scale, or the softcap (kSoftcap)
  float softcap_scale;  // kSoftcap: softmax_scale / softcap
};

// Every backward product: smem descriptors advanced with 64-bit adds (gemm.h, kDescAdd64).
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ inline void bwd_gemm_issue(TiledMma& mma, TA const& tA, TB const& tB, TC& tC) {
  warpgroup_gemm_issue<kZeroInit, true>(mma, tA, tB, tC);
}

// Named barrier 1: the two compute warpgroups (0 is __syncthreads).
__device__ inline void bwd_consumers_sync() { cutlass::arch::NamedBarrier::sync(256, 1); }
__device__ inline void bwd_consumers_arrive() { cutlass::arch::NamedBarrier::arrive(256, 1); }
// Named barriers 4 and 5: one compute warpgroup's shared-memory stores are done, for its own
// wgmma (D = 192: dV^T and dK^T read only the warpgroup's own P and dS columns).
__device__ inline void bwd_warpgroup_sync(int warpgroup) {
  cutlass::arch::NamedBarrier::sync(128, 4 + warpgroup);
}
// Named barrier 3: the compute warpgroups have zero-filled a query block's padding rows. Not
// barrier 1: with kDqSingleWg, warpgroup 0 only arrives at a block's meeting and may reach
// the next block's zero-fill before warpgroup 1 has reached the meeting; on barrier 1 its two
// arrivals would complete the meeting's generation without warpgroup 1.
__device__ inline void bwd_zero_fill_sync() { cutlass::arch::NamedBarrier::sync(256, 3); }

// Named barrier 2: warpgroup 1 issues a query block's S^T and dP^T only after warpgroup 0's
// S^T has landed. Issued together, the tensor cores interleave the two warpgroups' products,
// both S^T land within ~100 cycles of each other (clock probes) and both warpgroups then run
// their 32 exp2 per thread on the same MUFU units (ncu: MUFU stall samples 3.4 times
// FlashAttention-4's for the same instruction count); staggered, warpgroup 0's exponentials
// run while warpgroup 1's S^T is computed. One arrive and one sync per query block: the
// meeting (barrier 1) of every block keeps warpgroup 0 from arriving twice before warpgroup 1
// has waited once, so arrivals of two blocks never mix. Only where BwdTraits::kStagger is set
// (D = 128): D = 64 measured faster without it, and D = 96's meeting is one warpgroup 0 only
// arrives at (see the dS hand-off), which could not bound it.
__device__ inline void bwd_stagger_wait(int warpgroup) {
  if (warpgroup == 1) cutlass::arch::NamedBarrier::sync(256, 2);
}
__device__ inline void bwd_stagger_release(int warpgroup) {
  if (warpgroup == 0) cutlass::arch::NamedBarrier::arrive(256, 2);
}

// Query blocks [m_begin, m_end) that can see key block n; empty when m_begin >= m_end.
struct QueryRange {
  int m_begin;
  int m_end;
};
template <class Traits>
__device__ inline QueryRange bwd_query_range(const WorkRecord& rec, const MaskInfo& mask) {
  const int n0 = rec.block * Traits::kBlockN;
  const int first = mask.query_begin(n0, n0 + Traits::kBlockN);
  const int end = mask.query_end(n0, n0 + Traits::kBlockN);
  if (first >= end) return {0, 0};
  return {first / Traits::kBlockM, (end + Traits::kBlockM - 1) / Traits::kBlockM};
}

// The order in which a key block visits its query blocks [m_begin, m_end): from `start` to
// the end, then from m_begin. Non-deterministic mode starts at the key block's own diagonal
// (n kBlockN / kBlockM, clamped to the range): under the full mask, and in a PrefixLM
// prefix, every key block of a sequence would otherwise start at query block 0 and run in
// lockstep, all adding to the same dQ block at once, and waiting there for its first write
// to land (bwd_dq_writer). Under a causal mask the range already starts at the diagonal.
// Deterministic mode keeps the natural order, which its turns (dq_turn) assume.
struct QueryOrder {
  int m_begin;
  int m_end;
  int start;
  __device__ int count() const { return m_end - m_begin; }
  __device__ int at(int step) const {
    const int m = start + step;
    return m < m_end ? m : m - (m_end - m_begin);
  }
};
template <class Traits>
__device__ inline QueryOrder bwd_query_order(const WorkRecord& rec, const QueryRange& range,
                                             bool deterministic) {
  const int diagonal = rec.block * Traits::kBlockN / Traits::kBlockM;
  const int start = deterministic ? range.m_begin
                                  : max(range.m_begin, min(diagonal, range.m_end - 1));
  return {range.m_begin, range.m_end, start};
}

// The same pointer, opaque to the compiler: values derived from it are recomputed where used
// instead of being hoisted out of the loop.
template <class T>
__device__ inline T* opaque_pointer(T* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}

__device__ inline uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}
__device__ inline float2 ld_shared_f32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr) : "memory");
  return v;
}
__device__ inline void st_shared_f32x4(uint32_t addr, float4 v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "f"(v.x), "f"(v.y),
               "f"(v.z), "f"(v.w)
               : "memory");
}

// Asynchronous elementwise fp32 add of `bytes` (a multiple of 16) from shared to global
// memory, both 16-byte aligned; completes in this thread's current bulk group.
__device__ inline void bulk_reduce_add_f32(float* gmem, const float* smem, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(
                   gmem),
               "r"(smem_address(smem)), "r"(bytes)
               : "memory");
}

__device__ inline int ld_acquire_gpu(const int* ptr) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}
__device__ inline void st_release_gpu(int* ptr, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// Deterministic mode: the place of key block n among the adds to query block m's dQ. They go
// last key block first: key block n reaches query block m after m - first(n) blocks of its
// own, and first(n) grows with n, so under a causal mask this is the order in which the
// adds become ready when the key blocks of a sequence run side by side (first-to-last would
// make key block n wait about n blocks for the ones before it). The key blocks that see
// query block m are first .. last (the block's rows attend one interval of keys, mask.h); the
// first takes the highest turn, which nothing waits for, so only `last` matters here.
template <class Traits>
__device__ inline int dq_turn(const MaskInfo& mask, int n, int m) {
  const int m0 = m * Traits::kBlockM;
  const int rows_end = min(m0 + Traits::kBlockM, mask.len_q);
  const int last = (mask.key_end(m0, rows_end) - 1) / Traits::kBlockN;
  return last - n;
}

// The work list's size: key-block tiles, then (when padding is zeroed) zero records. Read by
// each role where it starts: computed once before the roles split, it stayed live across the
// register reconfiguration and was spilled.
struct BwdTileCounts {
  int num_block_tiles;
  int num_tiles;
};
__device__ inline BwdTileCounts bwd_tile_counts(const BwdParams& bp, const BwdWorkspace& ws) {
  const ScheduleCounts* counts = schedule_counts(ws.schedule);
  const int num_block_tiles = counts->num_blocks * bp.p.num_heads_k;
  return {num_block_tiles, num_block_tiles + (bp.zero_padding ? counts->num_zero : 0)};
}

template <class Traits>
__device__ void bwd_producer(const BwdKernelParams<Traits>& params,
                             typename Traits::SharedStorage& ss) {
  const auto [num_block_tiles, num_tiles] = bwd_tile_counts(params.bp, params.ws);
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  const VarlenProblem& p = params.bp.p;
  const WorkRecord* records = schedule_records(params.ws.schedule);
  const int num_blocks = schedule_counts(params.ws.schedule)->num_blocks;
  const int lane = threadIdx.x % 32;
  const bool leader = lane == 0;
  const int group = p.num_heads / p.num_heads_k;

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutK{});
  // (rows, D, heads) coordinate tensors over the whole packed buffers.
  Tensor mQ = params.tma_q.get_tma_tensor(make_shape(p.total_q, p.head_dim, p.num_heads));
  Tensor mdO = params.tma_do.get_tma_tensor(make_shape(p.total_q, p.head_dim, p.num_heads));
  Tensor mK = params.tma_k.get_tma_tensor(make_shape(p.total_k, p.head_dim, p.num_heads_k));
  Tensor mV = params.tma_v.get_tma_tensor(make_shape(p.total_k, p.head_dim, p.num_heads_k));

  int stage = 0;
  uint32_t empty_phase = 1;  // the first pass over the stages does not wait
  int kv_loads = 0;
  int jobs = 0;
  // Hands the dQ writer its next job (ring of kDqJobs, see BwdTraits).
  auto publish_job = [&](int64_t offset, int flag, int turn) {
    const int slot = jobs % Traits::kDqJobs;
    if (jobs >= Traits::kDqJobs) {
      wait_barrier(&ss.job_empty[slot], (jobs / Traits::kDqJobs - 1) & 1);
    }
    if (leader) {
      ss.dq_jobs[slot] = DqJob{offset, flag, turn};
      cutlass::arch::ClusterBarrier::arrive(&ss.job_full[slot]);  // release: orders the store
    }
    __syncwarp();
    ++jobs;
  };
  // One word of dq_semaphore per (head, accumulator block), unique per (slot, query block)
  // when slot starts do not decrease. Deterministic mode orders the adds by it; if slot starts
  // decrease, slots overlap (the result is meaningless anyway) and the adds go unordered, so
  // that no turn can be waited for forever.
  const bool ordered =
      params.bp.deterministic && schedule_counts(params.ws.schedule)->q_slots_ordered;
  const int accum_rows = params.ws.accum_rows;
  for (int k = 0;; ++k) {
    // Tiles are taken in list order, also in deterministic mode: a tile whose dQ turn another
    // waits for was taken earlier, so by a CTA that is running (a static stride would let a
    // resident CTA wait on one that has not started, e.g. when other work holds some SMs).
    const int tile = Traits::Handoff::next(params.tile_counter, k);
    Traits::Handoff::publish(ss.handoff, k, tile);
    if (tile >= num_tiles) break;
    if (tile >= num_block_tiles) continue;  // zero record: consumers only
    const int head_k = tile / num_blocks;
    const WorkRecord rec = load_record(records, tile - head_k * num_blocks);
    const MaskInfo mask = record_mask<Traits::kWindow>(rec, p);
    const QueryRange range = bwd_query_range<Traits>(rec, mask);
    if (range.m_begin >= range.m_end) continue;  // consumers write zeros alone

    // Rows past the end of a buffer are zero-filled by TMA; rows past Lk / Lq inside it are
    // padding or the next slot, zero-filled in smem by the consumers.
    Tensor gK = local_tile(domain_offset(make_coord(rec.k_start, _0{}), mK(_, _, head_k)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{},
                           make_coord(rec.block, _0{}));  // (N, D)
    Tensor gV = local_tile(domain_offset(make_coord(rec.k_start, _0{}), mV(_, _, head_k)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{},
                           make_coord(rec.block, _0{}));  // (N, D)
    auto [tKg, tKs] = tma_partition(params.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(params.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));
    if (kv_loads > 0) cutlass::arch::ClusterBarrier::wait(&ss.kv_empty, (kv_loads - 1) & 1);
    if (leader) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.kv_full,
                                                                     Traits::kKVBytes);
      copy(params.tma_k.with(ss.kv_full, 0), tKg, tKs);
      copy(params.tma_v.with(ss.kv_full, 0), tVg, tVs);
    }
    ++kv_loads;

    for (int h = head_k * group; h < (head_k + 1) * group; ++h) {
      Tensor gQ = local_tile(domain_offset(make_coord(rec.q_start, _0{}), mQ(_, _, h)),
                             Shape<Int<kBlockM>, Int<kHeadDim>>{},
                             make_coord(_, _0{}));  // (M, D, query blocks)
      Tensor gdO = local_tile(domain_offset(make_coord(rec.q_start, _0{}), mdO(_, _, h)),
                              Shape<Int<kBlockM>, Int<kHeadDim>>{},
                              make_coord(_, _0{}));  // (M, D, query blocks)
      auto [tQg, tQs] = tma_partition(params.tma_q, _0{}, Layout<_1>{},
                                      group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tdOg, tdOs] = tma_partition(params.tma_do, _0{}, Layout<_1>{},
                                        group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
      // This slot's rows in the accumulator-row workspace (BwdWorkspace), head h.
      const int64_t slot_rows = static_cast<int64_t>(h) * accum_rows +
                                bwd_accum_row0(rec.q_start, rec.batch);
      const QueryOrder order = bwd_query_order<Traits>(rec, range, params.bp.deterministic);
      for (int step = 0; step < order.count(); ++step) {
        const int m = order.at(step);
        wait_barrier(&ss.qdo_empty[stage], empty_phase);
        uint64_t* full = &ss.qdo_full[stage];
        const int64_t block_row = slot_rows + m * kBlockM;
        if (leader) {
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, Traits::kQdOBytes);
          copy(params.tma_q.with(*full, 0), tQg(_, m), tQs(_, stage));
          copy(params.tma_do.with(*full, 0), tdOg(_, m), tdOs(_, stage));
          SM90_BULK_COPY_G2S::copy(params.ws.lse_log2 + block_row, full, ss.lse[stage],
                                   kBlockM * sizeof(float));
          SM90_BULK_COPY_G2S::copy(params.ws.dpsum + block_row, full, ss.dpsum[stage],
                                   kBlockM * sizeof(float));
        }
        if (++stage == Traits::kStages) {
          stage = 0;
          empty_phase ^= 1;
        }
        publish_job(block_row * kHeadDim, static_cast<int>(bwd_dq_word(block_row, kBlockM)),
                    ordered ? dq_turn<Traits>(mask, rec.block, m) : -1);
      }
    }
  }
  for (int w = 0; w < Traits::kDqWriters; ++w) publish_job(-1, -1, 0);  // the writers stop
}

// Asynchronous copy of `bytes` (a multiple of 16) from shared to global memory, both 16-byte
// aligned; completes in this thread's current bulk group.
__device__ inline void bulk_store(float* gmem, const float* smem, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem),
               "r"(smem_address(smem)), "r"(bytes)
               : "memory");
}

// The dQ writer `writer` (one thread of warp 1 + writer; Traits::kDqWriters of them): for
// each query block the compute warpgroups hand over in ss.dq (every kDqWriters-th job, in
// buffer job % kDqBuffers; the producer describes it in a DqJob), writes the whole block to
// the fp32 accumulator with one bulk operation (rows past Lq hold exact zeros and land in
// the slot's own padding, see BwdWorkspace). The accumulator is not cleared beforehand: the
// first write of a block stores, the later ones add. The block's word in dq_semaphore (0
// from the preprocess) says which comes first and when the store has landed:
// - unordered: the writer that moves the word from 0 to 1 stores, waits for the store to
//   complete and sets 2; the others wait for 2, then add. A writer only ever waits for one
//   that has already claimed the block, i.e. a running CTA, whose store depends on nothing
//   but its own warpgroups.
// - ordered (deterministic mode): the key blocks take turns (dq_turn); turn 0 stores. A
//   block waits for the word to reach its turn, writes, waits for the write to complete,
//   passes the turn on.
// A word still 0 after the main kernel means no key block wrote the block: the postprocess
// writes zeros there.
template <class Traits>
__device__ void bwd_dq_writer(const BwdKernelParams<Traits>& params,
                              typename Traits::SharedStorage& ss, int writer) {
  static_assert(Traits::kDqWriters == 1 || Traits::kDqWriters == Traits::kDqBuffers,
                "one writer, or one per buffer");
  for (int j = writer;; j += Traits::kDqWriters) {
    // Job j fills buffer j % kDqBuffers (with a writer per buffer, always `writer`) for the
    // (j / kDqBuffers)-th time, the phase in which the compute warpgroups filled it.
    const int buffer = j % Traits::kDqBuffers;
    const uint32_t full_phase = (j / Traits::kDqBuffers) & 1;
    const int slot = j % Traits::kDqJobs;
    wait_barrier(&ss.job_full[slot], (j / Traits::kDqJobs) & 1);
    const DqJob job = ss.dq_jobs[slot];
    cutlass::arch::ClusterBarrier::arrive(&ss.job_empty[slot]);
    if (job.offset < 0) break;
    int* word = params.ws.dq_semaphore + job.flag;
    const bool ordered = job.turn >= 0;
    bool first;
    if (ordered) {
      while (ld_acquire_gpu(word) != job.turn) {
      }
      first = job.turn == 0;
      wait_barrier(&ss.dq_full[buffer], full_phase);
    } else {
      // Claimed once this block's dQ is in shared memory, so that the others wait for the
      // store alone, not also for the claimer's warpgroups to finish the block.
      wait_barrier(&ss.dq_full[buffer], full_phase);
      first = atomicCAS(word, 0, 1) == 0;
      if (!first) {
        while (ld_acquire_gpu(word) != 2) {
        }
      }
    }
    if (!first || ordered) {
      asm volatile("fence.proxy.async.global;" ::: "memory");  // the write comes after the wait
    }
    float* dst = params.ws.dq_accum + job.offset;
    if (first) {
      bulk_store(dst, ss.dq[buffer], Traits::kDqBlockBytes);
    } else {
      bulk_reduce_add_f32(dst, ss.dq[buffer], Traits::kDqBlockBytes);
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    // The buffer is free for the compute warpgroups once the operation has read it, before
    // its writes land in global memory: the first write's and the ordered mode's round trip
    // (the writes land, the flag or turn passes on) then does not hold the buffer.
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    cutlass::arch::ClusterBarrier::arrive(&ss.dq_empty[buffer]);
    if (ordered || first) {
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");  // the write is done
      asm volatile("fence.proxy.async.global;" ::: "memory");
      __threadfence();
      st_release_gpu(word, ordered ? job.turn + 1 : 2);
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Zero-fills rows [first_row, kRows) of a (kRows, D) smem tile, cooperatively over the 256
// compute threads. The caller fences and synchronises. The thread index is made opaque so
// that the thread's swizzled smem offsets are derived here, on this rarely taken path: hoisted
// to the kernel's start, they stayed live through the main loop and were spilled.
template <int kRows, int kHeadDim, class Tensor2D>
__device__ inline void bwd_zero_tile_rows(Tensor2D&& tile, int first_row, int thread) {
  using Element = typename std::remove_reference_t<Tensor2D>::value_type;
  const int count = (kRows - first_row) * kHeadDim;
  for (int i = opaque_int(thread); i < count; i += 256) {
    tile(first_row + i / kHeadDim, i % kHeadDim) = Element(0);
  }
}

// Writes zeros to dk and dv for padding rows [row_begin, row_end) of k, every kv head.
template <class Traits>
__device__ void bwd_zero_rows(const BwdParams& bp, int row_begin, int row_end, int thread) {
  using Element = typename Traits::Element;
  constexpr int kVec = 16 / sizeof(Element);
  const VarlenProblem& p = bp.p;
  const int chunks_per_head = p.head_dim / kVec;
  const int chunks_per_row = chunks_per_head * p.num_heads_k;
  const int total = (row_end - row_begin) * chunks_per_row;
  Element* dk = static_cast<Element*>(bp.dk);
  Element* dv = static_cast<Element*>(bp.dv);
  for (int i = thread; i < total; i += Traits::kConsumerThreads) {
    const int row = row_begin + i / chunks_per_row;
    const int rem = i % chunks_per_row;
    const int head = rem / chunks_per_head;
    const int col = (rem % chunks_per_head) * kVec;
    *reinterpret_cast<int4*>(dk + row * bp.dk_stride.row + head * bp.dk_stride.head + col) =
        make_int4(0, 0, 0, 0);
    *reinterpret_cast<int4*>(dv + row * bp.dv_stride.row + head * bp.dv_stride.head + col) =
        make_int4(0, 0, 0, 0);
  }
}

// The per-query values (LSE or D) of the queries this thread holds, from the block's rows in
// shared memory: value c belongs to column c of the (keys, queries) accumulator view, whose
// columns come in pairs of adjacent queries (one 8-byte load each). Explicit shared-space
// loads: through a generic pointer they were generic loads, queued behind global traffic
// and waited for on the long scoreboard (ncu: ~10% of the compute warps' stall samples).
// Issued where called, so the caller can start them before it waits for a product.
// kQueryRows (BwdTraits::kDkvT): a (queries, keys) view; value r belongs to row r.
// bwd_query_pair: the pair of columns c and c + 1 alone (c even), for callers that read them
// one pair at a time to keep registers free.
template <class Coord>
__device__ inline float2 bwd_query_pair(const float* rows, const Coord& coord, int c) {
  return ld_shared_f32x2(smem_address(rows + get<1>(coord(0, c))));
}
template <bool kQueryRows = false, class Coord>
__device__ inline auto bwd_load_query_values(const float* rows, const Coord& coord) {
  if constexpr (kQueryRows) {
    constexpr int kRows = decltype(size<0>(coord))::value;
    cute::array<float, kRows> values;
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < kRows; ++r) {
      asm volatile("ld.shared.f32 %0, [%1];"
                   : "=f"(values[r])
                   : "r"(smem_address(rows + get<0>(coord(r, 0))))
                   : "memory");
    }
    return values;
  } else {
    constexpr int kCols = decltype(size<1>(coord))::value;
    static_assert(kCols % 2 == 0, "accumulator columns come in pairs");
    cute::array<float, kCols> values;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; c += 2) {
      const float2 v = bwd_query_pair(rows, coord, c);
      values[c] = v.x;
      values[c + 1] = v.y;
    }
    return values;
  }
}

// The query and the key of element (r, c) of an accumulator's (rows, cols) coordinate view:
// (keys, queries), or (queries, keys) with BwdTraits::kDkvT; and the index of its query's
// value among bwd_load_query_values'.
template <class Traits, class Coord>
__device__ inline int coord_query(const Coord& coord, int r, int c) {
  return get<Traits::kDkvT ? 0 : 1>(coord(r, c));
}
template <class Traits, class Coord>
__device__ inline int coord_key(const Coord& coord, int r, int c) {
  return get<Traits::kDkvT ? 1 : 0>(coord(r, c));
}
template <class Traits>
__device__ inline int query_value_index(int r, int c) {
  return Traits::kDkvT ? r : c;
}

// Stage "P": S^T (this warpgroup's keys x the block's queries, fp32; kDkvT: S) becomes
// P^T = exp2(S^T * scale_log2 - LSE) in place, exactly 0 (by select) where the mask forbids
// the pair or the query is at or past Lq. scores / coord: (keys, queries) views of the
// accumulator and of its coordinates (kDkvT: (queries, keys)); lse: the LSE of each query
// (bwd_load_query_values).
// Softcap (kSoftcap): P^T = exp2(t * scale_log2 - LSE) with t = tanh(S^T * softcap_scale);
// kSoftcapInP: P^T goes to p_in (the (keys, queries) view of its input-precision copy) and
// the accumulator keeps P^T (1 - t^2); the LSE is read from shared memory (lse_rows, the
// block's rows) a column pair at a time, as bwd_ds does (the whole block's, 16 registers,
// spilled beside t, P^T and 1 - t^2).
template <class Traits, class Scores, class Coord, class Values, class PIn>
__device__ inline void bwd_probabilities(Scores& scores, const Coord& coord, const Values& lse,
                                         const MaskInfo& mask, int m0, int n0,
                                         float scale_log2, float softcap_scale, PIn& p_in,
                                         const float* lse_rows) {
  constexpr int kCols = decltype(size<1>(scores))::value;
  using Element = typename Traits::Element;
  float2 lse_pair = make_float2(0.f, 0.f);  // kSoftcapInP: column c's pair
  auto next_column = [&](int c) {
    if constexpr (Traits::kSoftcapInP) {
      if (c % 2 == 0) lse_pair = bwd_query_pair(lse_rows, coord, c);
    }
  };
  // The score of (r, c), capped: t (kSoftcap) or S^T itself.
  auto capped = [&](int r, int c) {
    return Traits::kSoftcap ? tanh_approx(scores(r, c) * softcap_scale) : scores(r, c);
  };
  auto prob = [&](int r, int c, float t) {
    const float row_lse = !Traits::kSoftcapInP ? lse[query_value_index<Traits>(r, c)]
                          : c % 2 == 0         ? lse_pair.x
                                               : lse_pair.y;
    return exp2f(t * scale_log2 - row_lse);
  };
  auto store = [&](int r, int c, float pv, float t) {
    if constexpr (Traits::kSoftcapInP) {
      p_in(r, c) = Element(pv);
      scores(r, c) = pv * fmaf(-t, t, 1.f);
    } else {
      scores(r, c) = pv;
    }
  };
  if (mask.block_fully_allowed(m0, m0 + Traits::kBlockM, n0, n0 + Traits::kBlockN)) {
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      next_column(c);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < size<0>(scores); ++r) {
        const float t = capped(r, c);
        store(r, c, prob(r, c, t), t);
      }
    }
  } else {
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < kCols; ++c) {
      next_column(c);
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < size<0>(scores); ++r) {
        const int j = n0 + coord_key<Traits>(coord, r, c);
        const int i = m0 + coord_query<Traits>(coord, r, c);
        const float t = capped(r, c);
        const float pv = prob(r, c, t);
        store(r, c, i < mask.len_q && mask.allowed(i, j) ? pv : 0.f, t);
      }
    }
  }
}

// Stage "dS": dS^T = P^T (dP^T - D) in place of dP^T (kDkvT: dS, dP). When the tile holds
// keys past Lk (keys_real false), V rows there are not zero-filled, so dP^T may hold
// anything there: P^T == 0 selects 0 and it never enters. Otherwise every dP^T is finite (dO
// rows past Lq are zero-filled, D is 0 there), masked pairs give 0 * finite = 0, and the
// select's two instructions per element are skipped (they sit between the dP wait and the dS
// hand-off). dpt and p: (keys, queries) views of the dP^T and P^T accumulators (kDkvT:
// (queries, keys)); dpsum: D of each query (bwd_load_query_values).
// Softcap (kSoftcap, unless kSoftcapInP has folded it into P^T already): dS^T also takes the
// cap's derivative 1 - t^2, with t recovered from P^T (t = log2 P^T / scale_log2 + LSE /
// scale_log2, one FFMA; clamped at -1 so that P^T = 0 gives 0): one MUFU.LG2 per element
// instead of t kept in registers through the dP wait (D=64 spilled 1.2 KB). The LSE comes
// from shared memory (lse_rows, the block's rows) a column pair at a time: loaded as a whole
// beforehand it spilled too (kDkvT: two per thread, from lse). scale_log2: the softcap's
// c log2 e.
template <class Traits, class DP, class P, class Values, class Coord>
__device__ inline void bwd_ds(DP& dpt, const P& p, const Values& dpsum, bool keys_real,
                              const float* lse_rows, const Coord& coord, float scale_log2,
                              const Values& lse) {
  // kSoftcapInP: p already holds P^T (1 - t^2).
  constexpr bool kRecoverT = Traits::kSoftcap && !Traits::kSoftcapInP;
  const float inv_scale_log2 = 1.f / scale_log2;
  float lse_scaled[Traits::kDkvT ? decltype(size<0>(dpt))::value : 1];  // kDkvT: per row
  if constexpr (kRecoverT && Traits::kDkvT) {
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < size<0>(dpt); ++r) lse_scaled[r] = lse[r] * inv_scale_log2;
  }
  // kSelect: P^T == 0 selects 0 (keys past Lk, see above).
  auto run = [&](auto select) {
    constexpr bool kSelect = decltype(select)::value;
    CUTLASS_PRAGMA_UNROLL
    for (int c = 0; c < size<1>(dpt); c += 2) {
      // The LSE of the pair's queries over scale_log2 (t = log2 P^T / scale_log2 + that).
      float2 lse_pair = make_float2(0.f, 0.f);
      if constexpr (kRecoverT && !Traits::kDkvT) {
        lse_pair = bwd_query_pair(lse_rows, coord, c);
        lse_pair = make_float2(lse_pair.x * inv_scale_log2, lse_pair.y * inv_scale_log2);
      }
      CUTLASS_PRAGMA_UNROLL
      for (int cc = c; cc < c + 2; ++cc) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < size<0>(dpt); ++r) {
          const float pv = p(r, cc);
          float factor = pv;
          if constexpr (kRecoverT) {
            const float row_lse = Traits::kDkvT ? lse_scaled[r]
                                                : (cc == c ? lse_pair.x : lse_pair.y);
            // Only the lower clamp matters: above 1, t exceeds it by rounding only and
            // 1 - t^2 stays within rounding of 0.
            const float t = fmaxf(fmaf(__log2f(pv), inv_scale_log2, row_lse), -1.f);
            factor = pv * fmaf(-t, t, 1.f);
          }
          const float ds = factor * (dpt(r, cc) - dpsum[query_value_index<Traits>(r, cc)]);
          dpt(r, cc) = !kSelect || pv != 0.f ? ds : 0.f;
        }
      }
    }
  };
  if (keys_real) {
    run(cute::false_type{});
  } else {
    run(cute::true_type{});
  }
}

// Epilogue: dK (scaled) and dV of the tile's key rows below Lk (`rows`), summed over the
// group's query heads, in 16-byte stores (store_row_16b: 16 per thread instead of 64 pair
// stores, which filled the global store queue: ncu, full 2k D=128, "lg" throttle on 9% of
// all stall samples). tdKrdK / tdVrdV: the (keys, D) accumulators of this warpgroup's keys;
// tdKcdK: their coordinates in the (kBlockN, D) tile; key0: the tile's first row of k. Row
// strides are multiples of 8 elements (validation.py), so every chunk is 16-byte aligned.
template <class Traits, class Acc, class Coord>
__device__ inline void bwd_store_dkv(const BwdParams& bp, Acc& tdKrdK, Acc& tdVrdV,
                                     const Coord& tdKcdK, int64_t key0, int head_k, int rows) {
  using Element = typename Traits::Element;
  Tensor dk_acc = make_tensor(tdKrdK.data(), accum_rowcol(tdKrdK.layout()));  // (keys, D)
  Tensor dv_acc = make_tensor(tdVrdV.data(), accum_rowcol(tdVrdV.layout()));
  Tensor coord = make_tensor(tdKcdK.data(), accum_rowcol(tdKcdK.layout()));
  constexpr int kCols = decltype(size<1>(dk_acc))::value;
  Element* dk_tile = static_cast<Element*>(bp.dk) + key0 * bp.dk_stride.row +
                     head_k * bp.dk_stride.head;
  Element* dv_tile = static_cast<Element*>(bp.dv) + key0 * bp.dv_stride.row +
                     head_k * bp.dv_stride.head;
  const float scale = bp.p.softmax_scale;
  const int lane = threadIdx.x % 32;
  // The warpgroup's first column: 0, or D/2 where the warpgroups split the head dim
  // (kSplitD); store_row_16b's columns count from there. A thread's first column is at most 6
  // past it.
  const int col0 = Traits::kSplitD ? get<1>(coord(0, 0)) & ~7 : 0;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < size<0>(dk_acc); ++r) {
    const int row = get<0>(coord(r, 0));
    Element* dk_row = dk_tile + row * bp.dk_stride.row + col0;
    Element* dv_row = dv_tile + row * bp.dv_stride.row + col0;
    store_row_16b<kCols>(
        lane, [&](int c) { return pack_pair<Element>(dk_acc(r, c) * scale, dk_acc(r, c + 1) * scale); },
        [&](int col, uint4 chunk) {
          if (row < rows) st_global_16b(dk_row + col, chunk);
        });
    store_row_16b<kCols>(
        lane, [&](int c) { return pack_pair<Element>(dv_acc(r, c), dv_acc(r, c + 1)); },
        [&](int col, uint4 chunk) {
          if (row < rows) st_global_16b(dv_row + col, chunk);
        });
  }
}

// Epilogue of kDkvT tiles: dK^T (scaled) and dV^T, (D, keys) accumulators, transposed by
// stmatrix into the K and V tiles ((keys, D), which every product of the tile has finished
// reading), then copied out in 16-byte chunks, rows below Lk (`rows`) only. The caller
// releases K and V afterwards.
template <class Traits, class TiledMma, class Acc>
__device__ void bwd_store_dkv_staged(const BwdParams& bp, TiledMma& mma_dkv, Acc& tdKrdK,
                                     Acc& tdVrdV, typename Traits::SharedStorage& ss,
                                     int64_t key0, int head_k, int rows, int thread) {
  using Element = typename Traits::Element;
  constexpr int kChunks = Traits::kHeadDim / 8;  // 16-byte chunks per row
  bwd_consumers_sync();  // both warpgroups' products are done with K and V
  auto copy_dkv = make_tiled_copy_C(Copy_Atom<SM90_U16x8_STSM_T, Element>{}, mma_dkv);
  auto thr_copy = copy_dkv.get_thread_slice(thread);
  auto stage_tile = [&](Acc& acc, Element* tile, float scale) {
    Tensor converted = make_tensor_like<Element>(acc);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(acc); ++i) converted(i) = Element(acc(i) * scale);
    Tensor st = make_tensor(make_smem_ptr(tile), typename Traits::SmemLayoutKt{});  // (D, N)
    copy(copy_dkv, thr_copy.retile_S(converted), thr_copy.partition_D(st));
  };
  stage_tile(tdKrdK, ss.k.data(), bp.p.softmax_scale);
  stage_tile(tdVrdV, ss.v.data(), 1.f);
  bwd_consumers_sync();
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});  // (N, D)
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutK{});
  Element* dk = static_cast<Element*>(bp.dk) + key0 * bp.dk_stride.row + head_k * bp.dk_stride.head;
  Element* dv = static_cast<Element*>(bp.dv) + key0 * bp.dv_stride.row + head_k * bp.dv_stride.head;
  const int count = min(rows, Traits::kBlockN) * kChunks;
  for (int i = thread; i < count; i += Traits::kConsumerThreads) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    st_global_16b(dk + row * bp.dk_stride.row + col, *reinterpret_cast<const uint4*>(&sK(row, col)));
    st_global_16b(dv + row * bp.dv_stride.row + col, *reinterpret_cast<const uint4*>(&sV(row, col)));
  }
  // The next tile's K and V are written by TMA (the async proxy) over these generic writes.
  cutlass::arch::fence_view_async_shared();
}

// kDkvT tiles that no query block sees: dK and dV rows below Lk (`rows`) are zeros.
template <class Traits>
__device__ void bwd_zero_dkv_tile(const BwdParams& bp, int64_t key0, int head_k, int rows,
                                  int thread) {
  using Element = typename Traits::Element;
  constexpr int kChunks = Traits::kHeadDim / 8;
  Element* dk = static_cast<Element*>(bp.dk) + key0 * bp.dk_stride.row + head_k * bp.dk_stride.head;
  Element* dv = static_cast<Element*>(bp.dv) + key0 * bp.dv_stride.row + head_k * bp.dv_stride.head;
  const int count = min(rows, Traits::kBlockN) * kChunks;
  for (int i = thread; i < count; i += Traits::kConsumerThreads) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    st_global_16b(dk + row * bp.dk_stride.row + col, make_uint4(0, 0, 0, 0));
    st_global_16b(dv + row * bp.dv_stride.row + col, make_uint4(0, 0, 0, 0));
  }
}

// Stores this thread's dQ fragment into a dQ buffer in fragment order (bwd_dq_accum_offset):
// warpgroup g's (64, kDqCols) share is floats [g * 64 kDqCols, (g + 1) * 64 kDqCols), and
// the fragment's float4 j (rows r and r + 8, columns 8 j + 2 (lane % 4) and + 1) of the
// warpgroup's thread t sits at float j * 512 + 4 t of it. One 16-byte store per float4 from
// one base: consecutive threads write consecutive 16 bytes, so a warp's store is 4 wavefronts
// with no bank conflict and no per-store address math (the row-major layout took 16 STS.64
// and 8 address registers per thread; FA4 hands dQ over the same way).
// Shared-space stores: through a generic pointer the compiler emits generic stores, which
// queue behind global memory traffic (ncu: LG-throttle stalls on them).
template <class Traits, class Acc>
__device__ inline void bwd_store_dq(const Acc& tdQrdQ, float* buffer) {
  // tdQrdQ: ((2, 2, kDqCols / 8), 1, 1), one m64nN accumulator in register order.
  static_assert(decltype(size(tdQrdQ))::value == Traits::kDqCols / 2,
                "a thread holds one m64 accumulator of its warpgroup's dQ columns");
  // This thread among the kDqThreads that hold dQ (the compute threads are 128 ..), read
  // here and opaque so that the base is derived per block: hoisted, it stays live through
  // the main loop (D=64's window kernels spilled).
  const int t = (opaque_int(threadIdx.x) - 128) % Traits::kDqThreads;
  const uint32_t base =
      smem_address(buffer) + (t / 128 * 64 * Traits::kDqCols + 4 * (t % 128)) * sizeof(float);
  CUTLASS_PRAGMA_UNROLL
  for (int j = 0; j < Traits::kDqCols / 8; ++j) {
    st_shared_f32x4(base + j * 512 * sizeof(float),
                    make_float4(tdQrdQ(4 * j), tdQrdQ(4 * j + 1), tdQrdQ(4 * j + 2),
                                tdQrdQ(4 * j + 3)));
  }
}

// The A (kA) or B operand fragment of a tensor for an MMA's thread slice.
template <bool kA, class Slice, class T>
__device__ inline auto operand_fragment(Slice& slice, T&& tensor) {
  if constexpr (kA) {
    return slice.partition_fragment_A(tensor);
  } else {
    return slice.partition_fragment_B(tensor);
  }
}

// Stage "dV": P^T (fp32 accumulator tSrS) converted to the input type (tPrP, viewed as the
// register A operand tPrP_a; kSoftcapInP: already there), then dV += P^T dO issued; the
// caller waits for it.
template <class Traits, class TiledMma, class AccS, class FragP, class FragPA, class FragB,
          class AccdV>
__device__ inline void bwd_issue_dv(TiledMma& mma_dkv, const AccS& tSrS, FragP& tPrP,
                                    FragPA& tPrP_a, const FragB& tdVrdOt, AccdV& tdVrdV) {
  using Element = typename FragP::value_type;
  if constexpr (!Traits::kSoftcapInP) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tPrP(i) = Element(tSrS(i));
  }
  bwd_gemm_issue<false>(mma_dkv, tPrP_a, tdVrdOt, tdVrdV);
}

template <class Traits>
__device__ void bwd_consumer(const BwdKernelParams<Traits>& params,
                             typename Traits::SharedStorage& ss) {
  static_assert(kExtendedGmmaShapes || !Traits::kDkvT,
                "D = 192's N = 48 products need CuTe's extended wgmma shapes (gemm.h): its "
                "instantiation files define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED");
  const auto [num_block_tiles, num_tiles] = bwd_tile_counts(params.bp, params.ws);
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  const BwdParams& bp = params.bp;
  const BwdWorkspace& ws = params.ws;
  const VarlenProblem& p = bp.p;
  const WorkRecord* records = schedule_records(ws.schedule);
  const int num_blocks = schedule_counts(ws.schedule)->num_blocks;
  const int zero_offset = schedule_counts(ws.schedule)->zero_offset;
  const int thread = threadIdx.x - 128;  // 0 .. 255
  const int group = p.num_heads / p.num_heads_k;

  // Tiles zero-filled with ordinary stores (the products use descriptors made in the loop).
  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});

  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmadKV mma_dkv;
  typename Traits::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(thread);
  auto thr_dkv = mma_dkv.get_thread_slice(thread);
  // Slices for the smem operand descriptors, which depend only on the warpgroup: from its
  // warp-uniform index, the descriptors are built in uniform registers (warp_uniform; from
  // threadIdx: 48 R2UR per block step, ncu: 1.5 times FA4's instructions per HGMMA).
  const int warpgroup = warp_uniform(thread / 128);
  const int wg_thread0 = warpgroup * 128;
  auto desc_sdp = mma_sdp.get_thread_slice(wg_thread0);
  auto desc_dkv = mma_dkv.get_thread_slice(wg_thread0);
  auto desc_dq = mma_dq.get_thread_slice(Traits::kDqSingleWg ? 0 : wg_thread0);
  // Whether this thread's warpgroup computes dQ (kDqSingleWg).
  const bool dq_here = !Traits::kDqSingleWg || warpgroup == Traits::kDqWarpgroup;

  // dS^T goes to smem with stmatrix: in the (keys, queries) view the queries are contiguous,
  // i.e. the accumulator's rows are stored row-major (the non-transposed stmatrix); kDkvT's
  // (queries, keys) accumulator is stored transposed to the same layout.
  using StsmPdS = conditional_t<Traits::kDkvT, SM90_U16x8_STSM_T, SM90_U32x4_STSM_N>;
  auto copy_ds = make_tiled_copy_C(Copy_Atom<StsmPdS, Element>{}, mma_sdp);
  auto thr_copy_ds = copy_ds.get_thread_slice(thread);

  // dQ: this warpgroup's half of the (M, D) block (rows or columns, see TiledMmadQ).
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  static_assert(decltype(size(tdQrdQ))::value * Traits::kDqThreads == kBlockM * kHeadDim);

  // Accumulators: S^T / P^T and dP^T / dS^T (this warpgroup's 64 keys x M queries),
  // dV and dK (64 keys x D), fp32. kDkvT: S / P and dP / dS (64 queries x the warpgroup's 48
  // keys), dV^T and dK^T (D x 48 keys).
  Tensor tSrS = partition_fragment_C(mma_sdp, select<0, 1>(typename Traits::TileShapeSdP{}));
  Tensor tdPrdP = partition_fragment_C(mma_sdp, select<0, 1>(typename Traits::TileShapeSdP{}));
  Tensor tdVrdV = partition_fragment_C(mma_dkv, select<0, 1>(typename Traits::TileShapedKV{}));
  Tensor tdKrdK = partition_fragment_C(mma_dkv, select<0, 1>(typename Traits::TileShapedKV{}));
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapeSdP{})));
  Tensor tdKcdK = thr_dkv.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapedKV{})));
  // (keys, queries) views; kDkvT: (queries, keys).
  Tensor scores = make_tensor(tSrS.data(), accum_rowcol(tSrS.layout()));
  Tensor dpt = make_tensor(tdPrdP.data(), accum_rowcol(tdPrdP.layout()));
  Tensor scores_coord = make_tensor(tScS.data(), accum_rowcol(tScS.layout()));
  // P^T and dS^T in the input precision, laid out as register A operands.
  Tensor tPrP = make_tensor_like<Element>(tSrS);
  Tensor tPrP_a = make_tensor(tPrP.data(), accum_as_operand_a(tPrP.layout()));
  Tensor p_in = make_tensor(tPrP.data(), accum_rowcol(tPrP.layout()));  // as `scores`
  Tensor tdSrdS = make_tensor_like<Element>(tdPrdP);
  Tensor tdSrdS_a = make_tensor(tdSrdS.data(), accum_as_operand_a(tdSrdS.layout()));
  Tensor tdSrdS_copy = thr_copy_ds.retile_S(tdSrdS);  // (CPY, CPY_M, CPY_N)
  // This thread's stmatrix destinations, derived once: per block, from the opaque base the
  // descriptors use, each took a 64-bit swizzle computation (about 30 instructions a block).
  Tensor tdSsdS = thr_copy_ds.partition_D(make_tensor(
      make_smem_ptr(ss.ds.data()),
      typename Traits::SmemLayoutPdSAcc{}));  // (CPY, CPY_M, CPY_N, kDsBuffers)

  int stage = 0;
  uint32_t full_phase = 0;
  int kv_loads = 0;
  int ds_buffer = 0;
  uint32_t ds_free_phase = 1;  // kDsBuffers == 1: the first dS write does not wait
  int dq_buffer = 0;
  uint32_t dq_empty_phase = 1;  // the first pass over the buffers does not wait
  // Stage "dQ hand-off": dQ (unscaled; the postprocess scales) to shared memory for the
  // writer, once it has read the previous block out.
  auto hand_off_dq = [&] {
    wait_barrier(&ss.dq_empty[dq_buffer], dq_empty_phase);
    bwd_store_dq<Traits>(tdQrdQ, ss.dq[dq_buffer]);
    cutlass::arch::fence_view_async_shared();  // generic writes before the bulk reads
    cutlass::arch::ClusterBarrier::arrive(&ss.dq_full[dq_buffer]);
    if (++dq_buffer == Traits::kDqBuffers) {
      dq_buffer = 0;
      dq_empty_phase ^= 1;
    }
  };
  // The block's products are done with the stage's Q and dO: the producer may reload it.
  auto release_stage = [&] {
    cutlass::arch::ClusterBarrier::arrive(&ss.qdo_empty[stage]);
    if (++stage == Traits::kStages) {
      stage = 0;
      full_phase ^= 1;
    }
  };

  // Stage "P, dS hand-off" (kPInSmem): both in the input precision to shared memory (tPsP,
  // tdSsdS: this thread's part of the tiles, SmemLayoutPdSAcc), once both warpgroups'
  // products of the previous block have read them. The caller then waits for this
  // warpgroup's stores alone (bwd_warpgroup_sync) or for both halves (the meeting).
  auto store_p_ds = [&](auto&& tPsP, auto&& tdSsdS) {
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tSrS); ++i) tPrP(i) = Element(tSrS(i));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tdPrdP); ++i) tdSrdS(i) = Element(tdPrdP(i));
    wait_barrier(&ss.ds_free, ds_free_phase);
    ds_free_phase ^= 1;
    copy(copy_ds, thr_copy_ds.retile_S(tPrP), tPsP(_, _, _, 0));
    copy(copy_ds, tdSrdS_copy, tdSsdS(_, _, _, 0));
    cutlass::arch::fence_view_async_shared();
  };

  for (int k = 0;; ++k) {
    // The record comes from global memory, not through the hand-off: the producer warp has
    // 24 registers, too few to hold it across the hand-off (D=128 spilled), and a backward
    // tile is long enough that one load per tile does not matter.
    const int tile = Traits::Handoff::receive(ss.handoff, k);
    Traits::Handoff::release(ss.handoff, k);
    if (tile >= num_tiles) break;
    if (tile >= num_block_tiles) {
      const WorkRecord rec = load_record(records, zero_offset + (tile - num_block_tiles));
      bwd_zero_rows<Traits>(bp, rec.q_start, rec.k_start, thread);
      continue;
    }
    const int head_k = tile / num_blocks;
    const WorkRecord rec = load_record(records, tile - head_k * num_blocks);
    const MaskInfo mask = record_mask<Traits::kWindow>(rec, p);
    const QueryRange range = bwd_query_range<Traits>(rec, mask);
    const int n0 = rec.block * kBlockN;
    const bool keys_real = n0 + kBlockN <= mask.len_k;  // no key of the tile is past Lk

    clear(tdVrdV);
    clear(tdKrdK);
    if (range.m_begin < range.m_end) {
      cutlass::arch::ClusterTransactionBarrier::wait(&ss.kv_full, kv_loads & 1);
      if (n0 + kBlockN > mask.len_k) {
        // Keys past Lk: their dS columns are exactly 0, but dQ = dS K multiplies them.
        bwd_zero_tile_rows<kBlockN, kHeadDim>(sK, mask.len_k - n0, thread);
        cutlass::arch::fence_view_async_shared();
        bwd_consumers_sync();
      }
      for (int h = head_k * group; h < (head_k + 1) * group; ++h) {
        const QueryOrder order = bwd_query_order<Traits>(rec, range, bp.deterministic);
        for (int step = 0; step < order.count(); ++step) {
          const int m0 = order.at(step) * kBlockM;
          // wgmma smem descriptors, derived here from an opaque base each iteration: hoisted
          // out of the loop, the ~50 64-bit descriptors of the five products do not fit in
          // registers next to the dK and dV accumulators.
          typename Traits::SharedStorage& so = *opaque_pointer(&ss);
          Tensor oQ = make_tensor(make_smem_ptr(so.q.data()), typename Traits::SmemLayoutQ{});
          Tensor oQt = make_tensor(make_smem_ptr(so.q.data()), typename Traits::SmemLayoutQt{});
          Tensor odO = make_tensor(make_smem_ptr(so.dout.data()), typename Traits::SmemLayoutQ{});
          Tensor odOt = make_tensor(make_smem_ptr(so.dout.data()), typename Traits::SmemLayoutQt{});
          Tensor oK = make_tensor(make_smem_ptr(so.k.data()), typename Traits::SmemLayoutK{});
          Tensor oKt = make_tensor(make_smem_ptr(so.k.data()), typename Traits::SmemLayoutKt{});
          Tensor oV = make_tensor(make_smem_ptr(so.v.data()), typename Traits::SmemLayoutK{});
          Tensor odS = make_tensor(make_smem_ptr(so.ds.data()), typename Traits::SmemLayoutdS{});
          Tensor odSt = make_tensor(make_smem_ptr(so.ds.data()), typename Traits::SmemLayoutdSt{});
          Tensor tPsP = thr_copy_ds.partition_D(make_tensor(
              make_smem_ptr(so.p.data()), typename Traits::SmemLayoutPdSAcc{}));  // kPInSmem
          // S^T and dP^T: A = this warpgroup's K / V rows, B = Q / dO (per stage); dV / dK:
          // B = dO^T / Q^T. kDkvT the other way round: S and dP with A = Q / dO, B = the
          // warpgroup's K / V rows; dV^T / dK^T with A = dO^T / Q^T.
          constexpr bool kT = Traits::kDkvT;
          Tensor tSrK = operand_fragment<!kT>(desc_sdp, oK);
          Tensor tSrV = operand_fragment<!kT>(desc_sdp, oV);
          Tensor tSrQ = operand_fragment<kT>(desc_sdp, oQ);  // (MMA, MMA_N or M, MMA_K, stages)
          Tensor tSrdO = operand_fragment<kT>(desc_sdp, odO);
          Tensor tdVrdOt = operand_fragment<kT>(desc_dkv, odOt);  // (MMA, MMA_N or M, MMA_K, stages)
          Tensor tdKrQt = operand_fragment<kT>(desc_dkv, oQt);
          Tensor tdQrdS = desc_dq.partition_fragment_A(odS);  // (MMA, MMA_M, MMA_K, kDsBuffers)
          Tensor tdQrK = desc_dq.partition_fragment_B(oKt);   // (MMA, MMA_N, MMA_K)
          // Stage "load": Q, dO, LSE and D of the block landed (producer).
          cutlass::arch::ClusterTransactionBarrier::wait(&ss.qdo_full[stage], full_phase);
          if (m0 + kBlockM > mask.len_q) {
            // Queries past Lq: P and dS rows are exactly 0, but dV = P^T dO and
            // dK = dS^T Q multiply their dO and Q rows.
            bwd_zero_tile_rows<kBlockM, kHeadDim>(sQ(_, _, stage), mask.len_q - m0, thread);
            bwd_zero_tile_rows<kBlockM, kHeadDim>(sdO(_, _, stage), mask.len_q - m0, thread);
            cutlass::arch::fence_view_async_shared();
            bwd_zero_fill_sync();
          }
          if constexpr (Traits::kDkvT) {
            // D = 192 (BwdTraits::kDkvT). Stage "S, dP": the block's 64 queries against this
            // warpgroup's 48 keys; P is computed as soon as S lands.
            // The LSE loads first, as at D <= 128 (behind the products' operand reads
            // otherwise).
            const auto lse = bwd_load_query_values<true>(so.lse[stage], scores_coord);
            bwd_gemm_issue<true>(mma_sdp, tSrQ(_, _, _, stage), tSrK, tSrS);
            bwd_gemm_issue<true>(mma_sdp, tSrdO(_, _, _, stage), tSrV, tdPrdP);
            warpgroup_wait<1>();
            fence_after_wait(tSrQ, tSrS);
            bwd_probabilities<Traits>(scores, scores_coord, lse, mask, m0, n0, params.scale_log2,
                                      params.softcap_scale, p_in, so.lse[stage]);
            const auto dpsum = bwd_load_query_values<true>(so.dpsum[stage], scores_coord);
            warpgroup_wait<0>();  // dP landed
            fence_after_wait(tSrdO, tdPrdP);
            bwd_ds<Traits>(dpt, scores, dpsum, keys_real, so.lse[stage], scores_coord,
                           params.scale_log2, lse);
            // This warpgroup's 48 key columns of P and dS, transposed to the
            // queries-contiguous tiles.
            store_p_ds(tPsP, tdSsdS);
            bwd_warpgroup_sync(warpgroup);
            Tensor oPt = make_tensor(make_smem_ptr(so.p.data()), typename Traits::SmemLayoutdSt{});
            // Stage "dV, dK, dQ": dV^T and dK^T of this warpgroup's keys (B = its own P / dS
            // columns, K-major in the (keys, queries) view), issued before the meeting, so that
            // they run while the warpgroup waits there for the other's half of dS; then its
            // half of dQ's head dim, over all 96 keys. The stage's Q and dO are released as
            // soon as dV^T and dK^T are done, so that the producer loads the next block's
            // while dQ runs and is handed off.
            Tensor tdVrP = desc_dkv.partition_fragment_B(oPt);    // (MMA, MMA_N, MMA_K, 1)
            Tensor tdKrdS = desc_dkv.partition_fragment_B(odSt);
            bwd_gemm_issue<false>(mma_dkv, tdVrdOt(_, _, _, stage), tdVrP(_, _, _, 0), tdVrdV);
            bwd_gemm_issue<false>(mma_dkv, tdKrQt(_, _, _, stage), tdKrdS(_, _, _, 0), tdKrdK);
            bwd_consumers_sync();
            bwd_gemm_issue<true>(mma_dq, tdQrdS(_, _, _, 0), tdQrK, tdQrdQ);
            warpgroup_wait<1>();  // dV^T and dK^T done: Q, dO and P are free
            warpgroup_fence_operand(tdVrdV);
            warpgroup_fence_operand(tdKrdK);
            release_stage();
            warpgroup_wait<0>();  // dQ done: dS is free
            warpgroup_fence_operand(tdQrdQ);
            cutlass::arch::ClusterBarrier::arrive(&ss.ds_free);
            hand_off_dq();
          } else if constexpr (Traits::kSplitD) {
            // D = 256 (BwdTraits::kSplitD). Stage "S, dP": this warpgroup's 32 queries
            // against the tile's 64 keys; P^T is computed as soon as S^T lands.
            const auto lse = bwd_load_query_values(so.lse[stage], scores_coord);  // first
            bwd_gemm_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
            bwd_gemm_issue<true>(mma_sdp, tSrV, tSrdO(_, _, _, stage), tdPrdP);
            warpgroup_wait<1>();
            fence_after_wait(tSrK, tSrS);
            bwd_probabilities<Traits>(scores, scores_coord, lse, mask, m0, n0, params.scale_log2,
                                      params.softcap_scale, p_in, so.lse[stage]);
            warpgroup_wait<0>();  // dP^T landed
            fence_after_wait(tSrV, tdPrdP);
            bwd_ds<Traits>(dpt, scores, bwd_load_query_values(so.dpsum[stage], scores_coord),
                           keys_real, so.lse[stage], scores_coord, params.scale_log2, lse);
            store_p_ds(tPsP, tdSsdS);
            bwd_consumers_sync();  // the products below read both halves
            Tensor oPt = make_tensor(make_smem_ptr(so.p.data()), typename Traits::SmemLayoutdSt{});
            // Stage "dQ, dV, dK": this warpgroup's half of the head dim of each, all three
            // read from shared memory; dQ first, so that it leaves registers for shared memory
            // while dV and dK run.
            Tensor tdVrPt = desc_dkv.partition_fragment_A(oPt);  // (MMA, MMA_M, MMA_K, 1)
            Tensor tdKrdSt = desc_dkv.partition_fragment_A(odSt);
            bwd_gemm_issue<true>(mma_dq, tdQrdS(_, _, _, 0), tdQrK, tdQrdQ);
            bwd_gemm_issue<false>(mma_dkv, tdVrPt(_, _, _, 0), tdVrdOt(_, _, _, stage), tdVrdV);
            bwd_gemm_issue<false>(mma_dkv, tdKrdSt(_, _, _, 0), tdKrQt(_, _, _, stage), tdKrdK);
            warpgroup_wait<2>();  // dQ done
            warpgroup_fence_operand(tdQrdQ);
            hand_off_dq();
            warpgroup_wait<0>();  // dV and dK done: P, dS, Q and dO are free
            warpgroup_fence_operand(tdVrdV);
            warpgroup_fence_operand(tdKrdK);
            cutlass::arch::ClusterBarrier::arrive(&ss.ds_free);
            release_stage();
          } else {
            // Stage "S, dP": both products in flight; P^T is computed as soon as S^T lands.
            // The LSE loads go first: issued after the products, they queue behind the
            // products' shared-memory operand reads.
            const auto lse = bwd_load_query_values(so.lse[stage], scores_coord);
            if constexpr (Traits::kStagger) bwd_stagger_wait(warpgroup);
            bwd_gemm_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
            bwd_gemm_issue<true>(mma_sdp, tSrV, tSrdO(_, _, _, stage), tdPrdP);
            warpgroup_wait<1>();
            fence_after_wait(tSrK, tSrS);
            if constexpr (Traits::kStagger) bwd_stagger_release(warpgroup);

            bwd_probabilities<Traits>(scores, scores_coord, lse, mask, m0, n0, params.scale_log2,
                                      params.softcap_scale, p_in, so.lse[stage]);
            if constexpr (Traits::kDvBeforeDs) {
              const auto dpsum = bwd_load_query_values(so.dpsum[stage], scores_coord);
              // Stage "dV": dV += P^T dO, P^T from registers, runs while dS is computed.
              bwd_issue_dv<Traits>(mma_dkv, tSrS, tPrP, tPrP_a, tdVrdOt(_, _, _, stage), tdVrdV);
              warpgroup_wait<1>();  // dP^T landed; dV += P^T dO may still run
              fence_after_wait(tSrV, tdPrdP);
              bwd_ds<Traits>(dpt, scores, dpsum, keys_real, so.lse[stage], scores_coord,
                             params.scale_log2, lse);
            } else {
              warpgroup_wait<0>();  // dP^T landed
              fence_after_wait(tSrV, tdPrdP);
              // Loaded only now: 32 more live registers before the wait spilled.
              bwd_ds<Traits>(dpt, scores, bwd_load_query_values(so.dpsum[stage], scores_coord),
                             keys_real, so.lse[stage], scores_coord, params.scale_log2, lse);
            }
            CUTLASS_PRAGMA_UNROLL
            for (int i = 0; i < size(tdPrdP); ++i) tdSrdS(i) = Element(tdPrdP(i));
            // Stage "dS hand-off": dS^T to shared memory for dQ = dS K.
            if constexpr (Traits::kDsBuffers == 1) {
              // The other warpgroup may still be multiplying the previous block's dS.
              wait_barrier(&ss.ds_free, ds_free_phase);
              ds_free_phase ^= 1;
            }
            copy(copy_ds, tdSrdS_copy, tdSsdS(_, _, _, ds_buffer));
            cutlass::arch::fence_view_async_shared();
            if constexpr (!Traits::kDvBeforeDs) {
              // Stage "dV" (see kDvBeforeDs), after the dS store: the other warpgroup, waiting at
              // the meeting for this half of dS, is not kept waiting for it; it runs meanwhile.
              bwd_issue_dv<Traits>(mma_dkv, tSrS, tPrP, tPrP_a, tdVrdOt(_, _, _, stage), tdVrdV);
            }
            // Both halves of dS are in smem once both warpgroups are here. kDqSingleWg: only
            // the dQ warpgroup reads the other's half, so the other arrives and goes on (its
            // dK, its next block's S^T) while dQ runs. It cannot arrive twice before the dQ
            // warpgroup has synced once: its next dS store waits on ds_free, which the dQ
            // warpgroup arrives at only after this block's dQ product. (Without kDqSingleWg,
            // dq_here is true for both.)
            if (dq_here) {
              bwd_consumers_sync();
            } else {
              bwd_consumers_arrive();
            }
            // Stage "dQ, dK": dQ before dK, so that dQ leaves registers for shared memory while
            // dK += dS^T Q (dS^T from registers) runs.
            // kDqSingleWg: the warpgroup without dQ issues dK alone (separate paths: with the
            // dQ issue and hand-off under conditions on one path, ptxas serialised the wgmma).
            auto issue_dk = [&] {
              bwd_gemm_issue<false>(mma_dkv, tdSrdS_a, tdKrQt(_, _, _, stage), tdKrdK);
              warpgroup_wait<1>();  // dV (and dQ) done; dK may still run
              fence_after_wait(tPrP_a, tdVrdV);
              warpgroup_fence_operand(tdQrdQ);
              if constexpr (Traits::kDsBuffers == 1) cutlass::arch::ClusterBarrier::arrive(&ss.ds_free);
              if (++ds_buffer == Traits::kDsBuffers) ds_buffer = 0;
            };
            if (dq_here) {
              bwd_gemm_issue<true>(mma_dq, tdQrdS(_, _, _, ds_buffer), tdQrK, tdQrdQ);
              issue_dk();
              hand_off_dq();
            } else {
              issue_dk();
            }
            warpgroup_wait<0>();  // dK done: the stage's Q and dO are free
            fence_after_wait(tdSrdS_a, tdKrdK);
            release_stage();
          }
        }
      }
      ++kv_loads;
      if constexpr (Traits::kDkvT) {
        bwd_store_dkv_staged<Traits>(bp, mma_dkv, tdKrdK, tdVrdV, ss, rec.k_start + int64_t{n0},
                                     head_k, mask.len_k - n0, thread);
      }
      cutlass::arch::ClusterBarrier::arrive(&ss.kv_empty);
    } else if constexpr (Traits::kDkvT) {
      bwd_zero_dkv_tile<Traits>(bp, rec.k_start + int64_t{n0}, head_k, mask.len_k - n0, thread);
    }
    if constexpr (!Traits::kDkvT) {
      bwd_store_dkv<Traits>(bp, tdKrdK, tdVrdV, tdKcdK, rec.k_start + int64_t{n0}, head_k,
                            mask.len_k - n0);
    }
  }
}

// The main kernel (its extern "C" entry point: PREFIXLM_BWD_INSTANCE, bwd_launch.cuh);
// `params` is the entry point's __grid_constant__ parameter (TMA descriptors read in place).
template <class Traits>
__device__ __forceinline__ void bwd_kernel_body(const BwdKernelParams<Traits>& params) {
  using SharedStorage = typename Traits::SharedStorage;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);

  const int warp = cutlass::canonical_warp_idx_sync();
  const int warpgroup = cutlass::canonical_warp_group_idx();
  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_do.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
    cutlass::arch::ClusterTransactionBarrier::init(&ss.kv_full, 1);
    cutlass::arch::ClusterBarrier::init(&ss.kv_empty, Traits::kConsumerThreads);
    for (int b = 0; b < Traits::kDqBuffers; ++b) {
      cutlass::arch::ClusterBarrier::init(&ss.dq_full[b], Traits::kDqThreads);
      cutlass::arch::ClusterBarrier::init(&ss.dq_empty[b], 1);
    }
    for (int j = 0; j < Traits::kDqJobs; ++j) {
      cutlass::arch::ClusterBarrier::init(&ss.job_full[j], 1);
      cutlass::arch::ClusterBarrier::init(&ss.job_empty[j], 1);
    }
    cutlass::arch::ClusterBarrier::init(&ss.ds_free, Traits::kConsumerThreads);
    for (int s = 0; s < Traits::kStages; ++s) {
      // One arrival (the producer leader, after LSE and D are stored) plus the TMA bytes.
      cutlass::arch::ClusterTransactionBarrier::init(&ss.qdo_full[s], 1);
      cutlass::arch::ClusterBarrier::init(&ss.qdo_empty[s], Traits::kConsumerThreads);
    }
    Traits::Handoff::init(ss.handoff);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // barrier initialisation is visible to every warp
  // Launched as the preprocess's programmatic dependent (bwd_launch.cuh): everything above
  // overlapped its last CTAs; from here on the schedule, LSE, D and the cleared dq_semaphore
  // words are complete and visible. The postprocess may launch now: it waits for this
  // whole grid (it cannot become resident beside a CTA of this kernel, which holds the SM's
  // registers, so it takes SMs only as this kernel's CTAs exit).
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");


  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (warp == 0) bwd_producer<Traits>(params, ss);
    if (warp >= 1 && warp <= Traits::kDqWriters && cute::elect_one_sync()) {
      bwd_dq_writer<Traits>(params, ss, warp - 1);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<240>();
    bwd_consumer<Traits>(params, ss);
  }
}

}  // namespace prefixlm
