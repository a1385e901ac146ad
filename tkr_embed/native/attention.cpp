// Fused BERT self-attention for MLX's CPU backend.
//
// MLX's CPU backend has no fused attention: softmax(q k^T) v runs as separate passes over the
// [batch, heads, L, L] scores in memory (scores, row max, exp, value product), each a kernel the
// size of the whole score tensor. Here each (item, head) pair works on one block of query rows at
// a time, small enough to stay in the core's cache: the two matmuls go to the BLAS MLX uses
// (cblas_sgemm, OpenBLAS when tkr-embed preloads it), and the softmax between them is a
// vectorised loop over a row that is already in L1. The heads are read and written in place in
// the projections' [batch, L, heads * head_dim] layout (the BLAS's leading dimensions do the
// head split), so no transposes or copies either.
//
// float32 only; the Python side (tkr_embed/native/__init__.py) falls back to MLX ops otherwise.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" {
// The CBLAS entry point, resolved at load time: the preloaded OpenBLAS when tkr-embed's launcher
// found one, else the BLAS bundled with MLX's wheel (both export it).
enum CBLAS_ORDER { CblasRowMajor = 101 };
enum CBLAS_TRANSPOSE { CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(CBLAS_ORDER, CBLAS_TRANSPOSE, CBLAS_TRANSPOSE, int M, int N, int K, float alpha,
                 const float* A, int lda, const float* B, int ldb, float beta, float* C, int ldc);
}

namespace {

// exp(x) for x <= 0 (the softmax's scores minus their row maximum), eight lanes at a time with
// GCC/Clang vector extensions (AVX2 in the x86 copy picked at load time, NEON pairs on arm64):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, 2^n from the float's
// exponent bits. n is rounded by adding and subtracting 1.5 * 2^23, whose low mantissa bits then
// hold n itself. Below -87 float32's exp is denormal: clamped there, so the additive padding mask
// (the dtype's minimum) gives ~1e-38, never NaN. Relative error ~2e-7.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// always_inline: GCC inlines a baseline function into the AVX2 copy only when told to.
#define TKR_INLINE inline __attribute__((always_inline))

template <typename F, typename I>
TKR_INLINE F exp_nonpositive(F x) {
  const F lo = F{} - 87.0f;  // broadcast, for scalars and vectors alike
  x = x < lo ? lo : x;
  const F shifted = x * 1.44269504088896341f + 12582912.0f;
  const F n = shifted - 12582912.0f;
  const F r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  F p = r * (1.0f / 720.0f) + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000 + 127) << 23;  // 0x4B400000: the bits of 1.5 * 2^23
  F two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

TKR_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

TKR_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// In place: row[j] <- exp(row[j] + mask[j] - max), returns the row's sum. Compiled twice on
// x86-64 (below): for AVX2 + FMA and for the baseline.
TKR_INLINE float softmax_row_body(float* row, const float* mask, int n) {
  const int nv = n - n % kLanes;
  if (mask) {
    for (int j = 0; j < nv; j += kLanes) store8(row + j, load8(row + j) + load8(mask + j));
    for (int j = nv; j < n; ++j) row[j] += mask[j];
  }
  v8f vmax = {-3.402823466e38f, -3.402823466e38f, -3.402823466e38f, -3.402823466e38f,
              -3.402823466e38f, -3.402823466e38f, -3.402823466e38f, -3.402823466e38f};
  for (int j = 0; j < nv; j += kLanes) {
    const v8f x = load8(row + j);
    vmax = x > vmax ? x : vmax;
  }
  float m = vmax[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, vmax[l]);
  for (int j = nv; j < n; ++j) m = std::max(m, row[j]);

  v8f vsum = {};
  const v8f vm = v8f{} + m;
  for (int j = 0; j < nv; j += kLanes) {
    const v8f e = exp_nonpositive<v8f, v8i>(load8(row + j) - vm);
    store8(row + j, e);
    vsum += e;
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += vsum[l];
  for (int j = nv; j < n; ++j) {
    row[j] = exp_nonpositive<float, int32_t>(row[j] - m);
    sum += row[j];
  }
  return sum;
}

float softmax_row_baseline(float* row, const float* mask, int n) {
  return softmax_row_body(row, mask, n);
}

// The copy for this CPU, picked once when the library loads, so one build runs on any x86-64 CPU
// (a venv copied between machines included). By features, not CPU model: GCC's target_clones
// ("arch=haswell") dispatches on the model, and took the baseline copy on this AMD Zen: ~3x slower.
using SoftmaxRow = float (*)(float*, const float*, int);
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) float softmax_row_avx2(float* row, const float* mask, int n) {
  return softmax_row_body(row, mask, n);
}

SoftmaxRow pick_softmax_row() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return softmax_row_avx2;
  return softmax_row_baseline;
}
#else
SoftmaxRow pick_softmax_row() { return softmax_row_baseline; }
#endif
const SoftmaxRow softmax_numerator_row = pick_softmax_row();

// A key whose additive mask is below this is padding (BERT's mask is the dtype's minimum there).
constexpr float kPaddingBelow = -1e30f;

// Rows of queries per block: its scores ([block, L] floats) should stay in L2 while the softmax
// and the value product read them back. Measured on a 4 x 252-token MiniLM shard: blocks of 32 KB
// to 1 MB of scores all ran within 10% (9.0-10.1 ms).
int query_block(int L) {
  const int budget = (256 * 1024) / (4 * std::max(L, 1));
  return std::clamp(budget, 16, 256);
}

// One sequence: `rows` query rows against its first `keys` keys and values, every head, in the
// merged-heads layout (row stride HD). scores holds QB x keys floats, inv_sum QB.
void attend_sequence(const float* q, const float* k, const float* v, const float* mask, float* out,
                     int rows_total, int keys, int H, int D, float scale, int QB, float* scores,
                     float* inv_sum) {
  const int HD = H * D;
  for (int h = 0; h < H; ++h) {
    const float* kh = k + h * D;
    const float* vh = v + h * D;
    for (int i0 = 0; i0 < rows_total; i0 += QB) {
      const int rows = std::min(QB, rows_total - i0);
      const float* qh = q + static_cast<size_t>(i0) * HD + h * D;
      float* oh = out + static_cast<size_t>(i0) * HD + h * D;
      // scores = scale * q_h k_h^T for this block of query rows
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, keys, D, scale, qh, HD, kh, HD,
                  0.0f, scores, keys);
      for (int r = 0; r < rows; ++r)
        inv_sum[r] = 1.0f / softmax_numerator_row(scores + static_cast<size_t>(r) * keys, mask, keys);
      // out_h = weights v_h, written into the merged-heads layout, then normalised per row
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, keys, 1.0f, scores, keys, vh,
                  HD, 0.0f, oh, HD);
      for (int r = 0; r < rows; ++r) {
        float* o = oh + static_cast<size_t>(r) * HD;
        const float s = inv_sum[r];
        for (int d = 0; d < D; ++d) o[d] *= s;
      }
    }
  }
}

// Padded batch: [B, L, HD], an additive key mask [B, L] or none.
void attention_kernel(const float* q, const float* k, const float* v, const float* mask, float* out,
                      int B, int L, int H, int D, float scale) {
  const int HD = H * D;
  const int QB = std::min(query_block(L), L);
  std::vector<float> scores(static_cast<size_t>(QB) * L);
  std::vector<float> inv_sum(QB);
  for (int b = 0; b < B; ++b) {
    const size_t item = static_cast<size_t>(b) * L * HD;
    const float* item_mask = mask ? mask + static_cast<size_t>(b) * L : nullptr;
    // Keys after an item's last token (right padding: the mask's large negative values) would
    // each add ~1e-38 of weight: leave them out of both matmuls.
    int keys = L;
    while (item_mask && keys > 1 && item_mask[keys - 1] < kPaddingBelow) --keys;
    attend_sequence(q + item, k + item, v + item, item_mask, out + item, L, keys, H, D, scale, QB,
                    scores.data(), inv_sum.data());
  }
}

// Packed sequences: [T, HD], sequence b's tokens at rows offsets[b] .. offsets[b + 1] (no padding
// anywhere: each sequence attends to its own tokens only).
// The offsets are data, read when the graph runs on a stream's thread, where an exception could
// not reach the caller: a sequence is clamped to the T rows (the Python side checks them first).
void packed_attention_kernel(const float* q, const float* k, const float* v, const int32_t* offsets,
                             float* out, int B, int T, int H, int D, float scale) {
  const int HD = H * D;
  auto bounds = [&](int b) {
    const int lo = std::clamp(offsets[b], 0, T);
    return std::make_pair(lo, std::clamp(offsets[b + 1], lo, T));
  };
  int longest = 1;
  for (int b = 0; b < B; ++b) {
    const auto [lo, hi] = bounds(b);
    longest = std::max(longest, hi - lo);
  }
  const int QB = std::min(query_block(longest), longest);
  std::vector<float> scores(static_cast<size_t>(QB) * longest);
  std::vector<float> inv_sum(QB);
  for (int b = 0; b < B; ++b) {
    const auto [lo, hi] = bounds(b);
    const int n = hi - lo;
    if (n <= 0) continue;
    const size_t start = static_cast<size_t>(lo) * HD;
    attend_sequence(q + start, k + start, v + start, nullptr, out + start, n, n, H, D, scale,
                    std::min(QB, n), scores.data(), inv_sum.data());
  }
}

// What both attention primitives share: their heads and scale, the CPU backend only, an output
// shaped as q, and registering their arrays with the stream's command encoder.
class CpuAttention : public mx::UnaryPrimitive {
 public:
  CpuAttention(mx::Stream stream, int heads, float scale)
      : mx::UnaryPrimitive(stream), heads_(heads), scale_(scale) {}

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error(std::string(name()) + " runs on the CPU backend only");
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 protected:
  // Allocates out and registers every array with the stream's encoder, which then dispatches the kernel.
  mx::cpu::CommandEncoder& begin(const std::vector<mx::array>& inputs, mx::array& out) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& in : inputs) encoder.set_input_array(in);
    encoder.set_output_array(out);
    return encoder;
  }

  bool same_heads_and_scale(const CpuAttention& o) const {
    return heads_ == o.heads_ && scale_ == o.scale_;
  }

  int heads_;
  float scale_;
};

class BertAttention : public CpuAttention {
 public:
  BertAttention(mx::Stream stream, int heads, float scale, bool masked)
      : CpuAttention(stream, heads, scale), masked_(masked) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& q = inputs[0];
    auto& encoder = begin(inputs, out);
    const int B = q.shape(0), L = q.shape(1), HD = q.shape(2), H = heads_, D = HD / H;
    const float* mask = masked_ ? inputs[3].data<float>() : nullptr;
    encoder.dispatch([qp = q.data<float>(), kp = inputs[1].data<float>(), vp = inputs[2].data<float>(),
                      mask, op = out.data<float>(), B, L, H, D, scale = scale_]() {
      attention_kernel(qp, kp, vp, mask, op, B, L, H, D, scale);
    });
  }

  const char* name() const override { return "TkrBertAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const BertAttention&>(other);
    return same_heads_and_scale(o) && masked_ == o.masked_;
  }

 private:
  bool masked_;
};

class PackedBertAttention : public CpuAttention {
 public:
  using CpuAttention::CpuAttention;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& q = inputs[0];
    const auto& offsets = inputs[3];
    auto& encoder = begin(inputs, out);
    const int B = static_cast<int>(offsets.size()) - 1, T = q.shape(0), HD = q.shape(1), H = heads_, D = HD / H;
    encoder.dispatch([qp = q.data<float>(), kp = inputs[1].data<float>(), vp = inputs[2].data<float>(),
                      off = offsets.data<int32_t>(), op = out.data<float>(), B, T, H, D,
                      scale = scale_]() {
      packed_attention_kernel(qp, kp, vp, off, op, B, T, H, D, scale);
    });
  }

  const char* name() const override { return "TkrPackedBertAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return same_heads_and_scale(static_cast<const CpuAttention&>(other));
  }
};

// Checks q, k, v (float32, one shape of `ndim` dimensions, heads dividing the last) and the
// default stream (the CPU backend); returns that stream and the three, contiguous.
std::pair<mx::Stream, std::vector<mx::array>> projections(const char* op, const char* layout, int ndim,
                                                          const mx::array& q, const mx::array& k,
                                                          const mx::array& v, int heads) {
  if (q.ndim() != ndim || k.shape() != q.shape() || v.shape() != q.shape())
    throw std::invalid_argument(std::string(op) + ": q, k, v must all be " + layout);
  if (q.dtype() != mx::float32 || k.dtype() != mx::float32 || v.dtype() != mx::float32)
    throw std::invalid_argument(std::string(op) + ": float32 only");
  if (heads <= 0 || q.shape(ndim - 1) % heads != 0)
    throw std::invalid_argument(std::string(op) + ": heads must divide the hidden size");
  const auto s = mx::to_stream({});
  if (s.device != mx::Device::cpu)
    throw std::invalid_argument(std::string(op) + ": the CPU backend only");
  return {s, {mx::contiguous(q, false, s), mx::contiguous(k, false, s), mx::contiguous(v, false, s)}};
}

mx::array bert_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                         const std::optional<mx::array>& mask, int heads, float scale) {
  auto [s, inputs] = projections("bert_attention", "[batch, L, heads * head_dim]", 3, q, k, v, heads);
  if (mask) {
    const int B = q.shape(0), L = q.shape(1);
    if (mask->size() != static_cast<size_t>(B) * L)
      throw std::invalid_argument("bert_attention: mask must hold one value per key: [batch, L]");
    inputs.push_back(mx::contiguous(mx::reshape(mx::astype(*mask, mx::float32, s), {B, L}, s), false, s));
  }
  return mx::array(q.shape(), mx::float32,
                   std::make_shared<BertAttention>(s, heads, scale, mask.has_value()),
                   std::move(inputs));
}

mx::array bert_attention_packed(const mx::array& q, const mx::array& k, const mx::array& v,
                                const mx::array& offsets, int heads, float scale) {
  auto [s, inputs] = projections("bert_attention_packed", "[tokens, heads * head_dim]", 2, q, k, v, heads);
  if (offsets.ndim() != 1 || offsets.size() < 2 || offsets.dtype() != mx::int32)
    throw std::invalid_argument("bert_attention_packed: offsets must be int32 [sequences + 1]");
  inputs.push_back(mx::contiguous(offsets, false, s));
  return mx::array(q.shape(), mx::float32, std::make_shared<PackedBertAttention>(s, heads, scale),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_attention, m) {
  m.doc() = "Fused BERT self-attention for MLX's CPU backend (tkr-embed)";
  m.def("bert_attention", &bert_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("mask").none() = nb::none(), nb::arg("heads"), nb::arg("scale"),
        "softmax(scale * q k^T + mask) v per head, on [batch, L, heads * head_dim] projections; "
        "mask is additive, one value per key ([batch, L]). Returns [batch, L, heads * head_dim].");
  m.def("bert_attention_packed", &bert_attention_packed, nb::arg("q"), nb::arg("k"), nb::arg("v"),
        nb::arg("offsets"), nb::arg("heads"), nb::arg("scale"),
        "softmax(scale * q k^T) v per head and per sequence, on packed [tokens, heads * head_dim] "
        "projections: sequence b is rows offsets[b] .. offsets[b + 1] and attends to those only. "
        "Returns [tokens, heads * head_dim].");
}
