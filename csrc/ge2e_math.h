// The math of the GE2E loss, shared by the CPU and the CUDA kernels.
//
// Everything here is a small inline function or struct of scalars, compiled
// for the host and (under nvcc) for the device, so the CUDA kernels run
// exactly the formulas that the CPU kernel, and therefore gradcheck and the
// parity tests, exercise. docs/math.md derives every formula; the names follow
// it: a row r = (j, i) is utterance e_ji, s_k the sum of speaker k's
// utterances, u_ji the sum of speaker j's other utterances (parallel to the
// exclusive centroid), c the clamped cosine, S = w c + b the similarity.
//
// The loss methods are policies (SoftmaxLoss, ContrastLoss below): each says
// what a row keeps while it scans its K cosines, the row's loss, and the
// gradient of each similarity. The kernels are templates over the policy;
// dispatch_loss_method() picks it once per call (LossMethods lists them).
#pragma once

#include <cmath>
#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define GE2E_HD __host__ __device__ __forceinline__
#else
// Forced inline: the CPU kernel's row loops only vectorize with these inside.
#define GE2E_HD inline __attribute__((always_inline))
#endif

// The CPU kernels are compiled once per instruction set (cpu/isa/, with
// GE2E_CPU_ISA defined, e.g. avx2) and picked at run time. Every inline
// function and template they use lives in a namespace of that instruction
// set's own, so that the linker can never hand the portable code a copy
// compiled with AVX2 or AVX-512 instructions.
#ifndef GE2E_CPU_ISA
#define GE2E_CPU_ISA portable
#endif
#define GE2E_ISA_NAMESPACE_(isa) isa_##isa
#define GE2E_ISA_NAMESPACE(isa) GE2E_ISA_NAMESPACE_(isa)
#define GE2E_ISA_BEGIN inline namespace GE2E_ISA_NAMESPACE(GE2E_CPU_ISA) {
#define GE2E_ISA_END }

namespace ge2e {
GE2E_ISA_BEGIN

// ---------------------------------------------------------------- scalars

template <typename T>
GE2E_HD bool is_nan(T x) { return x != x; }

// False for NaN and +-inf.
template <typename T>
GE2E_HD bool is_finite(T x) { return x - x == T(0); }

template <typename T>
GE2E_HD T infinity() { return static_cast<T>(HUGE_VAL); }

template <typename T>
GE2E_HD T quiet_nan() { return static_cast<T>(NAN); }

// Overloads instead of std:: so that the same call compiles on the device.
GE2E_HD float sqrt_(float x) { return ::sqrtf(x); }
GE2E_HD double sqrt_(double x) { return ::sqrt(x); }
GE2E_HD float log_(float x) { return ::logf(x); }
GE2E_HD double log_(double x) { return ::log(x); }
GE2E_HD float log1p_(float x) { return ::log1pf(x); }
GE2E_HD double log1p_(double x) { return ::log1p(x); }
GE2E_HD float expm1_(float x) { return ::expm1f(x); }
GE2E_HD double expm1_(double x) { return ::expm1(x); }
GE2E_HD double exp_(double x) { return ::exp(x); }
GE2E_HD float frexp_(float x, int* e) { return ::frexpf(x, e); }
GE2E_HD double frexp_(double x, int* e) { return ::frexp(x, e); }
GE2E_HD float ldexp_(float x, int e) { return ::ldexpf(x, e); }
GE2E_HD double ldexp_(double x, int e) { return ::ldexp(x, e); }
GE2E_HD float abs_(float x) { return ::fabsf(x); }
// a * b rounded, never fused into a later addition (a multiply-add would
// change a value that must equal, bit for bit, one computed elsewhere). The
// host code is compiled with -ffp-contract=off (setup.py); nvcc contracts by
// default, so the device takes the intrinsics that it never contracts.
GE2E_HD float mul_rounded(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GE2E_HD double mul_rounded(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GE2E_HD double abs_(double x) { return ::fabs(x); }

// exp for float. On the device: the CUDA library's expf. On the host: a
// branch-free Cephes-style exp (range reduction by ln 2 in two parts, a
// degree-5 polynomial, 2^n applied as two factors built in the exponent bits
// so that subnormal results come out too), within 2 ulp of expf over the float
// range, which the compiler inlines and vectorizes: the CPU kernel evaluates
// one exp per similarity, and libm's scalar call would be most of its time.
// NaN propagates; overflow gives inf, underflow (below the least subnormal) 0.
GE2E_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  const float kMaxArg = 88.72283172607421875f;  // log(FLT_MAX)
  const float kMinArg = -103.972084045410156f;  // log of half the least subnormal
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
  // 2^n = 2^half * 2^(n - half), each factor a normal float for n in [-150, 128].
  const int32_t whole = static_cast<int32_t>(n);
  const int32_t half = whole / 2;
  const int32_t first_bits = (half + 127) << 23;
  const int32_t second_bits = (whole - half + 127) << 23;
  float first, second;
  __builtin_memcpy(&first, &first_bits, sizeof(first));
  __builtin_memcpy(&second, &second_bits, sizeof(second));
  const float result = (y * first) * second;
  return x != x ? x : (overflow ? infinity<float>() : (underflow ? 0.0f : result));
#endif
}

// 1/(1 + exp(-x)): relative accuracy for every x (1 - sigmoid(x) is written
// sigmoid(-x) wherever it is needed, never as a difference).
template <typename T>
GE2E_HD T sigmoid(T x) { return T(1) / (T(1) + exp_(-x)); }

// sigmoid'(x) = sigmoid(x) sigmoid(-x), accurate where sigmoid(x) rounds to 1.
template <typename T>
GE2E_HD T sigmoid_slope(T x) { return sigmoid(x) * sigmoid(-x); }

// 1/|v| from |v|^2, and 0 for a zero vector: cos(0, v) is then 0 and its
// gradient 0, so zero-norm embeddings give a finite loss instead of the
// original code's 0/0. An infinite norm gives 0 too, and the inf * 0 in the
// cosine turns into NaN, which is what a non-finite input must produce.
template <typename T>
GE2E_HD T inverse_norm(T squared_norm) {
  return squared_norm > T(0) ? T(1) / sqrt_(squared_norm) : T(0);
}

template <typename T>
GE2E_HD T cosine(T dot, T inv_norm_a, T inv_norm_v) {
  return dot * inv_norm_a * inv_norm_v;
}

// ------------------------------------------------------------- scale
//
// A cosine does not depend on the lengths of its vectors, so the kernels work
// on vectors multiplied by powers of two (exact: only the exponent changes)
// that bring their largest coordinate into [0.5, 1). Squared norms then
// neither overflow nor underflow, whatever the embeddings' scale within the
// dtype's normal range (docs/math.md, "Scale"): a speaker's sum s_j is summed
// from its utterances times sigma_j (from the speaker's largest |x|) and
// normalised once more into s''_j (largest coordinate in [0.5, 1)), each row's
// own-speaker terms are taken of scaled copies of e and u, and every formula
// that needs a 1/|v|^2 is ordered as (v/|v|)(a.v/|v|), never 1/|v|^2 alone.

// The largest exponent e with 2^e a normal number, less one (so that a scale
// and the value it multiplies stay away from overflow).
template <typename T>
GE2E_HD int max_scale_exponent() { return sizeof(T) == sizeof(double) ? 1022 : 126; }

// The power of two 2^-e that brings max_abs (> 0, finite) into [0.5, 1); 1 for
// 0, NaN and infinity (so that a zero vector stays zero and a non-finite one
// stays non-finite). A scale-up is capped at 2^max_scale_exponent (a
// subnormal max_abs is then only brought near the normal range).
template <typename T>
GE2E_HD T power_of_two_scale(T max_abs) {
  if (!(max_abs > T(0)) || !is_finite(max_abs)) return T(1);
  int e = 0;
  frexp_(max_abs, &e);  // max_abs = f 2^e, f in [0.5, 1)
  const int limit = max_scale_exponent<T>();
  return ldexp_(T(1), -e < limit ? -e : limit);
}

// A vector whose largest |coordinate| is at most 1 and whose inverse norm is
// at most this lost nothing to underflow in its squared norm (its norm is at
// least 2^-30, 2^-300 for double, and D coordinates below the least normal
// number add at most D times the least subnormal to its square).
template <typename T>
GE2E_HD T safe_max_inverse_norm() {
  return sizeof(T) == sizeof(double) ? T(2.037035976334486e+90) /* 2^300 */
                                     : T(1073741824.0) /* 2^30 */;
}

// ------------------------------------------------------------- unit rows
//
// normalize=True: the loss of the rows e_r / max(|e_r|, eps), eps = 1e-12, as
// torch.nn.functional.normalize makes them (the paper's e_ji is the network's
// L2-normalised output; the centroids are then means of unit vectors). |e_r|
// is taken of e_r times power_of_two_scale(max |e_r,d|), so that its square
// neither overflows nor underflows. The gradient through the normalisation,
// from g = dLoss/d(unit row) u = e / |e|:
//   |e| > eps:  (g - u (u . g)) / |e|     (d(e/|e|)/de = (I - u u^T) / |e|)
//   otherwise:  g / eps                   (the clamp at eps passes no gradient
//                                          to |e|, at the bound included)
// A NaN norm stays NaN in both (as torch's clamp propagates it).
constexpr double kNormalizeEps = 1e-12;

// |e| from the scaled sum of squares of e times scale (power_of_two_scale).
template <typename T>
GE2E_HD T row_norm(T scaled_squares, T scale) { return sqrt_(scaled_squares) / scale; }

// max(|e|, eps): what the row is divided by (NaN stays NaN).
template <typename T>
GE2E_HD T normalize_denominator(T norm) {
  return norm < T(kNormalizeEps) ? T(kNormalizeEps) : norm;
}

// Whether the row's gradient goes through its norm: |e| > eps, or NaN.
template <typename T>
GE2E_HD bool norm_passes_gradient(T norm) { return !(norm <= T(kNormalizeEps)); }

// Coordinate d of dLoss/de_r from g_d = dLoss/du_d, u_d = e_d / |e| and
// u_dot_g = u . g (computed where norm_passes_gradient(norm)).
template <typename T>
GE2E_HD T unit_row_grad(T g_d, T e_d, T u_dot_g, T norm) {
  return norm_passes_gradient(norm) ? (g_d - (e_d / norm) * u_dot_g) / norm
                                    : g_d / T(kNormalizeEps);
}

// ------------------------------------------------- sums without cancellation

// hi += x keeping lo += the rounding error of hi (Knuth's TwoSum,
// exact in round-to-nearest; no multiplication, so FMA contraction cannot
// change it). The sum of a speaker's utterances minus one of them, taken as
// (hi - x) + lo, is then as accurate as summing the others directly: when x
// dominates, hi - x is exact (Sterbenz), and lo carries what hi lost of the
// small terms. The plain s - x would cancel (docs/math.md, "Numerics").
template <typename T>
GE2E_HD void add_compensated(T& hi, T& lo, T x) {
  const T sum = hi + x;
  const T x_part = sum - hi;
  lo += (hi - (sum - x_part)) + (x - x_part);
  hi = sum;
}

// The sum hi + lo of some terms without one of them, `term` (bitwise one of
// the terms added).
template <typename T>
GE2E_HD T sum_without(T hi, T lo, T term) { return (hi - term) + lo; }

// ---------------------------------------------------------- the similarity

// The paper requires w > 0; the forward uses max(w, kMinW) (see README).
constexpr double kMinW = 1e-6;

// The scalar parameters of one call, in the accumulation type.
template <typename T>
struct SimilarityParams {
  T w;               // max(w, kMinW), or NaN when w or b is not finite
  T b;
  T min_cosine;      // used when clamp
  bool clamp;        // false: the paper's unclamped cosine
  bool w_grad_flows; // raw w > kMinW: torch.clamp passes no gradient at or below its bound
  bool poisoned;     // w or b is NaN or infinite: every output is NaN
};

template <typename T>
GE2E_HD SimilarityParams<T> make_params(T raw_w, T b, double min_cosine, bool clamp) {
  SimilarityParams<T> p;
  const T min_w = static_cast<T>(kMinW);
  p.poisoned = !is_finite(raw_w) || !is_finite(b);
  // A non-finite w or b makes every similarity NaN: a saturated sigmoid would
  // otherwise turn it into a finite, meaningless contrast loss, and the
  // softmax loss, which does not depend on b, would hide a NaN b.
  p.w = p.poisoned ? quiet_nan<T>() : (raw_w > min_w ? raw_w : min_w);
  p.b = b;
  p.min_cosine = static_cast<T>(min_cosine);
  p.clamp = clamp;
  p.w_grad_flows = raw_w > min_w;
  return p;
}

// max(cos, min_cosine), NaN-propagating like torch.clamp.
template <typename T>
GE2E_HD T clamp_cosine(T raw_cos, const SimilarityParams<T>& p) {
  return (p.clamp && raw_cos < p.min_cosine) ? p.min_cosine : raw_cos;
}

template <typename T>
GE2E_HD T similarity(T clamped_cos, const SimilarityParams<T>& p) {
  return p.w * clamped_cos + p.b;
}

// dLoss/d(raw cos) from dLoss/dS through S = w * clamp(cos) + b. Like
// torch.clamp's backward, no gradient where the cosine is at or below the
// bound (nor where it is NaN): a select, not a product, so it stays 0; but
// a poisoned call's NaN goes everywhere.
template <typename T>
GE2E_HD T cosine_grad(T similarity_grad, T raw_cos, const SimilarityParams<T>& p) {
  return (!p.clamp || raw_cos > p.min_cosine || p.poisoned) ? p.w * similarity_grad : T(0);
}

// dLoss/dw and dLoss/db of the call from the sums of the rows' terms.
template <typename T>
GE2E_HD T w_grad(T total, const SimilarityParams<T>& p) {
  return p.poisoned ? quiet_nan<T>() : (p.w_grad_flows ? total : T(0));
}
template <typename T>
GE2E_HD T b_grad(T total, const SimilarityParams<T>& p) {
  return p.poisoned ? quiet_nan<T>() : total;
}

// ---------------------------------------------- the own-speaker (exclusive) term

// cos(e, u) of a row with the sum u of its speaker's other utterances, from
// e'.e', e'.u', u'.u' of scaled copies e' = e_scale e and u' = u_scale u~,
// u~ = sigma_j u being the exclusive sum in the speaker's scaled sums (see
// "scale" above). inv_norm_e, inv_norm_u are 1/|e'|, 1/|u'|: O(1) numbers.
template <typename T>
struct OwnCosine {
  T e_scale;
  T u_scale;
  T inv_norm_e;
  T inv_norm_u;
  T raw_cos;
};

template <typename T>
GE2E_HD OwnCosine<T> own_cosine(T ee, T eu, T uu, T e_scale, T u_scale) {
  OwnCosine<T> c;
  c.e_scale = e_scale;
  c.u_scale = u_scale;
  c.inv_norm_e = inverse_norm(ee);
  c.inv_norm_u = inverse_norm(uu);
  c.raw_cos = cosine(eu, c.inv_norm_e, c.inv_norm_u);
  return c;
}

// Whether the squared norms of a row's e' and u' may have lost digits to
// underflow (or were 0: all of it, or a zero vector): then the row is scaled
// on its own, own_cosine again with e_scale, u_scale from the row's largest
// coordinates (which changes nothing for a zero or non-finite vector).
template <typename T>
GE2E_HD bool needs_own_scales(const OwnCosine<T>& c) {
  const T big = safe_max_inverse_norm<T>();
  return !(c.inv_norm_e > T(0) && c.inv_norm_e <= big) ||
         !(c.inv_norm_u > T(0) && c.inv_norm_u <= big);
}

// 1/|e| of the unscaled row (a gradient's scale: it may overflow only where
// the gradient does).
template <typename T>
GE2E_HD T true_inverse_norm_e(const OwnCosine<T>& c) { return c.inv_norm_e * c.e_scale; }

// What a row keeps between the kernels: its OwnCosine and, once the gradient
// is known, own_grad = dLoss/d(raw cos(e, u)). kOwnTermsSize numbers a row.
constexpr int kOwnTermsSize = 6;

template <typename T>
GE2E_HD void store_own_cosine(T* out, const OwnCosine<T>& c) {
  out[0] = c.e_scale;
  out[1] = c.u_scale;
  out[2] = c.inv_norm_e;
  out[3] = c.inv_norm_u;
  out[4] = c.raw_cos;
}

template <typename T>
GE2E_HD OwnCosine<T> load_own_cosine(const T* in) {
  OwnCosine<T> c;
  c.e_scale = in[0];
  c.u_scale = in[1];
  c.inv_norm_e = in[2];
  c.inv_norm_u = in[3];
  c.raw_cos = in[4];
  return c;
}

constexpr int kOwnGradSlot = 5;

// One coordinate of the own term's gradient, with own_grad = dLoss/d(raw cos(e, u)),
// e and u~ the raw row and the speaker-scaled exclusive sum (e' = e_scale e,
// u' = u_scale u~ as in OwnCosine):
//   through e:  own_grad/|e| (u'/|u'| - cos e'/|e'|)
//   through u:  q = own_grad/|u| (e'/|e'| - cos u'/|u'|), which every other
//               utterance of the speaker receives (u is their sum), with
//               1/|u| = sigma_j u_scale/|u'|, sigma_j the speaker's scale.
template <typename T>
GE2E_HD T own_grad_through_embedding(T own_grad, const OwnCosine<T>& c, T e, T u) {
  const T unit_e = e * c.e_scale * c.inv_norm_e;
  const T unit_u = u * c.u_scale * c.inv_norm_u;
  return (own_grad * c.inv_norm_e * c.e_scale) * (unit_u - c.raw_cos * unit_e);
}

template <typename T>
GE2E_HD T own_grad_through_others(T own_grad, const OwnCosine<T>& c, T e, T u, T speaker_scale) {
  const T unit_e = e * c.e_scale * c.inv_norm_e;
  const T unit_u = u * c.u_scale * c.inv_norm_u;
  return ((own_grad * c.inv_norm_u) * c.u_scale * speaker_scale) * (unit_e - c.raw_cos * unit_u);
}

// The cross-speaker gradients come from two matrix products with
// H_rk = h_rk / (|e_r| |s_k|): T = H S and Z = H^T E. The cos * a / |a|^2
// part of dcos/da is a projection, so
//   dLoss/de_r (t_rows) = T_r - e_r (e_r . T_r) / |e_r|^2
//   dLoss/ds_k         = Z_k - s_k (s_k . Z_k) / |s_k|^2
//
// Written value - (a/|a|)((a . value)/|a|), never with 1/|a|^2 alone (which
// overflows for tiny a); `along` and `inv_norm_along` may be those of a copy
// a' of a scaled by a power of two, dot_with_along being a' . value.
template <typename T>
GE2E_HD T remove_projection(T value, T along, T dot_with_along, T inv_norm_along) {
  return value - (along * inv_norm_along) * (dot_with_along * inv_norm_along);
}

// The cosine of row e with a scaled sum s''_k from their dot product
// e . s''_k (the matrix product E S''^T on the raw rows): the product is
// taken to e' = e_scale e (exact), then divided by the O(1) norms.
template <typename T>
GE2E_HD T cross_cosine(T dot, const OwnCosine<T>& row, T inv_norm_sum) {
  return ((dot * row.e_scale) * row.inv_norm_e) * inv_norm_sum;
}

// H_rk = h / (|e_r| |s''_k|) from the gradient h on the raw cosine.
template <typename T>
GE2E_HD T cross_cosine_weight(T cos_grad, const OwnCosine<T>& row, T inv_norm_sum) {
  return ((cos_grad * inv_norm_sum) * row.inv_norm_e) * row.e_scale;
}

// ------------------------------------------------------------ loss methods
//
// A row scans the clamped cosines c_k of its utterance to every other speaker
// k != own (own: its speaker's row of the sums). A method policy gives:
//   value(c_k, row)          what the row's Statistic is built from
//   Statistic<T>             add(value, k) / merge(other): the row's reduction
//                            (default-constructed: the identity)
//   row_statistic(values, K, own)
//                            the same reduction over a whole row of values
//                            held by one thread (values[own] is overwritten),
//                            written to vectorize
//   summarize(stat, row)     the row's RowSummary: L_ji and what its gradient needs
//   save_state / load_state  the summary as the kRowStateSize numbers a forward
//                            keeps for a later backward (not the loss)
//   impostor_grad(value_k, k, summary, row, grad_row)
//                            dL/dS_k for k != own, times the row's upstream gradient
//   own_grad(G, row, grad_row)
//                            dL/dS_own, given G = the sum of impostor_grad
//   kSparseGradient          whether impostor_grad is zero but for one k
//                            (summary.hardest), so a device may skip the
//                            cross-speaker matrix products
// Per row, dLoss/dw = sum_k g_k (c_k - c_own) + (g_own + G) c_own and
// dLoss/db = g_own + G (row_w_grad, row_b_grad below): for the softmax loss,
// g_own = -G exactly, so db is exactly 0 and dw has no cancelling terms.

// Independent accumulators of a reduction that one thread runs over a row:
// a single running value is a chain of dependent operations that the compiler
// may not reorder; 16 lanes fill an AVX-512 register of floats. The loops
// that use them are written out plainly (no lambdas), which is what GCC
// vectorizes.
constexpr int kRowLanes = 16;

// The row as a method sees it.
template <typename T>
struct RowView {
  T own_cos;                   // clamped cos(e, u)
  SimilarityParams<T> params;
};

// What a row's forward keeps for its backward (kRowStateSize float64 numbers a
// row, the `state` output of the forward op): not the loss, which the caller
// owns and may change, but what the method's gradient is taken from.
constexpr int kRowStateSize = 2;

// Every method's forward also says whether each row's own speaker is its
// top-1 (the forward ops' `top1` output: the batch's accuracy, read from the
// loss's own pass): whether no speaker k != own, at clamped cosine cos_k,
// takes the top-1 from the own speaker (own_cos, against the exclusive
// centroid). The top-1 is the arg-max of the row's clamped cosines with ties
// going to the lower index, as torch.argmax, so an impostor before the own
// speaker takes it on a tie and one after it does not; a NaN on either side
// takes it (a row with a NaN cosine has no top-1). Cosines, not similarities:
// the order is the same (w' = max(w, 1e-6) > 0), and w' c + b, rounded, could
// make two nearly equal cosines one similarity.
template <typename T>
GE2E_HD bool takes_top1(T cos_k, int64_t k, int64_t own, T own_cos) {
  return k < own ? !(own_cos > cos_k) : !(own_cos >= cos_k);
}

template <typename T>
struct RowSummary {
  T loss;
  T reference;       // SoftmaxLoss: the row's max d_k (or 0), exactly one of its values
  T log_normaliser;  // SoftmaxLoss: log(sum_k exp(d_k - reference)), own d = 0 included
  int64_t hardest;   // ContrastLoss: the hardest impostor; -1 where unused
};

// An impostor index read back from a saved state: -1 (no impostor, which
// poisons the row) unless it is a whole number that can index a row.
GE2E_HD int64_t index_from_state(double v) {
  return (v >= 0.0 && v < 4.6e18 && v == static_cast<double>(static_cast<int64_t>(v)))
             ? static_cast<int64_t>(v)
             : int64_t(-1);
}

// Softmax (eq. 6), computed from differences: S_k - S_own = w (c_k - c_own)
// does not contain b (the loss does not depend on it) and L = log(1 +
// sum_{k != own} exp(d_k)) is accurate to a few ulp of itself when the own
// speaker wins by a margin, where logsumexp(S) - S_own would subtract two
// numbers of size w + b.
struct SoftmaxLoss {
  static constexpr const char* kName = "softmax";
  static constexpr bool kSparseGradient = false;

  template <typename T>
  GE2E_HD static T value(T cos_k, const RowView<T>& row) {
    return mul_rounded(row.params.w, cos_k - row.own_cos);
  }

  // Online log-sum-exp of the differences d_k (flash-attention style), the
  // own speaker's d = 0 included implicitly: max starts at 0 and sum counts
  // exp(d_k - max) over k != own only. Branch-free: one exp per element, so
  // per-lane accumulators vectorize. A NaN value makes the sum NaN.
  template <typename T>
  struct Statistic {
    T max = T(0);
    T sum = T(0);
    GE2E_HD void add(T d, int64_t /*k*/) {
      const T gap = d - max;
      const T e = exp_(gap > T(0) ? -gap : gap);
      const bool larger = gap > T(0);
      sum = larger ? sum * e + T(1) : sum + e;
      max = larger ? d : max;
    }
    GE2E_HD void merge(const Statistic& other) {
      const T gap = other.max - max;
      const T e = exp_(gap > T(0) ? -gap : gap);
      const bool larger = gap > T(0);
      sum = larger ? sum * e + other.sum : sum + other.sum * e;
      max = larger ? other.max : max;
    }
  };

  // Two passes (a max, then independent exponentials) instead of the online
  // update's serial chain. The own speaker is set to -inf: exp gives it 0.
  template <typename T>
  GE2E_HD static Statistic<T> row_statistic(T* __restrict__ values, int64_t n, int64_t skip) {
    values[skip] = -infinity<T>();
    const int64_t body = n - n % kRowLanes;
    T max_lanes[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) max_lanes[l] = T(0);
    // A NaN is skipped here and caught by the sum, as in add().
    for (int64_t k = 0; k < body; k += kRowLanes) {
      for (int l = 0; l < kRowLanes; ++l) {
        max_lanes[l] = values[k + l] > max_lanes[l] ? values[k + l] : max_lanes[l];
      }
    }
    for (int64_t k = body; k < n; ++k) {
      max_lanes[k - body] = values[k] > max_lanes[k - body] ? values[k] : max_lanes[k - body];
    }
    Statistic<T> stat;
    for (int l = 0; l < kRowLanes; ++l) {
      stat.max = max_lanes[l] > stat.max ? max_lanes[l] : stat.max;
    }
    T sum_lanes[kRowLanes] = {};
    for (int64_t k = 0; k < body; k += kRowLanes) {
      for (int l = 0; l < kRowLanes; ++l) sum_lanes[l] += exp_(values[k + l] - stat.max);
    }
    for (int64_t k = body; k < n; ++k) sum_lanes[k - body] += exp_(values[k] - stat.max);
    for (int l = 0; l < kRowLanes; ++l) stat.sum += sum_lanes[l];
    return stat;
  }

  // L = max + log(exp(-max) + sum) = max + log1p(expm1(-max) + sum): exact
  // in form when the own speaker is the most similar (max = 0: log1p(sum)).
  // The max and the normaliser are kept apart: the probabilities are taken
  // against the max (exactly one of the d_k), never against L, which is
  // rounded at the scale of w (at w = 1e8 an ulp of L is larger than 1).
  template <typename T>
  GE2E_HD static RowSummary<T> summarize(const Statistic<T>& stat, const RowView<T>&) {
    RowSummary<T> s;
    s.reference = stat.max;
    s.log_normaliser = log1p_(expm1_(-stat.max) + stat.sum);
    s.loss = s.reference + s.log_normaliser;
    s.hardest = -1;
    return s;
  }

  template <typename T>
  GE2E_HD static void save_state(const RowSummary<T>& s, double* state) {
    state[0] = static_cast<double>(s.reference);
    state[1] = static_cast<double>(s.log_normaliser);
  }

  template <typename T>
  GE2E_HD static RowSummary<T> load_state(const double* state) {
    RowSummary<T> s;
    s.reference = static_cast<T>(state[0]);
    s.log_normaliser = static_cast<T>(state[1]);
    s.loss = s.reference + s.log_normaliser;
    s.hardest = -1;
    return s;
  }

  // p_k = exp((d_k - max) - log_normaliser), the softmax probability of
  // impostor k: d_k - max is exact where it matters (both are values of the row).
  template <typename T>
  GE2E_HD static T impostor_grad(T d, int64_t /*k*/, const RowSummary<T>& summary,
                                 const RowView<T>&, T grad_row) {
    return grad_row * exp_((d - summary.reference) - summary.log_normaliser);
  }

  // p_own - 1 = -sum_{k != own} p_k: no cancellation when p_own ~ 1.
  template <typename T>
  GE2E_HD static T own_grad(T impostor_grad_sum, const RowView<T>&, T /*grad_row*/) {
    return -impostor_grad_sum;
  }
};

// Contrast (eq. 7): L = 1 - sig(S_own) + max_{k != own} sig(S_k), written
// sig(-S_own) + sig(S_hardest) (no 1 - x cancellation). The hardest impostor
// is the arg-max of the clamped cosine (the similarity is increasing in it),
// chosen before any rounding of sigmoids: ties go to the lowest k, a NaN
// beats every number so it propagates, and the first candidate is always
// taken so the index is valid even for an all -inf row.
struct ContrastLoss {
  static constexpr const char* kName = "contrast";
  static constexpr bool kSparseGradient = true;

  template <typename T>
  GE2E_HD static T value(T cos_k, const RowView<T>&) { return cos_k; }

  template <typename T>
  struct Statistic {
    T max = -infinity<T>();
    int64_t index = -1;
    GE2E_HD bool beats(T v, int64_t k) const {
      if (k < 0) return false;  // an identity being merged
      if (index < 0) return true;
      if (is_nan(max)) return is_nan(v) && k < index;
      if (is_nan(v)) return true;
      return v > max || (v == max && k < index);
    }
    GE2E_HD void add(T v, int64_t k) {
      if (beats(v, k)) {
        max = v;
        index = k;
      }
    }
    GE2E_HD void merge(const Statistic& other) { add(other.max, other.index); }
  };

  // A max pass that vectorizes, then the first index that holds it (or the
  // first NaN).
  template <typename T>
  GE2E_HD static Statistic<T> row_statistic(T* __restrict__ values, int64_t n, int64_t skip) {
    values[skip] = -infinity<T>();
    const int64_t body = n - n % kRowLanes;
    T max_lanes[kRowLanes];
    bool nan_lanes[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) {
      max_lanes[l] = -infinity<T>();
      nan_lanes[l] = false;
    }
    for (int64_t k = 0; k < body; k += kRowLanes) {
      for (int l = 0; l < kRowLanes; ++l) {
        max_lanes[l] = values[k + l] > max_lanes[l] ? values[k + l] : max_lanes[l];
        nan_lanes[l] = nan_lanes[l] || is_nan(values[k + l]);
      }
    }
    for (int64_t k = body; k < n; ++k) {
      max_lanes[k - body] = values[k] > max_lanes[k - body] ? values[k] : max_lanes[k - body];
      nan_lanes[k - body] = nan_lanes[k - body] || is_nan(values[k]);
    }
    T max = -infinity<T>();
    bool any_nan = false;
    for (int l = 0; l < kRowLanes; ++l) {
      max = max_lanes[l] > max ? max_lanes[l] : max;
      any_nan = any_nan || nan_lanes[l];
    }
    Statistic<T> stat;
    for (int64_t k = 0; k < n; ++k) {
      if (k != skip && (any_nan ? is_nan(values[k]) : values[k] == max)) {
        stat.add(values[k], k);
        break;
      }
    }
    return stat;
  }

  template <typename T>
  GE2E_HD static RowSummary<T> summarize(const Statistic<T>& stat, const RowView<T>& row) {
    RowSummary<T> s;
    const T own_s = similarity(row.own_cos, row.params);
    s.loss = sigmoid(-own_s) + sigmoid(similarity(stat.max, row.params));
    s.reference = T(0);
    s.log_normaliser = T(0);
    s.hardest = stat.index;
    return s;
  }

  template <typename T>
  GE2E_HD static void save_state(const RowSummary<T>& s, double* state) {
    state[0] = static_cast<double>(s.hardest);
    state[1] = 0.0;
  }

  template <typename T>
  GE2E_HD static RowSummary<T> load_state(const double* state) {
    RowSummary<T> s;
    s.loss = T(0);
    s.reference = T(0);
    s.log_normaliser = T(0);
    s.hardest = index_from_state(state[0]);
    return s;
  }

  template <typename T>
  GE2E_HD static T impostor_grad(T cos_k, int64_t k, const RowSummary<T>& summary,
                                 const RowView<T>& row, T grad_row) {
    return k == summary.hardest ? grad_row * sigmoid_slope(similarity(cos_k, row.params)) : T(0);
  }

  template <typename T>
  GE2E_HD static T own_grad(T /*impostor_grad_sum*/, const RowView<T>& row, T grad_row) {
    return -grad_row * sigmoid_slope(similarity(row.own_cos, row.params));
  }
};

// The per-row dLoss/dw and dLoss/db (see the policy comment above), from
// G = sum_k g_k, the sum over impostors of g_k (c_k - c_own), and g_own.
template <typename T>
GE2E_HD T row_w_grad(T impostor_grad_sum, T weighted_gap_sum, T own_grad, T own_cos) {
  return weighted_gap_sum + (own_grad + impostor_grad_sum) * own_cos;
}
template <typename T>
GE2E_HD T row_b_grad(T impostor_grad_sum, T own_grad) { return own_grad + impostor_grad_sum; }

// Every loss method, in the order of their indices. Adding a method is a
// policy above and its name here, plus its entry in ge2e_ext/methods.py.
using LossMethods = std::tuple<SoftmaxLoss, ContrastLoss>;
constexpr int kNumLossMethods = static_cast<int>(std::tuple_size<LossMethods>::value);

// Calls fn(Policy{}) for the method with this index (one of LossMethods'):
// the one place where a method becomes a type.
template <int I = 0, typename Fn>
auto dispatch_loss_method(int method, Fn&& fn) {
  using Policy = typename std::tuple_element<I, LossMethods>::type;
  if constexpr (I + 1 < kNumLossMethods) {
    if (method != I) return dispatch_loss_method<I + 1>(method, fn);
  }
  return fn(Policy{});
}

// Whether the method with this index has a sparse gradient (kSparseGradient):
// what the driver, which keeps the method an index, asks of it.
inline bool has_sparse_gradient(int method) {
  return dispatch_loss_method(method,
                              [](auto policy) { return decltype(policy)::kSparseGradient; });
}

// The index of the method called `name`, or -1.
template <int I = 0, typename String>
int loss_method_index(const String& name) {
  if (name == std::tuple_element<I, LossMethods>::type::kName) return I;
  if constexpr (I + 1 < kNumLossMethods) return loss_method_index<I + 1>(name);
  return -1;
}

GE2E_ISA_END
}  // namespace ge2e
