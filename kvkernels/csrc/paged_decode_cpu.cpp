// Decode attention straight from the paged KV cache (CPU, fp32/bf16/fp8 cache, fp32 math).
//
// One work item per request: the cache is read once per layer, block by block, and nothing is
// gathered or copied. Two passes: scores (q . k * scale), then the softmax-weighted sum of values.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

// fp8 caches (kv_cache_dtype fp8), widened with integer shifts and a select, which vectorize
// (c10's conversion counts leading zeros per element, and e5m2's goes through fp16). A normal
// value's exponent and mantissa bits move into float's fields and its bias is added to the
// exponent; a subnormal (exponent 0) is its mantissa times the smallest step. No float
// subnormals are made, so -ffast-math's flush-to-zero cannot touch them.
inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <int kMantissa, int kBias>
inline float widen_fp8(uint8_t byte) {
  const uint32_t b = byte, magnitude = b & 0x7Fu;
  const float normal = bits_to_float((magnitude << (23 - kMantissa)) + ((127u - kBias) << 23));
  constexpr float kStep = 1.f / static_cast<float>(1u << (kBias - 1 + kMantissa));
  const float subnormal = static_cast<float>(magnitude & ((1u << kMantissa) - 1)) * kStep;
  const float value = (magnitude >> kMantissa) ? normal : subnormal;
  return (b & 0x80u) ? -value : value;
}

inline float widen(at::Float8_e4m3fn x) { return widen_fp8<3, 7>(x.x); }
inline float widen(at::Float8_e5m2 x) { return widen_fp8<2, 15>(x.x); }

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += q[i] * widen(k[i]);
  return s;
}

// One request: every query head over the request's tokens. Each token's K row (all KV heads,
// Hkv * D values) is contiguous, so the blocks are read front to back, once.
template <typename T>
void decode_request(const float* q, const T* kc, const T* vc, const int64_t* table, int64_t start,
                    int64_t end, int64_t bs, int64_t hkv, int64_t heads, int64_t d, float scale,
                    float* out, std::vector<float>& scores) {
  const int64_t n = end - start, group = heads / hkv, row = hkv * d;
  scores.resize(heads * n);
  std::vector<float> maxs(heads, -std::numeric_limits<float>::infinity());
  for (int64_t t = start; t < end; ++t) {
    const T* k = kc + (table[t / bs] * bs + t % bs) * row;
    for (int64_t h = 0; h < heads; ++h) {
      const float s = dot(q + h * d, k + (h / group) * d, d) * scale;
      scores[h * n + (t - start)] = s;
      maxs[h] = std::max(maxs[h], s);
    }
  }
  std::vector<float> inv(heads);
  for (int64_t h = 0; h < heads; ++h) {  // head-major scores: a plain vector exp per head
    float* sh = scores.data() + h * n;
    const float m = maxs[h];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sh[i] = std::exp(sh[i] - m);
      sum += sh[i];
    }
    inv[h] = 1.f / sum;
  }
  std::fill(out, out + heads * d, 0.f);
  for (int64_t t = start; t < end; ++t) {
    const T* v = vc + (table[t / bs] * bs + t % bs) * row;
    for (int64_t h = 0; h < heads; ++h) {
      const float p = scores[h * n + (t - start)] * inv[h];
      const T* vh = v + (h / group) * d;
      float* o = out + h * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += p * widen(vh[i]);
    }
  }
}

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
         const torch::Tensor& tables, const torch::Tensor& lens, float scale, int64_t window,
         torch::Tensor& out) {
  const int64_t bd = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), hkv = k_cache.size(2);
  const int64_t max_blocks = tables.size(1);
  const float* qp = q.data_ptr<float>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, bd, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lp[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      decode_request<T>(qp + b * heads * d, kp, vp, tp + b * max_blocks, start, len, bs, hkv,
                        heads, d, scale, op + b * heads * d, scores);
    }
  });
}

}  // namespace

// q (Bd, H, D) fp32; k_cache/v_cache (num_blocks, block_size, Hkv, D), contiguous;
// block_tables (Bd, max_blocks) int64; context_lens (Bd,) int64; window <= 0: no sliding window.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                           int64_t window) {
  TORCH_CHECK(q.is_contiguous() && q.scalar_type() == torch::kFloat, "q must be contiguous fp32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "cache must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  auto out = torch::empty_like(q);
  if (k_cache.scalar_type() == torch::kFloat) {
    run<float>(q, k_cache, v_cache, tables, lens, scale, window, out);
  } else if (k_cache.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(q, k_cache, v_cache, tables, lens, scale, window, out);
  } else if (k_cache.scalar_type() == torch::kFloat8_e4m3fn) {  // kv_cache_dtype fp8
    run<at::Float8_e4m3fn>(q, k_cache, v_cache, tables, lens, scale, window, out);
  } else if (k_cache.scalar_type() == torch::kFloat8_e5m2) {
    run<at::Float8_e5m2>(q, k_cache, v_cache, tables, lens, scale, window, out);
  } else {
    TORCH_CHECK(false, "paged_decode supports fp32, bf16 and fp8 caches");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
