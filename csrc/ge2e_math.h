// Per-element math of the GE2E loss, shared by the CPU and the CUDA kernels.
//
// Everything here is a small inline function of scalars, compiled for the host
// and (under nvcc) for the device, so the CUDA kernels run exactly the formulas
// that the CPU kernel, and therefore gradcheck and the parity tests, exercise.
// The notation follows shared/design/ge2e-math.md: a row is one utterance e_ji,
// s_k the sum of speaker k's utterances, u_ji = s_j - e_ji the (unnormalised)
// exclusive centroid, S = w * max(cos, min_cosine) + b the similarity.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GE2E_HD __host__ __device__ __forceinline__
#else
// Forced inline: the CPU kernel's loops only vectorize with these inside.
#define GE2E_HD inline __attribute__((always_inline))
#endif

namespace ge2e {

enum LossMethod : int { kSoftmax = 0, kContrast = 1 };

// The paper requires w > 0; the forward uses max(w, kMinW) (see README).
constexpr double kMinW = 1e-6;

template <typename T>
GE2E_HD bool is_nan(T x) { return x != x; }

template <typename T>
GE2E_HD T infinity() { return static_cast<T>(HUGE_VAL); }

// Overloads instead of std:: so that the same call compiles on the device.
GE2E_HD float sqrt_(float x) { return ::sqrtf(x); }
GE2E_HD double sqrt_(double x) { return ::sqrt(x); }
GE2E_HD double exp_(double x) { return ::exp(x); }

// exp for float. On the device: the CUDA library's expf. On the host: a
// branch-free Cephes-style exp (range reduction by ln 2 in two parts, a
// degree-5 polynomial, 2^n built in the exponent bits), within 2 ulp of expf
// over the float range, which the compiler inlines and vectorizes: the CPU
// kernel evaluates one exp per similarity, and libm's scalar call would be
// most of its time. NaN propagates; overflow gives inf, underflow 0.
GE2E_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  const float kMaxArg = 88.72283172607421875f;   // log(FLT_MAX)
  const float kMinArg = -87.33654022216796875f;  // log(FLT_MIN): below, 0
  const bool overflow = x > kMaxArg;
  const bool underflow = x < kMinArg;
  float xc = (overflow || underflow) ? 0.0f : x;
  xc = xc == xc ? xc : 0.0f;  // NaN is put back at the end
  // n = nearest integer to x / ln 2 (adding 1.5 * 2^23 rounds to an integer).
  const float kRound = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float y = poly * r * r + r + 1.0f;
  const int32_t scale_bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &scale_bits, sizeof(scale));
  const float result = y * scale;
  return x != x ? x : (overflow ? infinity<float>() : (underflow ? 0.0f : result));
#endif
}
GE2E_HD float log_(float x) { return ::logf(x); }
GE2E_HD double log_(double x) { return ::log(x); }

// 1/|v| from |v|^2, and 0 for a zero vector: cos(0, v) is then 0 and its
// gradient 0, so zero-norm embeddings give a finite loss instead of the
// reference's 0/0. An infinite norm gives 0 too, and the inf * 0 in the
// cosine turns into NaN, which is what a non-finite input must produce.
template <typename T>
GE2E_HD T inverse_norm(T squared_norm) {
  return squared_norm > T(0) ? T(1) / sqrt_(squared_norm) : T(0);
}

// The scalar parameters of one call, already in the accumulation type.
template <typename T>
struct SimilarityParams {
  T w;            // max(w, kMinW): the scale actually applied
  T b;
  T min_cosine;   // ignored unless clamp
  bool clamp;     // false: the paper's unclamped cosine
  bool w_active;  // w >= kMinW: whether dLoss/dw flows (torch.clamp's rule)
};

template <typename T>
GE2E_HD SimilarityParams<T> make_params(T raw_w, T b, double min_cosine, bool clamp) {
  SimilarityParams<T> p;
  const T min_w = static_cast<T>(kMinW);
  // NaN-propagating max: a NaN w must not become kMinW.
  p.w = raw_w < min_w ? min_w : raw_w;
  // A non-finite w or b makes every similarity NaN: the contrast loss would
  // otherwise saturate its sigmoids into a finite, meaningless number.
  if (!(raw_w - raw_w == T(0)) || !(b - b == T(0))) p.w = infinity<T>() - infinity<T>();
  p.b = b;
  p.min_cosine = static_cast<T>(min_cosine);
  p.clamp = clamp;
  p.w_active = !(raw_w < min_w);
  return p;
}

// cos(a, v) from the dot product and both inverse norms.
template <typename T>
GE2E_HD T cosine(T dot, T inv_norm_a, T inv_norm_v) {
  return dot * inv_norm_a * inv_norm_v;
}

// max(cos, min_cosine) that propagates NaN, like torch.clamp.
template <typename T>
GE2E_HD T clamp_cosine(T raw_cos, const SimilarityParams<T>& p) {
  return (p.clamp && raw_cos < p.min_cosine) ? p.min_cosine : raw_cos;
}

// d clamp / d cos: 1 where the clamp is inactive (torch.clamp passes the
// gradient at equality), and for NaN so that a NaN keeps flowing.
template <typename T>
GE2E_HD T clamp_gradient_mask(T raw_cos, const SimilarityParams<T>& p) {
  return (p.clamp && raw_cos < p.min_cosine) ? T(0) : T(1);
}

template <typename T>
GE2E_HD T similarity(T raw_cos, const SimilarityParams<T>& p) {
  return p.w * clamp_cosine(raw_cos, p) + p.b;
}

template <typename T>
GE2E_HD T sigmoid(T x) { return T(1) / (T(1) + exp_(-x)); }

// Online log-sum-exp over a row of similarities (flash-attention style): one
// pass, no stored row. A NaN similarity makes the sum NaN, never dropped.
template <typename T>
struct LogSumExp {
  T max;
  T sum;
  GE2E_HD LogSumExp() : max(-infinity<T>()), sum(T(0)) {}
  GE2E_HD void add(T s) {
    if (s > max) {
      sum = sum * exp_(max - s) + T(1);
      max = s;
    } else {
      sum += exp_(s - max);
    }
  }
  // Combines two partial rows (parallel reductions).
  GE2E_HD void merge(const LogSumExp& other) {
    if (other.sum == T(0)) return;  // other saw nothing
    if (sum == T(0)) { *this = other; return; }
    if (other.max > max) {
      sum = sum * exp_(max - other.max) + other.sum;
      max = other.max;
    } else {
      sum += other.sum * exp_(other.max - max);
    }
  }
  GE2E_HD T value() const { return max + log_(sum); }
};

// The hardest impostor: arg-max of the similarity over k != j. Ties go to the
// lowest k (sequential scans and tree merges agree on that), a NaN beats any
// number so that it propagates, and the first element is always taken so the
// index is valid even when every similarity is -inf.
template <typename T>
struct HardestImpostor {
  T value;
  int64_t index;
  GE2E_HD HardestImpostor() : value(-infinity<T>()), index(-1) {}
  GE2E_HD bool beats(T v, int64_t k) const {
    if (index < 0) return true;
    if (is_nan(value)) return is_nan(v) && k < index;
    if (is_nan(v)) return true;
    return v > value || (v == value && k < index);
  }
  GE2E_HD void add(T v, int64_t k) {
    if (beats(v, k)) { value = v; index = k; }
  }
  GE2E_HD void merge(const HardestImpostor& other) {
    if (other.index >= 0) add(other.value, other.index);
  }
};

// L_ji for the softmax loss (eq. 6): logsumexp_k S_jik - S_jij.
template <typename T>
GE2E_HD T softmax_row_loss(T log_sum_exp, T own_similarity) {
  return log_sum_exp - own_similarity;
}

// L_ji for the contrast loss (eq. 7): 1 - sig(S_jij) + max_{k != j} sig(S_jik),
// where the max of the sigmoid is the sigmoid of the max (sigmoid is monotone).
template <typename T>
GE2E_HD T contrast_row_loss(T own_similarity, T hardest_similarity) {
  return T(1) - sigmoid(own_similarity) + sigmoid(hardest_similarity);
}

// dL_ji/dS_jik times the upstream gradient of the row, softmax: p_jik - [k == j].
template <typename T>
GE2E_HD T softmax_similarity_grad(T s, T log_sum_exp, bool own, T grad_row) {
  return grad_row * (exp_(s - log_sum_exp) - (own ? T(1) : T(0)));
}

// Contrast: -sig'(S_jij) on the own speaker, +sig'(S_jik*) on the hardest
// impostor k*, zero elsewhere.
template <typename T>
GE2E_HD T contrast_similarity_grad(T s, bool own, T grad_row) {
  const T sig = sigmoid(s);
  const T slope = sig * (T(1) - sig);
  return own ? -grad_row * slope : grad_row * slope;
}

// dLoss/d(raw cos) from dLoss/dS: through S = w * clamp(cos) + b.
template <typename T>
GE2E_HD T cosine_grad(T similarity_grad, T raw_cos, const SimilarityParams<T>& p) {
  return p.w * similarity_grad * clamp_gradient_mask(raw_cos, p);
}

// The own-speaker cosine cos(e, u) with u = s - e, from the three dot products
// e.e, e.u and u.u that a kernel accumulates directly over u (never through
// |s|^2 - 2 e.s + |e|^2, which cancels catastrophically when u is small).
template <typename T>
struct OwnCosine {
  T inv_norm_e;
  T inv_norm_u;
  T raw_cos;
};

template <typename T>
GE2E_HD OwnCosine<T> own_cosine(T ee, T eu, T uu) {
  OwnCosine<T> c;
  c.inv_norm_e = inverse_norm(ee);
  c.inv_norm_u = inverse_norm(uu);
  c.raw_cos = cosine(eu, c.inv_norm_e, c.inv_norm_u);
  return c;
}

// What the backward keeps per row between its two passes: h = dLoss/dcos(e, u)
// and the row's OwnCosine, stored as kOwnTermsSize consecutive numbers.
constexpr int kOwnTermsSize = 4;

template <typename T>
GE2E_HD void store_own_terms(T* out, T h, const OwnCosine<T>& c) {
  out[0] = h;
  out[1] = c.inv_norm_e;
  out[2] = c.inv_norm_u;
  out[3] = c.raw_cos;
}

template <typename T>
GE2E_HD OwnCosine<T> load_own_terms(const T* in, T* h) {
  *h = in[0];
  OwnCosine<T> c;
  c.inv_norm_e = in[1];
  c.inv_norm_u = in[2];
  c.raw_cos = in[3];
  return c;
}

// One coordinate of the own-speaker gradient with h = dLoss/dcos(e, u):
//   dcos/de = u/(|e||u|) - cos e/|e|^2   (through e as the first argument)
//   q       = h * (e/(|e||u|) - cos u/|u|^2)  (through u, which is s - e)
// The row receives h * dcos/de - q, and the speaker sum s receives q.
template <typename T>
GE2E_HD T own_grad_wrt_embedding(T h, const OwnCosine<T>& c, T e, T u) {
  return h * (c.inv_norm_e * c.inv_norm_u * u - c.raw_cos * c.inv_norm_e * c.inv_norm_e * e);
}

template <typename T>
GE2E_HD T own_grad_wrt_centroid(T h, const OwnCosine<T>& c, T e, T u) {
  return h * (c.inv_norm_e * c.inv_norm_u * e - c.raw_cos * c.inv_norm_u * c.inv_norm_u * u);
}

// The cross-speaker gradients come from two matrix products with
// H_rk = h_rk / (|e_r| |s_k|):  T = H S and Z = H^T E. Because
// e_r . T_r = sum_k h_rk cos_rk (and s_k . Z_k = sum_r h_rk cos_rk), the
// cos * a / |a|^2 terms of dcos/da and dcos/dv are projections, so
//   dLoss/de_r (cross) = T_r - e_r (e_r . T_r) / |e_r|^2
//   dLoss/ds_k (cross) = Z_k - s_k (s_k . Z_k) / |s_k|^2
// which needs no row or column sums of h * cos.
template <typename T>
GE2E_HD T remove_projection(T value, T along, T dot_with_along, T inv_norm_along) {
  return value - along * dot_with_along * inv_norm_along * inv_norm_along;
}

}  // namespace ge2e
