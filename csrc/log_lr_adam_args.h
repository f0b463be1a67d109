// The Adam hyper-optimizer on log eta as the fused HD ops take it (hyper_optimizer="adam";
// csrc/hd_math.h, log_lr_adam_step): `state`, 4 values per LR slot (m, v, beta1^n, beta2^n), and
// `settings` = [beta1, beta2, eps, lr_min, lr_max]; both absent for the additive or
// multiplicative rule.
#pragma once

#include "hd_math.h"

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace hyperlr {

struct LogLrAdamArgs {
  std::optional<at::Tensor> state;
  std::vector<double> settings;
};

// Throws, naming the op, unless state and settings are both absent, or `state` is a contiguous
// tensor of lrs' dtype and device with 4 values per slot and `settings` has its 5 values.
void check_log_lr_adam(const char* op, const LogLrAdamArgs& adam, const at::Tensor& lrs);

// The HD rule's settings from an op's arguments, built on the host.
template <typename acc_t>
math::HdRuleSettings<acc_t> hd_rule_settings(double hyper_lr, double prev_lr_scale,
                                             double lr_scale, bool multiplicative, bool lr_lag,
                                             const LogLrAdamArgs& adam) {
  math::HdRuleSettings<acc_t> r{};
  r.hyper_lr = static_cast<acc_t>(hyper_lr);
  r.prev_lr_scale = static_cast<acc_t>(prev_lr_scale);
  r.lr_scale = static_cast<acc_t>(lr_scale);
  r.multiplicative = multiplicative;
  r.lr_lag = lr_lag;
  r.adam = adam.state.has_value();
  if (r.adam) {
    const std::vector<double>& s = adam.settings;
    r.adam_settings = {static_cast<acc_t>(s[0]), static_cast<acc_t>(s[1]),
                       static_cast<acc_t>(s[2]), static_cast<acc_t>(s[3]),
                       static_cast<acc_t>(s[4])};
  }
  return r;
}

// The first value of slot 0's Adam state, or null without the Adam hyper-optimizer.
template <typename acc_t>
acc_t* log_lr_adam_state(const LogLrAdamArgs& adam) {
  return adam.state.has_value() ? adam.state->mutable_data_ptr<acc_t>() : nullptr;
}

}  // namespace hyperlr
