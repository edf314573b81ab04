// Binds the CUDA kernels to torch ops through the LibTorch stable ABI (torch >= 2.10).
//
// The public ops (prefixlm::varlen_fwd / varlen_bwd) are defined in Python, which validates
// the inputs, allocates the outputs and passes the current CUDA stream; these lower-level ops
// only check what would otherwise let a kernel touch memory out of bounds, then launch.
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "bwd_api.h"
#include "driver.h"
#include "fwd_api.h"
#include "params.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

void check_cuda(const Tensor& t, const char* name, int device) {
  STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == device, "prefixlm_C: ", name,
                  " must be a CUDA tensor on the device of q");
}

void check_rows_heads_dim(const Tensor& t, const char* name, int64_t heads, int64_t dim) {
  STD_TORCH_CHECK(t.dim() == 3 && t.size(1) == heads && t.size(2) == dim && t.stride(2) == 1,
                  "prefixlm_C: ", name, " must be (rows, ", heads, ", ", dim,
                  ") with a contiguous last dimension");
  STD_TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
                  "prefixlm_C: ", name, " needs 16-byte aligned rows and heads (TMA)");
  STD_TORCH_CHECK(t.size(0) < (int64_t{1} << 31), "prefixlm_C: ", name, " has too many rows");
}

const int32_t* int32_vector(const Tensor& t, const char* name, int64_t len, int device) {
  check_cuda(t, name, device);
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Int && t.dim() == 1 && t.size(0) == len &&
                      t.stride(0) == 1,
                  "prefixlm_C: ", name, " must be a contiguous int32 vector of length ", len);
  return static_cast<const int32_t*>(t.data_ptr());
}

const int32_t* optional_int32_vector(const std::optional<Tensor>& t, const char* name,
                                     int64_t len, int device) {
  return t.has_value() ? int32_vector(*t, name, len, device) : nullptr;
}

int num_sms(int device) { return prefixlm::driver::multiprocessor_count(device); }

prefixlm::RowHeadStrides strides_of(const Tensor& t) { return {t.stride(0), t.stride(1)}; }

// Shapes, dtypes and metadata shared by the forward and the backward.
prefixlm::VarlenProblem make_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& cu_q, const Tensor& cu_k,
                                     const std::optional<Tensor>& seqused_q,
                                     const std::optional<Tensor>& seqused_k,
                                     const std::optional<Tensor>& prefix_lens,
                                     double softmax_scale, bool causal, int64_t window_left,
                                     int64_t window_right, double softcap) {
  const int device = q.get_device_index();
  check_cuda(q, "q", device);
  check_cuda(k, "k", device);
  check_cuda(v, "v", device);
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::BFloat16 || q.scalar_type() == ScalarType::Half,
                  "prefixlm_C: q must be bfloat16 or float16");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "prefixlm_C: k and v must have the dtype of q");
  STD_TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "prefixlm_C: q and k must be 3-D");
  const int64_t heads = q.size(1), heads_k = k.size(1), dim = q.size(2);
  // Checked here as well as in the dispatch, which an empty batch never reaches.
  STD_TORCH_CHECK(dim == 64 || dim == 96 || dim == 128 || dim == 192 || dim == 256,
                  "prefixlm_C: no kernel for head_dim ", dim,
                  " (supported: 64, 96, 128, 192, 256)");
  STD_TORCH_CHECK(heads_k > 0 && heads % heads_k == 0,
                  "prefixlm_C: the heads of q must be a multiple of the heads of k");
  check_rows_heads_dim(q, "q", heads, dim);
  check_rows_heads_dim(k, "k", heads_k, dim);
  check_rows_heads_dim(v, "v", heads_k, dim);
  STD_TORCH_CHECK(v.size(0) == k.size(0), "prefixlm_C: v must have the rows of k");
  STD_TORCH_CHECK(cu_q.dim() == 1 && cu_q.size(0) >= 1, "prefixlm_C: cu_seqlens_q is empty");
  const int64_t batch = cu_q.size(0) - 1;
  STD_TORCH_CHECK(batch < (int64_t{1} << 31), "prefixlm_C: too many sequences");
  STD_TORCH_CHECK(softmax_scale > 0.0, "prefixlm_C: softmax_scale must be positive");

  prefixlm::VarlenProblem p{};
  p.batch = static_cast<int>(batch);
  p.total_q = static_cast<int>(q.size(0));
  p.total_k = static_cast<int>(k.size(0));
  p.num_heads = static_cast<int>(heads);
  p.num_heads_k = static_cast<int>(heads_k);
  p.head_dim = static_cast<int>(dim);
  p.cu_seqlens_q = int32_vector(cu_q, "cu_seqlens_q", batch + 1, device);
  p.cu_seqlens_k = int32_vector(cu_k, "cu_seqlens_k", batch + 1, device);
  p.seqused_q = optional_int32_vector(seqused_q, "seqused_q", batch, device);
  p.seqused_k = optional_int32_vector(seqused_k, "seqused_k", batch, device);
  p.prefix_lens = optional_int32_vector(prefix_lens, "prefix_lens", batch, device);
  STD_TORCH_CHECK(p.prefix_lens == nullptr || causal,
                  "prefixlm_C: prefix_lens requires causal=True");
  p.causal = causal;
  STD_TORCH_CHECK(window_left >= -1 && window_right >= -1 && window_left < (int64_t{1} << 30) &&
                      window_right < (int64_t{1} << 30),
                  "prefixlm_C: window sizes must be in [-1, 2^30)");
  p.window_left = static_cast<int>(window_left);
  p.window_right = static_cast<int>(window_right);
  STD_TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap),
                  "prefixlm_C: softcap must be 0 or a finite positive number");
  p.softcap = static_cast<float>(softcap);
  p.bf16 = q.scalar_type() == ScalarType::BFloat16;
  p.softmax_scale = static_cast<float>(softmax_scale);
  return p;
}

// softmax_lse: contiguous float32 (H, total_q). Without query rows it holds nothing, and
// torch gives an empty (H, 0) tensor the strides (1, 1), so its strides are not checked.
void check_lse(const Tensor& softmax_lse, const prefixlm::VarlenProblem& p, int device) {
  check_cuda(softmax_lse, "softmax_lse", device);
  STD_TORCH_CHECK(softmax_lse.scalar_type() == ScalarType::Float && softmax_lse.dim() == 2 &&
                      softmax_lse.size(0) == p.num_heads && softmax_lse.size(1) == p.total_q &&
                      (p.total_q == 0 ||
                       (softmax_lse.stride(1) == 1 && softmax_lse.stride(0) == p.total_q)),
                  "prefixlm_C: softmax_lse must be a contiguous float32 (H, total_q) tensor");
}

void fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,
         std::optional<Tensor> seqused_q, std::optional<Tensor> seqused_k,
         std::optional<Tensor> prefix_lens, Tensor out, Tensor softmax_lse,
         double softmax_scale, bool causal, int64_t window_left, int64_t window_right,
         double softcap, bool zero_padding, int64_t stream) {
  prefixlm::VarlenProblem p =
      make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                   softmax_scale, causal, window_left, window_right, softcap);
  const int device = q.get_device_index();
  check_cuda(out, "out", device);
  STD_TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.size(0) == q.size(0),
                  "prefixlm_C: out must be like q");
  check_rows_heads_dim(out, "out", p.num_heads, p.head_dim);
  check_lse(softmax_lse, p, device);

  prefixlm::FwdParams fp{};
  fp.p = p;
  fp.q = q.data_ptr();
  fp.k = k.data_ptr();
  fp.v = v.data_ptr();
  fp.out = out.data_ptr();
  fp.softmax_lse = static_cast<float*>(softmax_lse.data_ptr());
  fp.q_stride = strides_of(q);
  fp.k_stride = strides_of(k);
  fp.v_stride = strides_of(v);
  fp.o_stride = strides_of(out);
  fp.zero_padding = zero_padding;
  fp.num_sms = num_sms(device);

  prefixlm::driver::set_device(device);
  Tensor workspace = torch::stable::new_empty(
      q, {(prefixlm::fwd_workspace_bytes(p) + 15) / 16 * 16}, ScalarType::Byte);
  prefixlm::run_fwd(fp, workspace.data_ptr(), reinterpret_cast<cudaStream_t>(stream));
}

void check_like(const Tensor& t, const Tensor& like, const char* name, int device) {
  check_cuda(t, name, device);
  STD_TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.dim() == 3 &&
                      t.size(0) == like.size(0),
                  "prefixlm_C: ", name, " must have the dtype and rows of its input");
  check_rows_heads_dim(t, name, like.size(1), like.size(2));
}

void bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse,
         Tensor cu_seqlens_q, Tensor cu_seqlens_k, std::optional<Tensor> seqused_q,
         std::optional<Tensor> seqused_k, std::optional<Tensor> prefix_lens, Tensor dq,
         Tensor dk, Tensor dv, double softmax_scale, bool causal, int64_t window_left,
         int64_t window_right, double softcap, bool deterministic, bool zero_padding,
         int64_t stream) {
  prefixlm::VarlenProblem p =
      make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k, prefix_lens,
                   softmax_scale, causal, window_left, window_right, softcap);
  const int device = q.get_device_index();
  check_like(out, q, "out", device);
  check_like(dout, q, "dout", device);
  check_like(dq, q, "dq", device);
  check_like(dk, k, "dk", device);
  check_like(dv, k, "dv", device);
  check_lse(softmax_lse, p, device);

  prefixlm::BwdParams bp{};
  bp.p = p;
  bp.q = q.data_ptr();
  bp.k = k.data_ptr();
  bp.v = v.data_ptr();
  bp.out = out.data_ptr();
  bp.dout = dout.data_ptr();
  bp.softmax_lse = static_cast<const float*>(softmax_lse.data_ptr());
  bp.dq = dq.data_ptr();
  bp.dk = dk.data_ptr();
  bp.dv = dv.data_ptr();
  bp.q_stride = strides_of(q);
  bp.k_stride = strides_of(k);
  bp.v_stride = strides_of(v);
  bp.o_stride = strides_of(out);
  bp.do_stride = strides_of(dout);
  bp.dq_stride = strides_of(dq);
  bp.dk_stride = strides_of(dk);
  bp.dv_stride = strides_of(dv);
  bp.deterministic = deterministic;
  bp.zero_padding = zero_padding;
  bp.num_sms = num_sms(device);

  prefixlm::driver::set_device(device);
  Tensor workspace = torch::stable::new_empty(
      q, {(prefixlm::bwd_workspace_bytes(p) + 15) / 16 * 16}, ScalarType::Byte);
  prefixlm::run_bwd(bp, workspace.data_ptr(), reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

STABLE_TORCH_LIBRARY(prefixlm_C, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? seqused_q, Tensor? seqused_k, Tensor? prefix_lens, Tensor(a!) out, "
      "Tensor(b!) softmax_lse, float softmax_scale, bool causal, int window_left, "
      "int window_right, float softcap, bool zero_padding, int stream) -> ()");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_q, Tensor? seqused_k, "
      "Tensor? prefix_lens, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, float softmax_scale, "
      "bool causal, int window_left, int window_right, float softcap, bool deterministic, "
      "bool zero_padding, int stream) -> ()");
}

STABLE_TORCH_LIBRARY_IMPL(prefixlm_C, CUDA, m) {
  m.impl("fwd", TORCH_BOX(&fwd));
  m.impl("bwd", TORCH_BOX(&bwd));
}
