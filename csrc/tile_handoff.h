// Dynamic persistent scheduling. CTAs take work items from a global counter (greedy list
// scheduling: whoever finishes first takes the next item, so uneven causal tiles balance).
// The producer warp takes the items and hands each one to the consumer warpgroups through a
// small shared-memory ring guarded by mbarriers, so every role walks the same sequence. The
// forward's producer also hands over the item's work record, already read from global memory
// a ring slot ahead, so its consumers never wait on a global load between two short tiles;
// the backward's producer has too few registers to hold it (its consumers read it themselves).
#pragma once

#include <cutlass/arch/barrier.h>

#include "gemm.h"
#include "scheduler.h"

namespace prefixlm {

// mbarrier wait that also keeps the compiler from moving memory accesses across it
// (ClusterBarrier::wait's asm has no memory clobber): for plain shared-memory reads and
// writes guarded by the barrier.
__device__ inline void wait_barrier(uint64_t* barrier, uint32_t phase) {
  cutlass::arch::ClusterBarrier::wait(barrier, phase);
  asm volatile("" ::: "memory");
}

template <int kRing, int kConsumerThreads>
struct TileHandoff {
  struct SharedStorage {
    WorkRecord record[kRing];  // the item's record (unused past the last item)
    int tile[kRing];
    alignas(8) uint64_t full[kRing];   // producer wrote tile[slot] and record[slot]
    alignas(8) uint64_t empty[kRing];  // every consumer thread has read it
  };

  __device__ static void init(SharedStorage& s) {
    for (int r = 0; r < kRing; ++r) {
      cutlass::arch::ClusterBarrier::init(&s.full[r], 1);
      cutlass::arch::ClusterBarrier::init(&s.empty[r], kConsumerThreads);
    }
  }

  // The k-th item of this CTA (first: blockIdx.x), called by the whole producer warp.
  __device__ static int next(int* counter, int k) {
    if (k == 0) return blockIdx.x;
    int item = 0;
    if (threadIdx.x % 32 == 0) item = atomicAdd(counter, 1) + gridDim.x;
    return __shfl_sync(0xffffffff, item, 0);
  }

  // Producer warp: publishes the k-th item, with its record if the consumers read it.
  __device__ static void publish(SharedStorage& s, int k, int item,
                                 const WorkRecord* record = nullptr) {
    const int slot = k % kRing;
    const int use = k / kRing;
    if (use > 0) wait_barrier(&s.empty[slot], (use - 1) & 1);
    if (threadIdx.x % 32 == 0) {
      if (record != nullptr) s.record[slot] = *record;
      s.tile[slot] = item;
      cutlass::arch::ClusterBarrier::arrive(&s.full[slot]);  // release: orders the stores
    }
    __syncwarp();
  }

  // Every consumer thread: the k-th item. Its record stays readable in `record(s, k)` until
  // the thread calls release(s, k), at the end of the item: reading fields where they are
  // used keeps them out of registers for the whole tile. Holding the slot costs nothing: the
  // producer publishes item k + kRing only after loading all of item k + 1.
  __device__ static int receive(SharedStorage& s, int k) {
    const int slot = k % kRing;
    wait_barrier(&s.full[slot], (k / kRing) & 1);
    const int item = s.tile[slot];
    // Every lane read the same value (warp_uniform: 99 -> 74 R2UR in the D=128 forward).
    return warp_uniform(item);
  }
  __device__ static const WorkRecord& record(const SharedStorage& s, int k) {
    return s.record[k % kRing];
  }
  __device__ static void release(SharedStorage& s, int k) {
    asm volatile("" ::: "memory");  // every read of the record comes before
    cutlass::arch::ClusterBarrier::arrive(&s.empty[k % kRing]);
  }
};

}  // namespace prefixlm
