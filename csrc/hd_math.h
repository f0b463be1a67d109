// Layer 1 of the kernels (docs/design.md, Conventions): arithmetic on registers, no memory access,
// no indexing; the helpers every algorithm's math header shares (correctly rounded operations,
// the reduction tree, AMP's unscale and skip, the HD sums and rule, the parameter step). Every function here is compiled both for the host (the CPU kernels) and for the
// device (the CUDA functors), so the CPU tests run the same arithmetic, in the same order, as the
// GPU.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HYPERLR_HOST_DEVICE __host__ __device__
#else
#define HYPERLR_HOST_DEVICE
#endif
// Forced inline on the host: a call left in a CPU kernel's element loop stops its vectorisation.
#if defined(__CUDACC__) || !(defined(__GNUC__) || defined(__clang__))
#define HYPERLR_INLINE HYPERLR_HOST_DEVICE inline
#else
#define HYPERLR_INLINE inline __attribute__((always_inline))
#endif

namespace hyperlr {
namespace math {

// ---- Reduction layout --------------------------------------------------------------------------
// A reduction over tensor lists is cut into chunks of kChunkSize elements (one CUDA block each;
// zero-size tensors give no chunk). Inside a chunk, lane l (= CUDA thread l) sums the elements
// i with i % kLanes == l in increasing order; the kLanes lane sums are then combined by a fixed
// binary tree (tree_level). The chunk results, in chunk order, are reduced the same way (lane
// sums, then the tree). The CPU kernels emulate the lanes, so CPU and GPU agree bit for bit and
// no result depends on the thread count or on scheduling.
constexpr int64_t kChunkSize = 65536;
constexpr int kLanes = 512;
static_assert((kLanes & (kLanes - 1)) == 0, "kLanes must be a power of two");

// Accumulation type: float for float/half/bfloat16 inputs, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// ---- Correctly rounded primitives --------------------------------------------------------------
// Separate multiply and add, each rounded to nearest. On the device the _rn intrinsics stop nvcc
// from contracting them into an FMA; the host files are compiled with -ffp-contract=off.
HYPERLR_INLINE float add_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(x, y);
#else
  return x + y;
#endif
}
HYPERLR_INLINE double add_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(x, y);
#else
  return x + y;
#endif
}
HYPERLR_INLINE float mul_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}
HYPERLR_INLINE double mul_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(x, y);
#else
  return x * y;
#endif
}

// ---- Dot products ------------------------------------------------------------------------------
// One term of <a, b> added to a lane's running sum: acc + a*b.
template <typename acc_t>
HYPERLR_INLINE acc_t dot_step(acc_t acc, acc_t a, acc_t b) {
  return add_rn(acc, mul_rn(a, b));
}

// One value added to a lane's running sum (the reduction of chunk results).
template <typename acc_t>
HYPERLR_INLINE acc_t sum_step(acc_t acc, acc_t value) {
  return add_rn(acc, value);
}

// One node of the tree over lane sums: at level `stride` (kLanes/2, kLanes/4, ..., 1), every
// lane < stride adds the lane `stride` above it. After the level stride == 1, lanes[0] holds the
// total.
template <typename acc_t>
HYPERLR_INLINE void tree_level(acc_t* lanes, int lane, int stride) {
  lanes[lane] = add_rn(lanes[lane], lanes[lane + stride]);
}

// g / S as GradScaler unscales it: g * (1 / S) (exactly g when inv_scale is 1).
template <typename acc_t>
HYPERLR_INLINE acc_t unscale(acc_t grad, acc_t inv_scale) {
  return mul_rn(grad, inv_scale);
}

// The running sums of one lane: <g^, d_{t-1}>, |g^|^2 and |d_{t-1}|^2.
template <typename acc_t>
struct HdSums {
  acc_t dot;
  acc_t grad_sq;
  acc_t dir_sq;
};

// Adds one element to a lane's sums; d_{t-1} counts only when the tensor has one.
template <typename acc_t>
HYPERLR_INLINE void hd_sums_step(HdSums<acc_t>& sums, acc_t objective, acc_t previous,
                                 bool has_previous) {
  sums.grad_sq = dot_step(sums.grad_sq, objective, objective);
  const acc_t dot = dot_step(sums.dot, objective, previous);
  const acc_t dir_sq = dot_step(sums.dir_sq, previous, previous);
  sums.dot = has_previous ? dot : sums.dot;
  sums.dir_sq = has_previous ? dir_sq : sums.dir_sq;
}

// w - lr * d (torch's addcmul_(d, -lr) on the parameter).
template <typename acc_t>
HYPERLR_INLINE acc_t param_step(acc_t param, acc_t direction, acc_t effective_lr) {
  return add_rn(param, mul_rn(direction, -effective_lr));
}

// Correctly rounded square root on the host and the device.
HYPERLR_INLINE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
HYPERLR_INLINE double sqrt_rn(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// Correctly rounded division (also under nvcc's -prec-div=false).
HYPERLR_INLINE float div_rn(float x, float y) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(x, y);
#else
  return x / y;
#endif
}
HYPERLR_INLINE double div_rn(double x, double y) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(x, y);
#else
  return x / y;
#endif
}

// The reciprocal of AMP's grad scale, in float32 like GradScaler's inv_scale (1 without a scaler).
HYPERLR_INLINE float inverse_grad_scale(const float* grad_scale) {
  return grad_scale == nullptr ? 1.0f : div_rn(1.0f, *grad_scale);
}

// True when AMP found an inf/NaN gradient: the step must change nothing.
HYPERLR_INLINE bool skips_step(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.0f;
}

// The settings of the Adam hyper-optimizer on log eta (hyper_optimizer="adam";
// hyperlr_ext/functional/_hd_rule.py, log_lr_adam_): beta1, beta2, eps of its moments and the
// bounds of eta.
template <typename acc_t>
struct LogLrAdamSettings {
  acc_t beta1;
  acc_t beta2;
  acc_t eps;
  acc_t lr_min;
  acc_t lr_max;
};

// The settings of the HD rule (hyperlr_ext/functional/_hd_rule.py, hd_rule_).
template <typename acc_t>
struct HdRuleSettings {
  acc_t hyper_lr;       // beta, or Adam's step size on log eta
  acc_t prev_lr_scale;  // s_{t-1}
  acc_t lr_scale;       // s_t
  bool multiplicative;
  bool lr_lag;  // the step applies eta_{t-1}, not eta_t
  bool adam;    // the Adam step on log eta (adam_settings) instead of the additive or
                // multiplicative rule
  LogLrAdamSettings<acc_t> adam_settings;
};

// Whether the rule reads the squared norms |g^|^2 and |d_{t-1}|^2 of the reduction: the
// multiplicative rule divides by them, the Adam step on log eta skips a slot whose |d_{t-1}| is 0.
template <typename acc_t>
HYPERLR_INLINE bool reads_norms(const HdRuleSettings<acc_t>& r) {
  return r.multiplicative || r.adam;
}

// ---- Deterministic exponential -----------------------------------------------------------------
// e^x in double from exact operations (floor, ldexp) and the correctly rounded add_rn / mul_rn
// only, so that the host and the device (whose exp differ in the last bits) give the same bits:
// x = k ln2 + r with |r| <= ln2/2 (ln2 split in two so that k ln2_hi is exact), e^r by its Taylor
// polynomial to degree 13 (truncation below 1e-17 relative), then the exact scaling by 2^k.
// Relative error a few ulps of double; x is clamped to [-700, 700].
HYPERLR_INLINE double exp_det(double x) {
  constexpr double kLog2e = 1.4426950408889634;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  x = x < -700.0 ? -700.0 : (x > 700.0 ? 700.0 : x);
#if defined(__CUDA_ARCH__)
  const double k = ::floor(add_rn(mul_rn(x, kLog2e), 0.5));
#else
  const double k = std::floor(add_rn(mul_rn(x, kLog2e), 0.5));
#endif
  const double r = add_rn(add_rn(x, -mul_rn(k, kLn2Hi)), -mul_rn(k, kLn2Lo));
  // 1/n! for n = 13 down to 1.
  constexpr double kInvFactorial[13] = {
      1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
      1.0 / 362880.0,     1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,
      1.0 / 120.0,        1.0 / 24.0,        1.0 / 6.0,         0.5,
      1.0};
  double p = kInvFactorial[0];
  for (int i = 1; i < 13; ++i) {
    p = add_rn(mul_rn(p, r), kInvFactorial[i]);
  }
  p = add_rn(mul_rn(p, r), 1.0);
#if defined(__CUDA_ARCH__)
  return ::ldexp(p, static_cast<int>(k));
#else
  return std::ldexp(p, static_cast<int>(k));
#endif
}

// One Adam step on log eta (hyper_optimizer="adam"): the hypergradient of log eta,
// q = eta_{t-1} dE/d eta = eta_{t-1} hypergrad, drives Adam's moments
// m = b1 m + (1 - b1) q, v = b2 v + (1 - b2) q^2, kept with the running products p1 = b1^n,
// p2 = b2^n in state[0..3] (n: the steps with a hypergradient; state starts at {0, 0, 1, 1});
// then log eta_t = log eta_{t-1} - alpha m^ / (sqrt(v^) + eps), m^ = m / (1 - p1),
// v^ = v / (1 - p2), i.e. eta_t = eta_{t-1} exp(-alpha m^ / (sqrt(v^) + eps)), clamped to
// [lr_min, lr_max] (NaN stays NaN). Returns eta_t.
template <typename acc_t>
HYPERLR_INLINE acc_t log_lr_adam_step(acc_t lr, acc_t hypergrad, acc_t alpha, acc_t* state,
                                      const LogLrAdamSettings<acc_t>& s) {
  const acc_t q = mul_rn(lr, hypergrad);
  const acc_t one = acc_t(1);
  state[0] = add_rn(mul_rn(s.beta1, state[0]), mul_rn(add_rn(one, -s.beta1), q));
  state[1] = add_rn(mul_rn(s.beta2, state[1]), mul_rn(add_rn(one, -s.beta2), mul_rn(q, q)));
  state[2] = mul_rn(state[2], s.beta1);
  state[3] = mul_rn(state[3], s.beta2);
  const acc_t m_hat = div_rn(state[0], add_rn(one, -state[2]));
  const acc_t v_hat = div_rn(state[1], add_rn(one, -state[3]));
  const acc_t step = mul_rn(alpha, div_rn(m_hat, add_rn(sqrt_rn(v_hat), s.eps)));
  const acc_t factor = static_cast<acc_t>(exp_det(-static_cast<double>(step)));
  const acc_t new_lr = mul_rn(lr, factor);
  return new_lr < s.lr_min ? s.lr_min : (new_lr > s.lr_max ? s.lr_max : new_lr);
}

// The smallest positive normal number (torch.finfo(dtype).tiny).
template <typename acc_t>
HYPERLR_INLINE acc_t tiny_normal();
template <>
HYPERLR_INLINE float tiny_normal<float>() {
  return 1.17549435e-38f;
}
template <>
HYPERLR_INLINE double tiny_normal<double>() {
  return 2.2250738585072014e-308;
}

// One slot's LR update from its reduced sums: h = s_{t-1} <g^, d_{t-1}>;
// additive eta + beta h, multiplicative eta (1 + beta h / (|g^| |s_{t-1} d_{t-1}|)); clamp at 0
// (NaN stays NaN, like clamp_min); or, with r.adam, log_lr_adam_step on the slot's Adam state
// (4 values) when the previous step moved the slot (else eta and the state stay); hypergrad = -h;
// the applied LR times s_t is the effective LR.
template <typename acc_t>
HYPERLR_INLINE void hd_rule(acc_t& lr, acc_t& hypergrad, acc_t& effective_lr,
                            const HdSums<acc_t>& sums, const HdRuleSettings<acc_t>& r,
                            acc_t* adam_state = nullptr) {
  const acc_t old_lr = lr;
  const acc_t h = mul_rn(sums.dot, r.prev_lr_scale);
  acc_t new_lr;
  if (r.adam) {
    // Only a slot that the previous step moved (|s_{t-1} d_{t-1}| > 0) has a hypergradient.
    const bool moved = sums.dir_sq > acc_t(0) && r.prev_lr_scale != acc_t(0);
    new_lr = adam_state != nullptr && moved
                 ? log_lr_adam_step(old_lr, -h, r.hyper_lr, adam_state, r.adam_settings)
                 : old_lr;
  } else if (r.multiplicative) {
    const acc_t abs_scale = r.prev_lr_scale < acc_t(0) ? -r.prev_lr_scale : r.prev_lr_scale;
    acc_t norms = mul_rn(mul_rn(sqrt_rn(sums.grad_sq), sqrt_rn(sums.dir_sq)), abs_scale);
    norms = norms < tiny_normal<acc_t>() ? tiny_normal<acc_t>() : norms;
    const acc_t cosine = div_rn(h, norms);
    new_lr = mul_rn(old_lr, add_rn(acc_t(1), mul_rn(r.hyper_lr, cosine)));
  } else {
    new_lr = add_rn(old_lr, mul_rn(r.hyper_lr, h));
  }
  lr = new_lr < acc_t(0) ? acc_t(0) : new_lr;
  hypergrad = -h;
  effective_lr = mul_rn(r.lr_lag ? old_lr : lr, r.lr_scale);
}

}  // namespace math
}  // namespace hyperlr
