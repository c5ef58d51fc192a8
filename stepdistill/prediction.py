"""Conversions between what a network predicts and the clean-data estimate x0, for x_t = a x0 + s eps.

Every formula holds for any (a, s): VP (a^2 + s^2 = 1), EDM (a = 1) and rectified flow (a + s = 1).
  epsilon        eps = (x - a x0) / s                 x0 = (x - s eps) / a
  v_prediction   v = a eps - s x0                     x0 = (a x - s v) / (a^2 + s^2)
  sample         the network predicts x0 directly
  flow_velocity  u = dx/dt = a' x0 + s' eps; for a = 1 - t, s = t: u = eps - x0, x0 = (x - s u) / (a + s)
  edm            Karras preconditioning, x0 = c_skip x + c_out F(c_in x); written for general (a, s)
                 by applying EDM to y = x / a with sigma_eff = s / a (stable as a -> 0).
Score: grad log p_t(x) = -(x - a x0) / s^2 = -eps / s.
Only epsilon's x0 (and x0_from_score) divides by a: at a zero-terminal-SNR schedule's last timestep (a = 0) the
others stay finite (v: x0 = -v there), and NetworkDenoiser refuses epsilon on such a schedule.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_velocity", "edm")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type


def edm_coefficients(a: torch.Tensor, s: torch.Tensor, sigma_data: float):
    """(c_in, c_skip, c_out) acting on x (not on x / a), EDM Table 1 rewritten for x_t = a x0 + s eps."""
    d2 = sigma_data**2
    denom = s**2 + a**2 * d2
    c_in = 1.0 / denom.sqrt()
    c_skip = a * d2 / denom
    c_out = s * sigma_data / denom.sqrt()
    return c_in, c_skip, c_out


def x0_from_output(out, x, a, s, prediction_type: str, sigma_data: float = 0.5):
    """The network's native output -> x0 estimate. a, s broadcast against x."""
    if prediction_type == "epsilon":
        return (x - s * out) / a
    if prediction_type == "v_prediction":
        return (a * x - s * out) / (a**2 + s**2)
    if prediction_type == "sample":
        return out
    if prediction_type == "flow_velocity":
        return (x - s * out) / (a + s)
    if prediction_type == "edm":
        _, c_skip, c_out = edm_coefficients(a, s, sigma_data)
        return c_skip * x + c_out * out
    raise ValueError(check_prediction_type(prediction_type))


def target_for(x0, noise, x, a, s, prediction_type: str, sigma_data: float = 0.5):
    """The regression target in the network's native space (the teacher's own denoising loss)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a * noise - s * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow_velocity":
        return (x - x0 * (a + s)) / s  # = eps - x0 when a + s = 1
    if prediction_type == "edm":
        _, c_skip, c_out = edm_coefficients(a, s, sigma_data)
        return (x0 - c_skip * x) / c_out
    raise ValueError(check_prediction_type(prediction_type))


def eps_mse_weight_of_v(a, s):
    """The factor that turns a v-prediction's squared error into that of the eps it implies at fixed x_t:
    eps = (s x + a v) / (a^2 + s^2), so a^2 / (a^2 + s^2)^2; snr / (snr + 1) on VP (SiD-LSG's weight)."""
    return a**2 / (a**2 + s**2) ** 2


def eps_from_x0(x0, x, a, s):
    return (x - a * x0) / s


def score_from_x0(x0, x, a, s):
    return -(x - a * x0) / s**2


def x0_from_score(score, x, a, s):
    return (x + s**2 * score) / a


def velocity_from_x0(x0, x, a, s):
    """Rectified-flow velocity eps - x0 (for a + s = 1)."""
    return eps_from_x0(x0, x, a, s) - x0
