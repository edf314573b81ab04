// Warpgroup MMA helpers and accumulator layout views shared by the forward and backward.
#pragma once

#include <cute/tensor.hpp>

namespace prefixlm {

using namespace cute;

// CuTe's extended wgmma shapes (N = 48, 80, 112, 176, ...): without them CuTe builds such an
// N from several narrower atoms per k-step, silently. Their headers add ~16 s of front-end
// time to every file that includes them, so only the instantiation files whose tiles need
// them define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED (before any include); the kernels assert
// it where they need it.
#if defined(CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED)
inline constexpr bool kExtendedGmmaShapes = true;
#else
inline constexpr bool kExtendedGmmaShapes = false;
#endif

// `v` as lane 0 of the warp holds it, for a value every lane already holds (a tile index, a
// warpgroup index): after the broadcast the compiler knows it is warp-uniform, so addresses
// and wgmma descriptors derived from it are built in uniform registers. Derived from
// threadIdx or a shared-memory load, they are built in vector registers and moved over with
// R2UR (two per HGMMA for a descriptor).
__device__ inline int warp_uniform(int v) { return __shfl_sync(0xffffffff, v, 0); }

// The same value, opaque to the compiler: values derived from it are recomputed where used
// instead of being hoisted (e.g. a rarely taken path's thread offsets, kept live through a
// main loop, get spilled).
__device__ inline int opaque_int(int v) {
  asm volatile("" : "+r"(v));
  return v;
}

// The shared-memory atom of a K-major wgmma operand whose rows hold kCols elements: swizzled
// over 128, 64 or 32 bytes (atoms of 64, 32 or 16 elements), the widest whose atoms tile the
// row.
template <class Element, int kCols>
using KMajorSwizzleAtom = conditional_t<
    kCols % 64 == 0, GMMA::Layout_K_SW128_Atom<Element>,
    conditional_t<kCols % 32 == 0, GMMA::Layout_K_SW64_Atom<Element>,
                  GMMA::Layout_K_SW32_Atom<Element>>>;

// A from registers (RS) needs fencing like C; an smem descriptor (SS) does not.
template <class TA>
constexpr bool kOperandInRegisters =
    !is_same_v<typename TA::engine_type::iterator, GMMA::DescriptorIterator>;

// k-block kb of an operand fragment (MMA, MMA_M or N, MMA_K). kDescAdd64: an smem
// descriptor's k-block is the first one's plus the k-block's offset in one 64-bit add, which
// ptxas emits as one UIADD3.64 per descriptor (CuTe adds to the low word, and ptxas then
// writes the constant high word again before every HGMMA: two UIADD3 and two UMOV per SS
// HGMMA). Opaque to the compiler, so it cannot split the add again.
template <bool kDescAdd64, class T>
__device__ inline auto operand_kstep(T const& t, int kb) {
  if constexpr (!kDescAdd64 || kOperandInRegisters<T>) {
    return t(_, _, kb);
  } else {
    const uint64_t base = t.data().desc_.desc_;
    const uint64_t offset = uint64_t(t.layout()(0, 0, kb));
    uint64_t desc = base;
    if (offset != 0) asm("add.s64 %0, %1, %2;" : "=l"(desc) : "l"(base), "l"(offset));
    return make_tensor(GMMA::DescriptorIterator{GmmaDescriptor{desc}}, t(_, _, kb).layout());
  }
}

// Issues C (+)= A * B over all k-blocks as one wgmma batch and returns without waiting:
// the caller overlaps other work, then calls warpgroup_wait<N>() and fence_after_wait().
// A and B are fragments from partition_fragment_A/B (smem descriptors or registers).
// kDescAdd64: see operand_kstep. The backward takes it (bwd +1-4%, H100, same call); the
// forward does not (D=96 causal 2k fwd -4%, D=128 full 2k -2% with it).
template <bool kZeroInit, bool kDescAdd64 = false, class TiledMma, class TA, class TB, class TC>
__device__ inline void warpgroup_gemm_issue(TiledMma& tiled_mma, TA const& tA, TB const& tB,
                                            TC& tC) {
  if constexpr (kOperandInRegisters<TA>) warpgroup_fence_operand(const_cast<TA&>(tA));
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(tA); ++kb) {
    cute::gemm(tiled_mma, operand_kstep<kDescAdd64>(tA, kb), operand_kstep<kDescAdd64>(tB, kb),
               tC);
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

// One butterfly step over a quad: each lane trades two of its items with lane ^ kMask. Lanes
// with that bit set send items kSet0, kSet1 and receive into them; the others likewise with
// kClear0, kClear1.
template <int kMask, int kSet0, int kSet1, int kClear0, int kClear1>
__device__ inline void quad_exchange(uint32_t (&v)[4], int lane) {
  const bool set = lane & kMask;
  const uint32_t r0 = __shfl_xor_sync(0xffffffff, set ? v[kSet0] : v[kClear0], kMask);
  const uint32_t r1 = __shfl_xor_sync(0xffffffff, set ? v[kSet1] : v[kClear1], kMask);
  if (set) {  // constant indices: the items stay in registers
    v[kSet0] = r0;
    v[kSet1] = r1;
  } else {
    v[kClear0] = r0;
    v[kClear1] = r1;
  }
}

// 4 x 4 transpose of 32-bit values over the 4 lanes of a quad: on entry v[k] is this lane's
// value of item k; on return v[k] is lane k's value of item `lane % 4`. Every lane of the
// warp must call it.
__device__ inline void quad_transpose4(uint32_t (&v)[4], int lane) {
  quad_exchange<2, 0, 1, 2, 3>(v, lane);  // items 2, 3 of the low lanes <-> 0, 1 of the high
  quad_exchange<1, 0, 2, 1, 3>(v, lane);  // items 1, 3 of the even lanes <-> 0, 2 of the odd
}

// One row of a wgmma accumulator's (rows, cols) view, converted to 16-bit pairs, in 16-byte
// chunks. The 4 lanes of a quad share the row and each holds 2 of every 8 consecutive
// columns (columns 8 j + 2 (lane % 4) + {0, 1} for kCols / 2 values of j); after a transpose
// over the quad, this lane owns chunks j = 4 g + lane % 4, i.e. columns 32 g + 8 (lane % 4)
// .. + 7. pair(c) packs the row's values c and c + 1 (one 32-bit word); store(col, chunk)
// writes the chunk that starts at column col. Every lane of the warp must call it (store may
// skip rows). One 16-byte store per 8 columns instead of four 4-byte ones: per-pair stores
// filled the global store queue (ncu: "lg" throttle stalls in the epilogues).
template <int kCols, class PairFn, class StoreFn>
__device__ inline void store_row_16b(int lane, PairFn&& pair, StoreFn&& store) {
  static_assert(kCols % 8 == 0, "a row's pairs come in groups of 4");
  CUTLASS_PRAGMA_UNROLL
  for (int g = 0; g < kCols / 8; ++g) {
    uint32_t v[4];
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) v[i] = pair(2 * (4 * g + i));
    quad_transpose4(v, lane);
    store(32 * g + 8 * (lane % 4), make_uint4(v[0], v[1], v[2], v[3]));
  }
}

// One 16-byte global store. Written as `*(uint4*)p = v`, ptxas split some chunks into four
// 4-byte stores (the transpose leaves the words in scattered registers); the vector store
// makes it move them together instead.
__device__ inline void st_global_16b(void* ptr, uint4 v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

// Two accumulator values as one 32-bit word of 16-bit elements.
template <class Element>
__device__ inline uint32_t pack_pair(float x, float y) {
  cutlass::Array<Element, 2> pair;
  pair[0] = Element(x);
  pair[1] = Element(y);
  return reinterpret_cast<const uint32_t&>(pair);
}

}  // namespace prefixlm
