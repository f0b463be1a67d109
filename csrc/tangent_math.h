// Layer 1 of the fused tangent step of MARTHE / RTHO (docs/design.md, Conventions): one element
// of the inner step (torch.optim.SGD's, or Adam's / AdamW's) together with the update of its
// tangents Z = d(state)/d eta, on registers. Shared by the CPU kernel (csrc/tangent_cpu.cpp) and
// the CUDA functor (csrc/cuda/tangent.cu). The equations and their derivation: docs/tangents.md;
// the reference, with the same operations in the same order: hyperlr_ext/functional/marthe.py.
#pragma once

#include "adam_hd_math.h"
#include "sgd_hd_math.h"

namespace hyperlr {
namespace math {

// One element's inputs. SGD: state0 = momentum buffer, z_state0 its tangent (state1 unused);
// Adam: state0 / state1 = m / v, z_state0 / z_state1 their tangents. hvp = (H Z_w) of the
// undamped tangent (0 when no product was computed).
template <typename acc_t>
struct TangentIn {
  acc_t param, grad, hvp, state0, state1, z_param, z_state0, z_state1;
};

template <typename acc_t>
struct TangentOut {
  acc_t param, state0, state1, z_param, z_state0, z_state1, direction;
};

// The per-step scalars: mu, s eta (the LR this step applies) and s (the scheduler scale).
template <typename acc_t>
struct TangentScalars {
  acc_t mu;
  acc_t step_lr;
  acc_t lr_scale;
};

// Z_w' = z_w - s eta Z_d - s d, and w' = w - s eta d (torch's param.add_(d, alpha=-lr)).
template <typename acc_t>
HYPERLR_INLINE void finish_tangent(TangentOut<acc_t>& out, acc_t param, acc_t z_w,
                                   acc_t z_direction, const TangentScalars<acc_t>& k) {
  out.z_param = add_rn(add_rn(z_w, -mul_rn(k.step_lr, z_direction)),
                       -mul_rn(k.lr_scale, out.direction));
  out.param = param_step(param, out.direction, k.step_lr);
}

// SGD (momentum m, dampening tau, Nesterov, L2 decay lambda):
//   H~z = mu hvp + lambda z_w,  b' = g~ (first step) or m b + (1 - tau) g~,
//   Z_b' = H~z (first step) or m mu Z_b + (1 - tau) H~z,  d / Z_d from b' / Z_b'.
template <typename acc_t>
HYPERLR_INLINE TangentOut<acc_t> sgd_tangent_element(const TangentIn<acc_t>& in,
                                                     const TangentScalars<acc_t>& k,
                                                     const SgdSettings<acc_t>& s,
                                                     bool first_step) {
  TangentOut<acc_t> out{};
  const acc_t z_w = mul_rn(in.z_param, k.mu);
  const acc_t h_z = add_rn(mul_rn(in.hvp, k.mu), mul_rn(s.weight_decay, z_w));
  const acc_t decayed = add_rn(in.grad, mul_rn(s.weight_decay, in.param));
  acc_t z_direction = h_z;
  out.direction = decayed;
  if (s.has_momentum) {
    const acc_t buffer = add_rn(mul_rn(in.state0, s.momentum), mul_rn(s.one_minus_dampening, decayed));
    const acc_t z_buffer = add_rn(mul_rn(mul_rn(in.z_state0, k.mu), s.momentum),
                                  mul_rn(s.one_minus_dampening, h_z));
    out.state0 = first_step ? decayed : buffer;
    out.z_state0 = first_step ? h_z : z_buffer;
    out.direction = s.nesterov ? add_rn(decayed, mul_rn(s.momentum, out.state0)) : out.state0;
    z_direction = s.nesterov ? add_rn(h_z, mul_rn(s.momentum, out.z_state0)) : out.z_state0;
  }
  finish_tangent(out, in.param, z_w, z_direction, k);
  return out;
}

// Adam / AdamW: with r = sqrt(v') / sqrt(c2) and ratio = m' / (c1 (r + eps)),
//   Z_m' = beta1 mu Z_m + (1 - beta1) H~z,  Z_v' = beta2 mu Z_v + 2 (1 - beta2) g~ H~z,
//   Z_r = Z_v' / (2 sqrt(v') sqrt(c2)),  Z_ratio = (Z_m' / c1 - ratio Z_r) / (r + eps),
//   d = ratio + lambda_w w,  Z_d = Z_ratio + lambda_w z_w  (lambda_w: AdamW's decay, else 0).
// sqrt(v') is floored at the smallest normal number in Z_r's denominator: where v' = 0 every
// gradient so far was 0, so Z_v' = 0 and Z_r = 0 (no select around the division).
template <typename acc_t>
HYPERLR_INLINE TangentOut<acc_t> adam_tangent_element(const TangentIn<acc_t>& in,
                                                      const TangentScalars<acc_t>& k,
                                                      const AdamSettings<acc_t>& s,
                                                      acc_t two_one_minus_beta2,
                                                      const BiasCorrection<acc_t>& bc) {
  TangentOut<acc_t> out{};
  const acc_t z_w = mul_rn(in.z_param, k.mu);
  const acc_t h_z = add_rn(mul_rn(in.hvp, k.mu), mul_rn(s.l2_decay, z_w));
  const acc_t grad = adam_grad(in.grad, in.param, s);
  const AdamMoments<acc_t> moments = adam_moments(grad, in.state0, in.state1, in.state1, s);
  out.state0 = moments.exp_avg;
  out.state1 = moments.exp_avg_sq;
  out.z_state0 = add_rn(mul_rn(mul_rn(in.z_state0, k.mu), s.beta1), mul_rn(s.one_minus_beta1, h_z));
  out.z_state1 = add_rn(mul_rn(mul_rn(in.z_state1, k.mu), s.beta2),
                        mul_rn(mul_rn(two_one_minus_beta2, grad), h_z));
  const acc_t root = sqrt_rn(out.state1);
  const acc_t denom = add_rn(div_rn(root, bc.second_sqrt), s.eps);
  const acc_t ratio = div_rn(div_rn(out.state0, denom), bc.first);
  const acc_t floored = root < tiny_normal<acc_t>() ? tiny_normal<acc_t>() : root;
  const acc_t z_root = div_rn(out.z_state1, mul_rn(mul_rn(acc_t(2), floored), bc.second_sqrt));
  const acc_t z_ratio =
      div_rn(add_rn(div_rn(out.z_state0, bc.first), -mul_rn(ratio, z_root)), denom);
  out.direction = add_rn(ratio, mul_rn(s.adamw_decay, in.param));
  const acc_t z_direction = add_rn(z_ratio, mul_rn(s.adamw_decay, z_w));
  finish_tangent(out, in.param, z_w, z_direction, k);
  return out;
}

}  // namespace math
}  // namespace hyperlr
