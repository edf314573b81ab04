// Forward kernel: warp-specialised, persistent, TMA + wgmma (sm_90a).
//
// CTA = 1 + N warpgroups. Warpgroup 0 is the producer: one warp issues TMA loads of Q (once
// per tile) and of K and V (one block per pipeline stage). Warpgroups 1..N are consumers: each
// owns 64 of the tile's 64N query rows (N = 2, or 3 for D=64 outside short causal batches,
// fwd_schedule.h), computes S = Q K^T and O += P V with wgmma, runs the online softmax in
// registers and writes O and LSE. The producer gives registers away (setmaxnreg) so the
// consumers can hold S, P and O. Within a warpgroup, the softmax of key block n runs while
// O += P V of block n+1 is in flight; between warpgroups, turns keep the tensor cores fed.
//
// Work comes from the schedule built by scheduler.cu: (query block, head) tiles, then chunks
// of padding rows that are written as zeros inside this same launch, by the producer
// warpgroup's three spare warps while the consumers compute. CTAs take the tiles dynamically
// (tile_handoff.h) in list order (within a sequence, heaviest causal tiles first); the
// producer hands each over with its work record.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

#include "gemm.h"
#include "mask.h"
#include "params.h"
#include "scheduler.h"
#include "softmax.h"
#include "tile_handoff.h"

namespace prefixlm {

using namespace cute;

// kWindow_: built for a sliding window (the sizes are runtime values; without it they are
// constant -1 and the window's terms fold away, mask.h / record_mask). kSoftcap_: built for
// a softcap (always applied; such kernels also take a window).
template <int kHeadDim_, class Element_, int kBlockM_, int kBlockN_, bool kWindow_ = false,
          bool kSoftcap_ = false>
struct FwdTraits {
  static constexpr bool kWindow = kWindow_;
  static constexpr bool kSoftcap = kSoftcap_;
  static_assert(kWindow || !kSoftcap, "softcap kernels also take the window");
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  // One consumer warpgroup per 64 query rows: 128 or 192 (fwd_schedule.h picks). At D <= 96
  // the products are shorter than D=128's, and a third warpgroup keeps the tensor cores fed
  // while the other two run their softmax; the registers still fit (D=64: S 64 + P 32 + O 32
  // of 160; D=96 with 112 columns: S 56 + P 28 + O 48).
  static constexpr int kBlockM = kBlockM_;
  static_assert(kBlockM == 128 || (kBlockM == 192 && kHeadDim <= 96), "unsupported tile");
  // Key columns per block: 128, or 176 at D=128 for long sequences (fwd_schedule.h): a third
  // fewer iterations per tile, S 88 + P 44 + O 64 registers still without spills. D=256 takes
  // 80: its O holds 128 registers, beside S 40 + P 20; D=192 takes 112, for its K/V stages to
  // fit (216 KB with one Q buffer). D=96's 192-row tiles take 112 (fwd_schedule.h), the
  // widest whose S and P fit in registers beside O: +5% at full 8k and 16k over 192 x 144
  // with P in shared memory, which was bound by shared-memory bandwidth (perf-notes, third
  // sessions of 2026-12-06 and 2026-12-07).
  static constexpr int kBlockN = kBlockN_;
  static_assert(kHeadDim == 256   ? kBlockN == 80
                : kHeadDim == 192 ? kBlockN == 112
                                  : kBlockN == 128 || (kBlockN == 176 && kHeadDim == 128) ||
                                        (kBlockN == 112 && kHeadDim == 96 && kBlockM == 192),
                "unsupported tile");
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kStages = kHeadDim <= 64 ? 4 : 2;
  // The running maximum's O rescale is an FMUL per O element per block whichever row moved;
  // it is skipped for a warp none of whose rows moved its reference (OnlineSoftmax
  // kLazyRescale). Measured +2-11% at D=192 and 256 (D/2 = 96 / 128 multiplies per thread
  // against 56 / 40 exponentials), +1-4% at D=64 to 128 once the softmax ran between the
  // two waits, and +1-4% in the D <= 128 window / softcap kernels (perf-notes, 2026-12-06).
  // Not in those at D=192 and 256: with the window's bounds live too they spilled 36-268 B.
  static constexpr bool kLazyRescale = !kWindow || kHeadDim <= 128;
  // The bf16 softcap kernels at D=192 and 256 also hold a consumer whose softmax takes a
  // fixed reference instead of the running row maximum (fwd_launch.cuh says when;
  // OnlineSoftmax kFixedMax): no FMNMX per score, no row shuffles, and above all no O
  // rescale (see kLazyRescale; 2.4x the exponentials at D=256 with N=80). Measured +6-8%
  // (D=192) and +9-16% (D=256); at D=96 and 128 equal (the rounded row sums cost what the
  // rest saves), at D=64 4% slower. fp16's P range (65504) leaves no room for it.
  static constexpr bool kFixedMaxBuilt =
      kSoftcap && cute::is_same_v<Element_, cutlass::bfloat16_t> && kHeadDim >= 192;
  // Two Q buffers: the next tile's Q loads while this tile finishes and writes its output.
  // 176-column K/V stages leave room for one (208 KB of shared memory), so do D=192's and
  // D=256's (a Q tile of 48 / 64 KB and 112 / 80-key stages: 216 / 224 KB).
  static constexpr int kQBuffers =
      (2 * kStages * kBlockN + 2 * kBlockM) * kHeadDim * int(sizeof(Element)) <= 216 * 1024 ? 2
                                                                                           : 1;
  // setmaxnreg split of the 64K registers: the producer warpgroup keeps 24.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kConsumerWarpgroups == 2 ? 240 : 160;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 + kConsumerThreads;
  // Rows per zero record: a chunk of padding rows, written for every head.
  static constexpr int kZeroRows = 64;

  using TileShapeQK = Shape<Int<kBlockM>, Int<kBlockN>, Int<kHeadDim>>;  // (M, N, D)
  using TileShapePV = Shape<Int<kBlockM>, Int<kHeadDim>, Int<kBlockN>>;  // (M, D, N)
  using AtomLayout = Layout<Shape<Int<kConsumerWarpgroups>, _1, _1>>;    // warpgroups split M
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, TileShapeQK>(), AtomLayout{}));
  // P comes from registers; V^T is read from the V tile, which is row-major (N, D) in smem,
  // i.e. MN-major for this product.
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, TileShapePV, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));

  // 128-byte swizzled tiles where D is a multiple of 64 elements (128 bytes); D = 96 takes
  // 64-byte swizzled ones (three 32-element atoms per row).
  using SmemAtom = KMajorSwizzleAtom<Element, kHeadDim>;
  using SmemLayoutQ = decltype(tile_to_shape(
      SmemAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kQBuffers>>{}));  // (M, D, buffers)
  using SmemLayoutKV = decltype(tile_to_shape(
      SmemAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));  // (N, D, stages)
  // The same V bytes seen as (D, N, stages) for the PV product.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_ordered_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                          Step<_2, _1, _3>{})));

  // Global tensors as TMA sees them: (rows, D, heads), rows and heads strided.
  using GmemShape = Shape<int32_t, int32_t, int32_t>;
  using GmemStride = Stride<int64_t, _1, int64_t>;
  using GmemTensor = decltype(make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)),
                                          GmemShape{}, GmemStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{}, take<0, 2>(SmemLayoutQ{}),
                                      Shape<Int<kBlockM>, Int<kHeadDim>>{}, _1{}));
  using TmaKV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GmemTensor{},
                                       take<0, 2>(SmemLayoutKV{}),
                                       Shape<Int<kBlockN>, Int<kHeadDim>>{}, _1{}));

  using PipelineKV = cutlass::PipelineTmaAsync<kStages>;
  using Handoff = TileHandoff<2, kConsumerThreads>;
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
    typename PipelineKV::SharedStorage pipeline_k;
    typename PipelineKV::SharedStorage pipeline_v;
    alignas(8) uint64_t q_full[kQBuffers];   // TMA of Q landed
    alignas(8) uint64_t q_empty[kQBuffers];  // consumers are done reading Q
    typename Handoff::SharedStorage handoff;
    float2 softmax_pin[kConsumerThreads];  // written, never read: see fwd_consumer
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 CTA can have");
};

template <class Traits>
struct FwdKernelParams {
  FwdParams fp;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  const void* schedule;  // workspace written by build_schedule
  int* tile_counter;     // its ScheduleCounts::tile_counter
  float scale_log2;      // log2(e) times softmax_scale, or the softcap (kSoftcap)
  float softcap_scale;   // kSoftcap: softmax_scale / softcap
  bool fixed_max;        // kSoftcap: the softmax's reference is max_capped (fwd_launch.cuh)
  float max_capped;      // in tanh units: 1 - M / softcap
};

// Named barriers (user ids; CUTLASS offsets them past its reserved ones): 0 .. N-1 for the
// turns below, N for all consumer threads. That one is the unaligned form: a warpgroup
// without rows in the tile reaches it from its own copy of the block loop (kIdle), and the
// aligned form requires every thread to execute the same instruction (synccheck: "divergent
// threads").
template <int kWarpgroups>
__device__ inline void consumers_sync() {
  cutlass::arch::NamedBarrier(128 * kWarpgroups, kWarpgroups).arrive_and_wait_unaligned();
}

// Round-robin turns between the N consumer warpgroups (named barriers 0 .. N-1): a
// warpgroup issues its wgmma batch only after the previous one has issued its own, so the
// tensor cores work for one warpgroup while the others run their softmax. Every warpgroup walks
// the same key blocks of the same tile, so the turns always line up. The last warpgroup's
// first arrival opens warpgroup 0's first turn; warpgroup 0 consumes the last warpgroup's final
// arrival after the last tile, so no barrier is left half-arrived at exit.
__device__ inline void wait_my_turn(int consumer_wg) {
  cutlass::arch::NamedBarrier::sync(256, consumer_wg);
}
template <int kWarpgroups>
__device__ inline void pass_turn(int consumer_wg) {
  cutlass::arch::NamedBarrier::arrive(256, (consumer_wg + 1) % kWarpgroups);
}

// Key blocks [n_begin, n_end) of one (query block) tile; none when n_begin >= n_end.
struct KeyRange {
  int n_begin;
  int n_end;
};
template <class Traits>
__device__ inline KeyRange fwd_key_range(const WorkRecord& rec, const MaskInfo& mask) {
  const int row_begin = rec.block * Traits::kBlockM;
  const int row_end = min(row_begin + Traits::kBlockM, rec.len_q);
  return {mask.key_begin(row_begin) / Traits::kBlockN,
          (mask.key_end(row_begin, row_end) + Traits::kBlockN - 1) / Traits::kBlockN};
}

template <class Traits>
__device__ void fwd_producer(const FwdKernelParams<Traits>& params,
                             typename Traits::SharedStorage& ss,
                             typename Traits::PipelineKV& pipeline_k,
                             typename Traits::PipelineKV& pipeline_v, int num_tiles) {
  using Element = typename Traits::Element;
  const VarlenProblem& p = params.fp.p;
  const WorkRecord* records = schedule_records(params.schedule);
  const int num_blocks = schedule_counts(params.schedule)->num_blocks;
  const bool leader = cute::elect_one_sync();

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutKV{});
  // (rows, D, heads) coordinate tensors over the whole packed buffers.
  Tensor mQ = params.tma_q.get_tma_tensor(make_shape(p.total_q, p.head_dim, p.num_heads));
  Tensor mK = params.tma_k.get_tma_tensor(make_shape(p.total_k, p.head_dim, p.num_heads_k));
  Tensor mV = params.tma_v.get_tma_tensor(make_shape(p.total_k, p.head_dim, p.num_heads_k));

  auto write_state = cutlass::make_producer_start_state<typename Traits::PipelineKV>();
  int q_loads = 0;
  const int heads_per_kv = p.num_heads / p.num_heads_k;
  for (int k = 0;; ++k) {
    const int tile = Traits::Handoff::next(params.tile_counter, k);
    const int head = tile / num_blocks;
    WorkRecord rec{};
    if (tile < num_tiles) rec = load_record(records, tile - head * num_blocks);
    Traits::Handoff::publish(ss.handoff, k, tile, &rec);
    if (tile >= num_tiles) break;
    const KeyRange keys = fwd_key_range<Traits>(rec, record_mask<Traits::kWindow>(rec, p));
    if (keys.n_begin >= keys.n_end) continue;  // no key for any row: the consumers write zeros alone
    const int head_k = head / heads_per_kv;

    // Rows past the end of the buffer are zero-filled by TMA; rows past Lq inside it belong
    // to padding or the next slot and are never written back.
    Tensor gQ = local_tile(domain_offset(make_coord(rec.q_start, _0{}), mQ(_, _, head)),
                           Shape<Int<Traits::kBlockM>, Int<Traits::kHeadDim>>{},
                           make_coord(rec.block, _0{}));  // (M, D)
    Tensor gK = local_tile(domain_offset(make_coord(rec.k_start, _0{}), mK(_, _, head_k)),
                           Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{},
                           make_coord(_, _0{}));  // (N, D, key blocks)
    Tensor gV = local_tile(domain_offset(make_coord(rec.k_start, _0{}), mV(_, _, head_k)),
                           Shape<Int<Traits::kBlockN>, Int<Traits::kHeadDim>>{},
                           make_coord(_, _0{}));  // (N, D, key blocks)
    auto [tQg, tQs] = tma_partition(params.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ),
                                    group_modes<0, 2>(gQ));
    auto [tKg, tKs] = tma_partition(params.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK),
                                    group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(params.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV),
                                    group_modes<0, 2>(gV));

    const int q_buf = q_loads % Traits::kQBuffers;
    const int q_use = q_loads / Traits::kQBuffers;  // earlier uses of this buffer
    if (q_use > 0) cutlass::arch::ClusterBarrier::wait(&ss.q_empty[q_buf], (q_use - 1) & 1);
    if (leader) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&ss.q_full[q_buf],
                                                                     Traits::kQBytes);
      copy(params.tma_q.with(ss.q_full[q_buf], 0), tQg, tQs(_, q_buf));
    }
    ++q_loads;
    // Key blocks last-first: the first one visited is the only one that can be partial.
    for (int n = keys.n_end - 1; n >= keys.n_begin; --n) {
      pipeline_k.producer_acquire(write_state);
      if (leader) {
        copy(params.tma_k.with(*pipeline_k.producer_get_barrier(write_state), 0), tKg(_, n),
             tKs(_, write_state.index()));
      }
      pipeline_v.producer_acquire(write_state);
      if (leader) {
        copy(params.tma_v.with(*pipeline_v.producer_get_barrier(write_state), 0), tVg(_, n),
             tVs(_, write_state.index()));
      }
      ++write_state;
    }
  }
}

// Writes zeros to out and -inf to LSE for padding rows [row_begin, row_end), every head,
// with kThreads threads.
template <class Traits, int kThreads>
__device__ void fwd_zero_rows(const FwdParams& fp, int row_begin, int row_end, int thread) {
  using Element = typename Traits::Element;
  constexpr int kVec = 16 / sizeof(Element);
  const VarlenProblem& p = fp.p;
  constexpr int chunks_per_head = Traits::kHeadDim / kVec;
  const int chunks_per_row = chunks_per_head * p.num_heads;
  const int total = (row_end - row_begin) * chunks_per_row;
  Element* out = static_cast<Element*>(fp.out);
  for (int i = thread; i < total; i += kThreads) {
    const int row = row_begin + i / chunks_per_row;
    const int rem = i % chunks_per_row;
    const int head = rem / chunks_per_head;
    const int col = (rem % chunks_per_head) * kVec;
    *reinterpret_cast<int4*>(out + row * fp.o_stride.row + head * fp.o_stride.head + col) =
        make_int4(0, 0, 0, 0);
  }
  const int lse_total = (row_end - row_begin) * p.num_heads;
  for (int i = thread; i < lse_total; i += kThreads) {
    const int head = i / (row_end - row_begin);
    const int row = row_begin + i % (row_end - row_begin);
    fp.softmax_lse[static_cast<int64_t>(head) * p.total_q + row] = -INFINITY;
  }
}

// Zero-fills V rows [first_row, kBlockN) of one stage, shared out over every consumer thread in
// 16-byte stores. Those rows hold keys past Lk (padding, possibly NaN, or the next slot) whose
// probabilities are exactly 0, but 0 * NaN is NaN. The swizzle permutes 16-byte chunks
// within a row, so a chunk of 8 elements stays contiguous. The thread index is opaque so that
// its offsets are derived on this rarely taken path (at D=256, hoisted, they were spilled).
template <class Traits, class TensorV>
__device__ inline void zero_v_rows(TensorV& sV_stage, int first_row, int thread) {
  constexpr int kChunks = Traits::kHeadDim / 8;  // 16-byte chunks per row
  const int count = (Traits::kBlockN - first_row) * kChunks;
  for (int i = opaque_int(thread); i < count; i += Traits::kConsumerThreads) {
    const int row = first_row + i / kChunks;
    *reinterpret_cast<uint4*>(&sV_stage(row, (i % kChunks) * 8)) = make_uint4(0, 0, 0, 0);
  }
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes before wgmma reads them
}

// Epilogue of one tile: O / rowsum in the input precision and the LSE, real rows only
// (padding rows belong to zero records). O in 16-byte stores (store_row_16b). Row strides
// are multiples of 8 elements (validation.py), so every chunk is 16-byte aligned.
template <class Traits, class TensorO, class TensorC, int kRows>
__device__ inline void fwd_store_tile(const FwdParams& fp, const WorkRecord& rec, int head,
                                      TensorO const& acc_o, TensorC const& acc_o_coord,
                                      const float (&inv_sum)[kRows], const float (&lse)[kRows]) {
  using Element = typename Traits::Element;
  constexpr int kCols = decltype(size<1>(acc_o))::value;
  const int m0 = rec.block * Traits::kBlockM;
  const int64_t row_base = rec.q_start + m0;
  Element* out_tile = static_cast<Element*>(fp.out) + row_base * fp.o_stride.row +
                      head * fp.o_stride.head;
  const int lane = threadIdx.x % 32;
  CUTLASS_PRAGMA_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = get<0>(acc_o_coord(r, 0));
    const bool real = m0 + row < rec.len_q;
    Element* out_row = out_tile + row * fp.o_stride.row;
    store_row_16b<kCols>(
        lane,
        [&](int c) { return pack_pair<Element>(acc_o(r, c) * inv_sum[r], acc_o(r, c + 1) * inv_sum[r]); },
        [&](int col, uint4 chunk) {
          if (real) st_global_16b(out_row + col, chunk);
        });
    if (real && get<1>(acc_o_coord(r, 0)) == 0) {
      fp.softmax_lse[static_cast<int64_t>(head) * fp.p.total_q + row_base + row] = lse[r];
    }
  }
}

// One consumer warpgroup: 64 query rows of every tile it receives.
// kFixedMax: the softmax takes params.max_capped as every row's reference (OnlineSoftmax).
template <class Traits, bool kFixedMax>
__device__ void fwd_consumer(const FwdKernelParams<Traits>& params,
                             typename Traits::SharedStorage& ss,
                             typename Traits::PipelineKV& pipeline_k,
                             typename Traits::PipelineKV& pipeline_v, int num_tiles) {
  static_assert(kExtendedGmmaShapes || Traits::kBlockN == 128,
                "this key block needs CuTe's extended wgmma shapes (gemm.h): its instantiation "
                "file defines CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED");
  using Element = typename Traits::Element;
  using PipelineState = cutlass::PipelineState<Traits::kStages>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kWgs = Traits::kConsumerWarpgroups;
  const VarlenProblem& p = params.fp.p;
  const int num_blocks = schedule_counts(params.schedule)->num_blocks;
  const int thread = threadIdx.x - 128;  // 0 .. kConsumerThreads-1
  const int consumer_wg = warp_uniform(thread / 128);

  Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVt{});

  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(thread);
  auto thr_pv = mma_pv.get_thread_slice(thread);
  // Smem operand descriptors depend only on the warpgroup. D=64 and the 192-row tiles derive
  // them from the uniform index (warp_uniform): +3-9% at D=64, and at 160 registers the
  // vector registers they would take are short (D=96's 192 x 144 spilled). D=128 keeps them
  // from threadIdx: with uniform descriptors its causal and PrefixLM cases measured 1.5-2%
  // slower (perf-notes v17).
  const int desc_thread =
      Traits::kHeadDim <= 64 || Traits::kConsumerWarpgroups == 3 ? consumer_wg * 128 : thread;
  auto desc_qk = mma_qk.get_thread_slice(desc_thread);
  auto desc_pv = mma_pv.get_thread_slice(desc_thread);
  Tensor tSrQ = desc_qk.partition_fragment_A(sQ);   // smem descriptors (MMA, MMA_M, MMA_K, buffers)
  Tensor tSrK = desc_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stages)
  Tensor tOrV = desc_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stages)
  // Accumulators: S (this thread's share of 64 x N) and O (of 64 x D), fp32.
  Tensor tSrS = partition_fragment_C(mma_qk, select<0, 1>(typename Traits::TileShapeQK{}));
  Tensor tOrO = partition_fragment_C(mma_pv, select<0, 1>(typename Traits::TileShapePV{}));
  // (row, col) coordinates of every accumulator element inside the tile.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapeQK{})));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(select<0, 1>(typename Traits::TileShapePV{})));
  Tensor scores = make_tensor(tSrS.data(), accum_rowcol(tSrS.layout()));    // (rows, N)
  Tensor scores_coord = make_tensor(tScS.data(), accum_rowcol(tScS.layout()));
  Tensor acc_o = make_tensor(tOrO.data(), accum_rowcol(tOrO.layout()));     // (rows, D)
  Tensor acc_o_coord = make_tensor(tOcO.data(), accum_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(scores))::value;  // 2: rows r and r + 8
  // P in the input precision, laid out as the register A operand of the PV product.
  Tensor tOrP = make_tensor_like<Element>(tSrS);
  Tensor tOrP_a = make_tensor(tOrP.data(), accum_as_operand_a(tOrP.layout()));

  PipelineState read_state;
  if (consumer_wg == kWgs - 1) pass_turn<kWgs>(consumer_wg);  // warpgroup 0 takes the first turn
  int q_loads = 0;

  for (int k = 0;; ++k) {
    // Stage 0: the tile (query block, head) and its key-block range, last block first.
    const int tile = Traits::Handoff::receive(ss.handoff, k);
    if (tile >= num_tiles) break;  // the last item's slot is never reused: no release
    const WorkRecord& rec = Traits::Handoff::record(ss.handoff, k);  // read where used
    const int head = tile / num_blocks;
    const MaskInfo mask = record_mask<Traits::kWindow>(rec, p);
    const KeyRange keys = fwd_key_range<Traits>(rec, mask);
    const int n_blocks = keys.n_end - keys.n_begin;
    const int m0 = rec.block * kBlockM;

    OnlineSoftmax<kRows, kFixedMax, Traits::kLazyRescale> softmax(params.scale_log2,
                                                                   params.max_capped);
    clear(tOrO);
    // The tile's key blocks. Every warpgroup waits for and releases the same K / V stages and
    // takes the same turns; kIdle: this warpgroup's 64 rows all lie past the sequence's last
    // query (the last query block of a sequence whose length is not a multiple of kBlockM),
    // so it issues no product and runs no softmax, and the other warpgroups get the tensor
    // cores and the issue slots. A compile-time flag, and no product waits in the idle copy:
    // a wgmma under a runtime branch, or waits for products never issued, made ptxas
    // serialise every wgmma of the kernel (C7515). always_inline: otherwise the loop became a
    // call with its captures on the stack (D=256's window / softcap kernel, 1.3 KB).
    auto visit_key_blocks = [&](auto idle) __attribute__((always_inline)) {
      constexpr bool kIdle = decltype(idle)::value;
      const int q_buf = q_loads % Traits::kQBuffers;
      cutlass::arch::ClusterTransactionBarrier::wait(&ss.q_full[q_buf],
                                                     (q_loads / Traits::kQBuffers) & 1);
      Tensor tSrQ_buf = tSrQ(_, _, _, q_buf);

      // S = Q K^T of the block in `state` (issued, not waited for).
      auto issue_s = [&](PipelineState state) {
        if constexpr (!kIdle) {
          warpgroup_gemm_issue<true>(mma_qk, tSrQ_buf, tSrK(_, _, _, state.index()), tSrS);
        }
      };
      // Q's buffer is free for the tile after next once the last S product has landed (the
      // P V products do not read Q), so its load can start under this tile's last P V.
      auto release_q = [&] { cutlass::arch::ClusterBarrier::arrive(&ss.q_empty[q_buf]); };
      // O += P V of the block in `state` (issued, not waited for).
      auto issue_pv = [&](PipelineState state) {
        if constexpr (!kIdle) {
          warpgroup_gemm_issue<false>(mma_pv, tOrP_a, tOrV(_, _, _, state.index()), tOrO);
        }
      };
      bool rescale_o_needed = true;  // softmax_block's: some row's O factor is not 1
      // Mask and online softmax of key block n: S -> P (fp32, in tSrS); `rescale` is the
      // factor O must take once the pending P V product has landed.
      auto softmax_block = [&](int n, float (&rescale)[kRows]) {
        const int n0 = n * kBlockN;
        if constexpr (Traits::kSoftcap) {
          // The capped score c tanh(s / c): tanh here, c in scale_log2 and the LSE.
          CUTLASS_PRAGMA_UNROLL
          for (int i = 0; i < size(tSrS); ++i) tSrS(i) = tanh_approx(tSrS(i) * params.softcap_scale);
        }
        if (!mask.block_fully_allowed(m0, m0 + kBlockM, n0, n0 + kBlockN)) {
          CUTLASS_PRAGMA_UNROLL
          for (int r = 0; r < kRows; ++r) {
            const int i = m0 + get<0>(scores_coord(r, 0));
            const int start = mask.col_start(i) - n0;
            const int limit = mask.col_limit(i) - n0;
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < size<1>(scores); ++c) {
              const int col = get<1>(scores_coord(r, c));
              const bool in = (mask.window_left < 0 || col >= start) && col < limit;
              scores(r, c) = in ? scores(r, c) : -INFINITY;
            }
          }
        }
        rescale_o_needed = softmax.update(scores, rescale);
      };
      // P to the input precision, as the A operand of the next P V product.
      auto convert_p = [&] {
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i) tOrP(i) = Element(tSrS(i));
      };
      auto rescale_o = [&](const float (&rescale)[kRows]) {
        CUTLASS_PRAGMA_UNROLL
        for (int r = 0; r < kRows; ++r) {
          CUTLASS_PRAGMA_UNROLL
          for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= rescale[r];
        }
      };
      float rescale[kRows];

      // Stage 1: S and P of the first block visited (the last one: the only one that can
      // reach past Lk).
      pipeline_k.consumer_wait(read_state);
      wait_my_turn(consumer_wg);
      issue_s(read_state);
      pass_turn<kWgs>(consumer_wg);
      if constexpr (!kIdle) {
        warpgroup_wait<0>();
        fence_after_wait(tSrQ_buf, tSrS);
      }
      pipeline_k.consumer_release(read_state);
      if (n_blocks == 1) release_q();
      if constexpr (!kIdle) {
        softmax_block(keys.n_end - 1, rescale);
        convert_p();
      }
      PipelineState v_state = read_state;
      ++read_state;

      // Stage 2: its V, with the rows past Lk zeroed once for the whole tile.
      pipeline_v.consumer_wait(v_state);
      if (keys.n_end * kBlockN > mask.len_k) {
        Tensor sV_stage = sV(_, _, v_state.index());  // (N, D)
        zero_v_rows<Traits>(sV_stage, mask.len_k - (keys.n_end - 1) * kBlockN, thread);
        consumers_sync<kWgs>();
      }

      // Stage 3, the steady state: S of block n and O += P V of block n+1 issued together;
      // the softmax of block n runs while P V is in flight (and while the other warpgroups'
      // turns keep the tensor cores busy).
      for (int n = keys.n_end - 2; n >= keys.n_begin; --n) {
        pipeline_k.consumer_wait(read_state);
        pipeline_v.consumer_wait(v_state);  // first iteration: already waited in stage 2, a no-op
        wait_my_turn(consumer_wg);
        issue_s(read_state);
        issue_pv(v_state);
        pass_turn<kWgs>(consumer_wg);
        if constexpr (!kIdle) {
          warpgroup_wait<1>();
          fence_after_wait(tSrQ_buf, tSrS);
        }
        pipeline_k.consumer_release(read_state);
        if (n == keys.n_begin) release_q();
        if constexpr (!kIdle) softmax_block(n, rescale);
        // ptxas hoists a wgmma wait to the top of its basic block, which put the whole softmax
        // after the P V product. A shared-memory store stays before the wait, and this one
        // needs every row's sum, so the softmax stays under the product (tests/test_sass.py).
        ss.softmax_pin[thread] = make_float2(softmax.row_sum[0], softmax.row_sum[kRows - 1]);
        if constexpr (!kIdle) {
          warpgroup_wait<0>();
          fence_after_wait(tOrP_a, tOrO);
        }
        pipeline_v.consumer_release(v_state);
        if constexpr (!kIdle) {
          if (!kFixedMax && rescale_o_needed) rescale_o(rescale);
          convert_p();
        }
        v_state = read_state;
        ++read_state;
      }

      // Stage 4: the last P V product.
      pipeline_v.consumer_wait(v_state);
      wait_my_turn(consumer_wg);
      issue_pv(v_state);
      pass_turn<kWgs>(consumer_wg);
      if constexpr (!kIdle) {
        warpgroup_wait<0>();
        fence_after_wait(tOrP_a, tOrO);
      }
      pipeline_v.consumer_release(v_state);
      ++q_loads;
    };
    // Only the 192-row tiles (three warpgroups) have the idle copy: a sequence's last tile
    // leaves one or two of their warpgroups without rows whenever its length is not a
    // multiple of 192 (512 tokens: rows 512-575). The 128-row kernels keep one copy.
    if (n_blocks > 0) {
      if constexpr (kWgs == 3) {
        if (m0 + consumer_wg * 64 >= rec.len_q) {
          visit_key_blocks(cute::true_type{});
        } else {
          visit_key_blocks(cute::false_type{});
        }
      } else {
        visit_key_blocks(cute::false_type{});
      }
    }

    // Stage 5: normalise and write O and the LSE.
    float inv_sum[kRows], lse[kRows];
    softmax.finalize(inv_sum, lse, Traits::kSoftcap ? p.softcap : p.softmax_scale);
    fwd_store_tile<Traits>(params.fp, rec, head, acc_o, acc_o_coord, inv_sum, lse);
    Traits::Handoff::release(ss.handoff, k);
  }
  if (consumer_wg == 0) wait_my_turn(consumer_wg);
}

// The kernel (its extern "C" entry point: PREFIXLM_FWD_INSTANCE, fwd_launch.cuh); `params`
// is the entry point's __grid_constant__ parameter (the TMA descriptors are read in place).
template <class Traits>
__device__ __forceinline__ void fwd_kernel_body(const FwdKernelParams<Traits>& params) {
  using SharedStorage = typename Traits::SharedStorage;
  using PipelineKV = typename Traits::PipelineKV;
  extern __shared__ char smem_raw[];
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw);

  const int warp = cutlass::canonical_warp_idx_sync();
  const int warpgroup = cutlass::canonical_warp_group_idx();
  if (warp == 0 && cute::elect_one_sync()) {
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
    for (int b = 0; b < Traits::kQBuffers; ++b) {
      cutlass::arch::ClusterTransactionBarrier::init(&ss.q_full[b], 1);
      cutlass::arch::ClusterBarrier::init(&ss.q_empty[b], Traits::kConsumerThreads);
    }
    Traits::Handoff::init(ss.handoff);
  }

  typename PipelineKV::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kKVBytes;
  pipe_params.role = warpgroup == 0 ? PipelineKV::ThreadCategory::Producer
                                    : PipelineKV::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kConsumerThreads;
  PipelineKV pipeline_k(ss.pipeline_k, pipe_params, Shape<_1, _1, _1>{});
  PipelineKV pipeline_v(ss.pipeline_v, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // barrier initialisation is visible to every warp
  // Launched as the schedule kernel's programmatic dependent (fwd_launch.cuh): everything
  // above overlapped it; from here on the schedule is complete and visible.
  asm volatile("griddepcontrol.wait;" ::: "memory");

  const ScheduleCounts* counts = schedule_counts(params.schedule);
  const int num_tiles = counts->num_blocks * params.fp.p.num_heads;

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (warp == 0) {
      fwd_producer<Traits>(params, ss, pipeline_k, pipeline_v, num_tiles);
    } else if (params.fp.zero_padding) {
      // The producer warpgroup's other three warps have nothing else to do: they write the
      // padding rows while the consumers compute, so the zero-writes overlap the attention.
      const WorkRecord* zero_records = schedule_records(params.schedule) + counts->zero_offset;
      for (int z = blockIdx.x; z < counts->num_zero; z += gridDim.x) {
        const WorkRecord rec = load_record(zero_records, z);
        fwd_zero_rows<Traits, 96>(params.fp, rec.q_start, rec.k_start, threadIdx.x - 32);
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    if constexpr (Traits::kFixedMaxBuilt) {
      if (params.fixed_max) {
        fwd_consumer<Traits, true>(params, ss, pipeline_k, pipeline_v, num_tiles);
        return;
      }
    }
    fwd_consumer<Traits, false>(params, ss, pipeline_k, pipeline_v, num_tiles);
  }
}

}  // namespace prefixlm
