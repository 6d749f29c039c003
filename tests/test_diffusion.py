"""Tests that pin diffusion.py to the math of Improved DDPM (Nichol & Dhariwal 2021).

Every expected value is computed here, independently, in float64 numpy/math from the paper's equations
(the `Ref` class below), never taken from diffusion.py's own output. The "models" are closed-form toys:
an oracle that predicts the true noise of a known x0, constants, and a 1x1-conv model for gradient checks.
"""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, normal_kl  # noqa: E402

torch.set_num_threads(2)
LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# independent float64 reference of the paper's quantities


def cosine_f(t, T, s=0.008):
    """f(t) of eq. 17."""
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def ref_betas(schedule, T):
    if schedule == "linear":
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    return np.array([min(1 - cosine_f(i + 1, T) / cosine_f(i, T), 0.999) for i in range(T)])


class Ref:
    """Closed-form forward process and posterior q(x_{t-1} | x_t, x0) in float64 (DDPM eqs. 6-7)."""

    def __init__(self, schedule, T):
        self.T = T
        self.betas = ref_betas(schedule, T)
        self.abar = np.cumprod(1.0 - self.betas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.post_var = self.betas * (1 - self.abar_prev) / (1 - self.abar)  # beta tilde
        self.post_logvar_clipped = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef_x0 = self.betas * np.sqrt(self.abar_prev) / (1 - self.abar)
        self.coef_xt = (1 - self.abar_prev) * np.sqrt(1 - self.betas) / (1 - self.abar)

    def q_sample(self, x0, t, eps):
        a = col(self.abar[t])
        return np.sqrt(a) * x0 + np.sqrt(1 - a) * eps

    def post_mean(self, x0, xt, t):
        return col(self.coef_x0[t]) * x0 + col(self.coef_xt[t]) * xt

    def learned_logvar(self, t, u):
        """eq. 15: log Sigma = v log beta_t + (1 - v) log beta~_t, v = (u + 1) / 2."""
        v = (np.asarray(u, dtype=np.float64) + 1) / 2
        return v * col(np.log(self.betas[t])) + (1 - v) * col(self.post_logvar_clipped[t])

    def pred_x0(self, xt, t, eps):
        a = col(self.abar[t])
        return (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)


def col(a):
    """(B,) -> (B, 1, 1, 1) so per-example coefficients broadcast over images."""
    return np.asarray(a, dtype=np.float64).reshape(-1, 1, 1, 1)


def npy(x):
    return x.detach().double().cpu().numpy()


def full(x, shape):
    return np.broadcast_to(npy(x), shape)


def ref_normal_kl(m1, lv1, m2, lv2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) in nats."""
    return 0.5 * (-1.0 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))


def std_normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def ref_discretized_loglik(x, mean, log_scale):
    """log of the Gaussian mass of x's 2/255-wide bin; the bins at -1 and +1 reach out to -inf / +inf."""
    sd = math.exp(log_scale)
    upper = 1.0 if x > 0.999 else std_normal_cdf((x + 1 / 255 - mean) / sd)
    lower = 0.0 if x < -0.999 else std_normal_cdf((x - 1 / 255 - mean) / sd)
    return math.log(upper - lower)


def grid_image(shape, seed, lo=0, hi=255):
    """Pixels on the 8-bit grid x = -1 + 2k/255, k in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(lo, hi + 1, shape, generator=g)
    return -1 + 2 * k.double() / 255


# ----------------------------------------------------------------------------------------------------
# toy models


def oracle_model(ref, x0, u=0.0, scale=1.0, learn_sigma=True):
    """eps_hat = scale * (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): the true noise of a known x0 when
    scale = 1; abar from the ORIGINAL schedule at the original t the model is given; u fills the variance
    channels."""
    abar = torch.from_numpy(ref.abar)
    x0 = x0.double()

    def model(x_t, t, **kwargs):
        a = abar[t.cpu()].view(-1, 1, 1, 1)
        eps = (scale * (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()
        if not learn_sigma:
            return eps
        return torch.cat([eps, torch.full_like(eps, u)], dim=1)

    return model


def constant_model(eps, u=None):
    """Returns a fixed eps (and fixed u channels when given), whatever x_t and t are."""

    def model(x_t, t, **kwargs):
        assert x_t.shape[0] == eps.shape[0]
        return eps.float() if u is None else torch.cat([eps, u], dim=1).float()

    return model


def smooth_model(x_t, t, **kwargs):
    """A deterministic, non-trivial learn_sigma model: eps = 0.5 tanh(x_t), u = 0.2 x_t."""
    return torch.cat([0.5 * torch.tanh(x_t), 0.2 * x_t], dim=1)


class ConvToy(nn.Module):
    """eps and u channels from separate 1x1 convs of x_t, so their gradients can be told apart."""

    def __init__(self, channels):
        super().__init__()
        self.eps_conv = nn.Conv2d(channels, channels, 1)
        self.var_conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x_t, t, **kwargs):
        return torch.cat([self.eps_conv(x_t), self.var_conv(x_t)], dim=1)


def step_ts(diffusion, model, shape, **kwargs):
    """Runs sample_progressive and returns the original-schedule t of every step plus the yielded dicts."""
    outs = list(diffusion.sample_progressive(model, shape, **kwargs))
    ts = [int(torch.as_tensor(o["t"]).flatten()[0]) for o in outs]
    return ts, outs


# ----------------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("T", [1000, 4000])
def test_cosine_schedule_matches_closed_form(T):
    """eq. 17: alphas_cumprod[i] = f(i+1)/f(0), beta in (0, 0.999] and clipped to 0.999 at the end."""
    d = GaussianDiffusion(num_timesteps=T, noise_schedule="cosine")
    assert d.num_timesteps == T
    assert d.betas.dtype == torch.float64 and d.alphas_cumprod.dtype == torch.float64
    assert d.betas.shape == (T,) and d.alphas_cumprod.shape == (T,)
    abar = d.alphas_cumprod.cpu().numpy()
    for i in [0, 1, 10, T // 4, T // 2, 3 * T // 4, T - 10, T - 2]:
        expected = cosine_f(i + 1, T) / cosine_f(0, T)
        np.testing.assert_allclose(abar[i], expected, rtol=1e-10)
    betas = d.betas.cpu().numpy()
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert betas[-1] == pytest.approx(0.999)
    np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-12)


@pytest.mark.parametrize("T", [1000, 4000])
def test_linear_schedule_end_points(T):
    """Linear schedule: beta from 1e-4 to 0.02 scaled by 1000/T, evenly spaced (DDPM / Improved DDPM)."""
    d = GaussianDiffusion(num_timesteps=T, noise_schedule="linear")
    assert d.betas.dtype == torch.float64 and d.betas.shape == (T,)
    assert d.alphas_cumprod.dtype == torch.float64 and d.alphas_cumprod.shape == (T,)
    betas = d.betas.cpu().numpy()
    scale = 1000 / T
    assert betas[0] == pytest.approx(1e-4 * scale, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * scale, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) * scale / (T - 1), rtol=1e-8)
    np.testing.assert_allclose(d.alphas_cumprod.cpu().numpy(), np.cumprod(1 - betas), rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# forward process and posterior


def test_q_sample_closed_form():
    """q(x_t | x0): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t chosen per batch element."""
    ref = Ref("cosine", 1000)
    d = GaussianDiffusion(1000, "cosine")
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    eps = torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    got = d.q_sample(x0, t, noise=eps)
    assert got.shape == x0.shape
    np.testing.assert_allclose(npy(got), ref.q_sample(npy(x0), t.numpy(), npy(eps)), atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_q_posterior_closed_form(schedule):
    """q(x_{t-1} | x_t, x0): mean and beta~_t of DDPM eq. 7; log-variance at t=0 clipped to the t=1 value."""
    T = 100
    ref = Ref(schedule, T)
    d = GaussianDiffusion(T, schedule)
    torch.manual_seed(1)
    x0 = torch.rand(5, 3, 4, 4) * 2 - 1
    xt = torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 1, 7, 50, 99])
    mean, var, logvar = d.q_posterior(x0, xt, t)
    shape = x0.shape
    np.testing.assert_allclose(npy(mean), ref.post_mean(npy(x0), npy(xt), t.numpy()), atol=1e-5)
    np.testing.assert_allclose(full(var, shape), np.broadcast_to(col(ref.post_var[t.numpy()]), shape),
                               rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(full(logvar, shape),
                               np.broadcast_to(col(ref.post_logvar_clipped[t.numpy()]), shape), rtol=1e-5)
    assert full(var, shape)[0].max() == pytest.approx(0.0, abs=1e-12)  # beta~_0 = 0 since abar_{-1} = 1
    np.testing.assert_allclose(full(logvar, shape)[0], full(logvar, shape)[1], rtol=1e-6)  # clipped at t=0


@pytest.mark.parametrize("t", [1, 100, 500])
def test_posterior_consistent_with_forward_process(t):
    """Monte-Carlo: x_t ~ q(x_t|x0) then x_{t-1} ~ q(x_{t-1}|x_t,x0) gives q(x_{t-1}|x0) = N(sqrt(abar_{t-1}) x0, 1-abar_{t-1})."""
    ref = Ref("cosine", 1000)
    d = GaussianDiffusion(1000, "cosine")
    torch.manual_seed(2)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    tt = torch.full((n,), t, dtype=torch.long)
    xt = d.q_sample(x0, tt)
    mean, var, _ = d.q_posterior(x0, xt, tt)
    x_prev = mean + var.sqrt() * torch.randn_like(xt)
    samples = npy(x_prev).ravel()
    expected_mean = math.sqrt(ref.abar[t - 1]) * 0.7
    expected_var = 1 - ref.abar[t - 1]
    assert samples.mean() == pytest.approx(expected_mean, abs=0.01)
    assert samples.var() == pytest.approx(expected_var, rel=0.03, abs=1e-6)


# ----------------------------------------------------------------------------------------------------
# KL and decoder likelihood helpers


def test_normal_kl_identical_is_zero():
    """KL(N || N) = 0 for identical Gaussians."""
    torch.manual_seed(3)
    m, lv = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    kl = normal_kl(m, lv, m, lv)
    assert kl.shape == m.shape
    assert kl.abs().max().item() < 1e-6


def test_normal_kl_hand_computed():
    """KL(N1||N2) = 0.5 (-1 + lv2 - lv1 + e^(lv1-lv2) + (m1-m2)^2 e^-lv2) nats, elementwise."""
    torch.manual_seed(4)
    m1, m2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lv1, lv2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    kl = normal_kl(m1, lv1, m2, lv2)
    np.testing.assert_allclose(npy(kl), ref_normal_kl(npy(m1), npy(lv1), npy(m2), npy(lv2)), rtol=1e-6)
    # one fully by hand: KL(N(1, 1) || N(0, e^2)) = 0.5 (-1 + 2 - 0 + e^-2 + e^-2)
    one = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(2.0))
    assert float(one) == pytest.approx(0.5 * (1 + 2 * math.exp(-2)), rel=1e-6)


def test_discretized_loglik_hand_computed():
    """Decoder: log of the N(mean, sd^2) mass of x's bin [x - 1/255, x + 1/255], edge bins open-ended."""
    xs = [-1.0, -1 + 2 / 255, -0.5 + 1 / 255, 1 / 255, 0.6 - 0.2 / 255, 1 - 2 / 255, 1.0]
    xs = [-1 + 2 * round((x + 1) * 255 / 2) / 255 for x in xs]  # snap onto the 8-bit grid
    means = [-0.95, -1.0, -0.45, 0.02, 0.55, 0.97, 0.93]
    log_scales = [math.log(s) for s in [0.05, 0.01, 0.1, 0.03, 0.2, 0.02, 0.04]]
    got = discretized_gaussian_log_likelihood(torch.tensor(xs), torch.tensor(means), torch.tensor(log_scales))
    expected = [ref_discretized_loglik(x, m, ls) for x, m, ls in zip(xs, means, log_scales)]
    np.testing.assert_allclose(npy(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mean,sd", [(0.3, 0.2), (-0.99, 0.01), (1.5, 0.05), (0.0, 3.0)])
def test_discretized_likelihood_sums_to_one(mean, sd):
    """The decoder is a distribution over the 256 pixel values: the bin masses sum to 1."""
    xs = -1 + 2 * torch.arange(256, dtype=torch.float32) / 255
    ll = discretized_gaussian_log_likelihood(xs, torch.full_like(xs, mean), torch.full_like(xs, math.log(sd)))
    assert ll.shape == (256,)
    assert ll.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------------------
# p(x_{t-1} | x_t): variance and mean


@pytest.mark.parametrize("u", [-1.0, 0.0, 1.0, 0.3, 1.5])
def test_learned_variance_interpolation(u):
    """eq. 15: log Sigma = v log beta_t + (1-v) log beta~_t, v = (u+1)/2 unclamped; u=-1 -> beta~ (clipped at t=0)."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine", learn_sigma=True)
    x = torch.randn(5, 3, 2, 2)
    t = torch.tensor([0, 1, 10, 500, 999])
    out = d.p_mean_variance(constant_model(torch.zeros_like(x), torch.full_like(x, u)), x, t)
    expected = np.broadcast_to(ref.learned_logvar(t.numpy(), u), x.shape)
    np.testing.assert_allclose(full(out["log_variance"], x.shape), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(full(out["variance"], x.shape), np.exp(expected), rtol=1e-5)
    if u == -1.0:  # t=0 uses the clipped log beta~_1 since beta~_0 = 0
        np.testing.assert_allclose(full(out["log_variance"], x.shape)[0], np.log(ref.post_var[1]), rtol=1e-5)
    if u == 1.0:
        np.testing.assert_allclose(full(out["log_variance"], x.shape)[:, 0, 0, 0], np.log(ref.betas[t.numpy()]),
                                   rtol=1e-5)


def test_fixed_variance_is_beta():
    """learn_sigma=False: Sigma_t = beta_t for t > 0 and beta~_1 at t = 0."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine", learn_sigma=False, loss_type="mse")
    x = torch.randn(4, 3, 2, 2)
    t = torch.tensor([0, 1, 300, 999])
    out = d.p_mean_variance(constant_model(torch.zeros_like(x)), x, t)
    expected = np.array([ref.post_var[1], ref.betas[1], ref.betas[300], ref.betas[999]])
    np.testing.assert_allclose(full(out["variance"], x.shape)[:, 0, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(full(out["log_variance"], x.shape)[:, 0, 0, 0], np.log(expected), rtol=1e-5)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_p_mean_variance_with_true_noise(learn_sigma):
    """eps-parameterisation: a model predicting the true eps gives pred_x0 = x0 and mean = mu~(x0, x_t)."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine", learn_sigma=learn_sigma, loss_type="hybrid" if learn_sigma else "mse")
    torch.manual_seed(5)
    x0 = torch.rand(5, 3, 4, 4) * 1.8 - 0.9
    t = torch.tensor([0, 1, 10, 500, 900])
    xt = d.q_sample(x0, t, noise=torch.randn_like(x0))
    out = d.p_mean_variance(oracle_model(ref, x0, learn_sigma=learn_sigma), xt, t)
    np.testing.assert_allclose(npy(out["pred_x0"]), npy(x0), atol=1e-4)
    np.testing.assert_allclose(npy(out["mean"]), ref.post_mean(npy(x0), npy(xt), t.numpy()), atol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_pred_x0_precision_at_small_t(schedule):
    """Schedule-derived arrays are float64 and cast on use: at t=0, 1 - abar_0 is 1e-4 (linear) or 4e-5 (cosine),
    so forming sqrt(1 - abar) from a float32 abar would err by ~1e-4 relative; x^_0 must stay exact to float32."""
    T = 1000
    ref = Ref(schedule, T)
    d = GaussianDiffusion(T, schedule)
    x0 = torch.zeros(6, 1, 1, 1)
    xt = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]).view(6, 1, 1, 1)
    for t in [0, 1, 2]:
        out = d.p_mean_variance(oracle_model(ref, x0), xt, torch.full((6,), t), clip_denoised=False)
        np.testing.assert_allclose(npy(out["pred_x0"]), 0.0, atol=2e-6, err_msg=f"t={t}")


def test_p_mean_variance_clips_pred_x0():
    """With clip_denoised, x^_0 is clipped to [-1, 1] before it forms the mean mu~(x^_0, x_t); without, it is not."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine")
    torch.manual_seed(6)
    x0 = torch.full((3, 1, 2, 2), 3.0)
    x0[1] = -2.5
    t = torch.tensor([5, 50, 400])
    xt = d.q_sample(x0, t, noise=torch.randn_like(x0))
    model = oracle_model(ref, x0)
    clipped = d.p_mean_variance(model, xt, t, clip_denoised=True)
    raw = d.p_mean_variance(model, xt, t, clip_denoised=False)
    np.testing.assert_allclose(npy(raw["pred_x0"]), npy(x0), atol=1e-4)
    np.testing.assert_allclose(npy(clipped["pred_x0"]), np.clip(npy(x0), -1, 1), atol=1e-6)
    np.testing.assert_allclose(npy(clipped["mean"]), ref.post_mean(np.clip(npy(x0), -1, 1), npy(xt), t.numpy()),
                               atol=1e-5)
    np.testing.assert_allclose(npy(raw["mean"]), ref.post_mean(npy(x0), npy(xt), t.numpy()), atol=1e-4)


def test_model_kwargs_reach_the_model():
    """model(x_t, t, **model_kwargs) receives the kwargs in p_mean_variance, training_losses and sampling."""
    d = GaussianDiffusion(10, "linear")
    seen = []
    y = torch.tensor([3, 4])

    def model(x_t, t, **kwargs):
        seen.append(kwargs["y"])
        return torch.zeros(x_t.shape[0], 2, *x_t.shape[2:])

    x = torch.zeros(2, 1, 2, 2)
    d.p_mean_variance(model, x, torch.tensor([0, 5]), model_kwargs={"y": y})
    d.training_losses(model, x, torch.tensor([0, 5]), model_kwargs={"y": y})
    d.sample(model, (2, 1, 2, 2), model_kwargs={"y": y})
    assert len(seen) >= 3 and all(torch.equal(s, y) for s in seen)


# ----------------------------------------------------------------------------------------------------
# training losses


def grads(value, module):
    """Total |gradient| of value with respect to module's parameters (0 where the graph does not reach them)."""
    gs = torch.autograd.grad(value, list(module.parameters()), retain_graph=True, allow_unused=True)
    return sum(0.0 if g is None else g.abs().sum().item() for g in gs)


def test_hybrid_vb_trains_only_the_variance():
    """eq. 16: L_hybrid = L_simple + lambda L_vlb with a stop-gradient on the mean, so vb only trains Sigma."""
    torch.manual_seed(7)
    d = GaussianDiffusion(50, "cosine", loss_type="hybrid")
    model = ConvToy(3)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    out = d.training_losses(model, x0, torch.tensor([0, 5, 30]))
    assert grads(out["vb"].sum(), model.eps_conv) == 0.0
    assert grads(out["vb"].sum(), model.var_conv) > 0.0
    assert grads(out["mse"].sum(), model.var_conv) == 0.0
    assert grads(out["mse"].sum(), model.eps_conv) > 0.0
    assert grads(out["loss"].sum(), model.eps_conv) > 0.0
    assert grads(out["loss"].sum(), model.var_conv) > 0.0


def test_kl_loss_trains_the_mean_too():
    """loss_type="kl" is the full L_vlb and the only training signal, so it must reach the eps channels."""
    torch.manual_seed(8)
    d = GaussianDiffusion(50, "cosine", loss_type="kl")
    model = ConvToy(3)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    out = d.training_losses(model, x0, torch.tensor([0, 5, 30]))
    assert grads(out["loss"].sum(), model.eps_conv) > 0.0


def test_mse_with_learned_sigma_trains_the_variance_and_only_it_through_vb():
    """loss_type="mse" with learn_sigma: as in the reference code the loss is L_simple + L_t, so the v channels get
    a gradient (from L_t) and the eps channels none from L_t (stop-gradient on the mean)."""
    torch.manual_seed(7)
    d = GaussianDiffusion(50, "cosine", learn_sigma=True, loss_type="mse")
    model = ConvToy(3)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    out = d.training_losses(model, x0, torch.tensor([0, 5, 30]))
    assert grads(out["loss"].sum(), model.var_conv) > 0.0
    assert grads(out["vb"].sum(), model.var_conv) > 0.0
    assert grads(out["vb"].sum(), model.eps_conv) == 0.0
    assert grads(out["loss"].sum(), model.eps_conv) == pytest.approx(grads(out["mse"].sum(), model.eps_conv))


def test_loss_composition():
    """hybrid: loss = mse + vb T/1000 (lambda = 0.001 on vb T); kl: loss = vb T; mse with learned sigma:
    mse + vb, unscaled (the reference code's MSE); mse with fixed sigma has no vb; mse by hand."""
    T = 50
    torch.manual_seed(9)
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    eps_hat = torch.randn_like(x0)
    u = torch.rand_like(x0) * 2 - 1
    t = torch.tensor([0, 3, 25, 49])
    mse_by_hand = ((npy(noise) - npy(eps_hat)) ** 2).mean(axis=(1, 2, 3))

    outs = {}
    for loss_type in ["hybrid", "kl", "mse"]:
        d = GaussianDiffusion(T, "cosine", learn_sigma=True, loss_type=loss_type)
        outs[loss_type] = out = d.training_losses(constant_model(eps_hat, u), x0, t, noise=noise)
        for key in ["loss", "mse", "vb"]:
            assert out[key].shape == (4,)
        np.testing.assert_allclose(npy(out["mse"]), mse_by_hand, rtol=1e-5)
        assert (npy(out["vb"]) > 0).all()
    np.testing.assert_allclose(npy(outs["hybrid"]["loss"]),
                               mse_by_hand + npy(outs["hybrid"]["vb"]) * T / 1000, rtol=1e-5)
    np.testing.assert_allclose(npy(outs["kl"]["loss"]), npy(outs["kl"]["vb"]) * T, rtol=1e-5)
    np.testing.assert_allclose(npy(outs["kl"]["vb"]), npy(outs["hybrid"]["vb"]), rtol=1e-5)  # same L_t
    np.testing.assert_allclose(npy(outs["mse"]["vb"]), npy(outs["hybrid"]["vb"]), rtol=1e-5)
    np.testing.assert_allclose(npy(outs["mse"]["loss"]), mse_by_hand + npy(outs["hybrid"]["vb"]), rtol=1e-5)

    d = GaussianDiffusion(T, "cosine", learn_sigma=False, loss_type="mse")
    out = d.training_losses(constant_model(eps_hat), x0, t, noise=noise)
    assert "vb" not in out
    assert out["loss"].shape == (4,)
    np.testing.assert_allclose(npy(out["mse"]), mse_by_hand, rtol=1e-5)
    np.testing.assert_allclose(npy(out["loss"]), mse_by_hand, rtol=1e-5)


def test_vb_terms_hand_computed():
    """L_t (t>0) = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) and L_0 = -log p(x0|x1) (discretized), in bits/dim."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine", learn_sigma=True, loss_type="hybrid")
    torch.manual_seed(10)
    x0 = grid_image((5, 2, 2, 2), seed=10, lo=64, hi=191)  # in [-0.5, 0.5]
    noise = torch.randn(5, 2, 2, 2, dtype=torch.float64).clamp(-2.5, 2.5)
    t = np.array([0, 1, 10, 100, 300])
    u = 0.4 * torch.tanh(torch.randn(5, 2, 2, 2, dtype=torch.float64))  # per-pixel variance output
    scale = 0.8  # a model whose eps is off by 20 %, so the means differ

    xt = ref.q_sample(npy(x0), t, npy(noise))
    eps_hat = scale * npy(noise)
    x0_hat = ref.pred_x0(xt, t, eps_hat)
    assert np.abs(x0_hat).max() < 1  # clipping x^_0 (or not) cannot matter here
    model_mean = ref.post_mean(x0_hat, xt, t)
    model_logvar = ref.learned_logvar(t, npy(u))
    true_mean = ref.post_mean(npy(x0), xt, t)
    true_logvar = np.broadcast_to(col(ref.post_logvar_clipped[t]), xt.shape)
    kl = ref_normal_kl(true_mean, true_logvar, model_mean, model_logvar).mean(axis=(1, 2, 3)) / LOG2
    nll = np.array([-ref_discretized_loglik(x, m, 0.5 * lv)
                    for x, m, lv in zip(npy(x0)[0].ravel(), model_mean[0].ravel(), model_logvar[0].ravel())])
    expected = kl.copy()
    expected[0] = nll.mean() / LOG2

    toy = oracle_model(ref, x0, scale=scale, learn_sigma=False)

    def model(x_t, tt, **kwargs):
        return torch.cat([toy(x_t, tt), u.float()], dim=1)

    out = d.training_losses(model, x0.float(), torch.from_numpy(t), noise=noise.float())
    np.testing.assert_allclose(npy(out["vb"]), expected, rtol=2e-3, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# importance sampling of t


def feed(d, T, losses_fn, rounds):
    for _ in range(rounds):
        t = torch.arange(T)
        d.update_loss_history(t, losses_fn(t))


def expected_p(T, L):
    """Section 3.3 / eq. 18: p_t proportional to sqrt(E[L_t^2]), mixed with 0.1 % uniform."""
    p = np.sqrt(np.asarray(L, dtype=np.float64) ** 2)
    return 0.999 * p / p.sum() + 0.001 / T


def test_uniform_timesteps_without_importance_sampling():
    """importance_sampling=False: t ~ U{0..T-1} with weights exactly 1."""
    torch.manual_seed(11)
    T = 20
    d = GaussianDiffusion(T, "cosine", importance_sampling=False)
    t, w = d.sample_timesteps(100_000, "cpu")
    assert t.dtype == torch.int64 and t.shape == (100_000,) and w.shape == (100_000,)
    assert torch.all(w == 1)
    freq = np.bincount(t.numpy(), minlength=T) / 100_000
    assert freq.shape == (T,)
    np.testing.assert_allclose(freq, 1 / T, atol=0.005)


def test_importance_sampling_uniform_until_warm():
    """Section 3.3: t is sampled uniformly until every t has 10 losses in its history."""
    torch.manual_seed(12)
    T = 20
    d = GaussianDiffusion(T, "cosine", importance_sampling=True)
    t, w = d.sample_timesteps(10_000, "cpu")
    assert torch.all(w == 1) and t.min() == 0 and t.max() == T - 1
    assert len(set(t.tolist())) == T
    for _ in range(10):  # t = 0..18 full, t = 19 has 9
        d.update_loss_history(torch.arange(T - 1), 1.0 + torch.arange(T - 1, dtype=torch.float32))
    for _ in range(9):
        d.update_loss_history(torch.tensor([T - 1]), torch.tensor([5.0]))
    t, w = d.sample_timesteps(10_000, "cpu")
    assert torch.all(w == 1) and len(set(t.tolist())) == T
    np.testing.assert_allclose(np.bincount(t.numpy(), minlength=T) / 10_000, 1 / T, atol=0.02)
    d.update_loss_history(torch.tensor([T - 1]), torch.tensor([5.0]))  # the 10th: now warm
    _, w = d.sample_timesteps(1_000, "cpu")
    assert not torch.all(w == 1)


def test_importance_sampling_distribution_and_weights():
    """eq. 18: p_t ~ sqrt(E[L_t^2]) over the last 10 losses, weights 1/(T p_t) make E[w L] the uniform mean."""
    torch.manual_seed(13)
    np.random.seed(13)
    T = 20
    L = 1.0 + np.arange(T)
    d = GaussianDiffusion(T, "cosine", importance_sampling=True)
    feed(d, T, lambda t: torch.full((T,), 100.0), rounds=10)  # older losses, to be pushed out
    feed(d, T, lambda t: 1.0 + t.float(), rounds=10)  # only these last 10 per t count
    p = expected_p(T, L)
    n = 100_000
    t, w = d.sample_timesteps(n, "cpu")
    assert t.shape == (n,) and w.shape == (n,)
    freq = np.bincount(t.numpy(), minlength=T) / n
    np.testing.assert_allclose(freq, p, atol=0.005)
    np.testing.assert_allclose(npy(w), 1 / (T * p[t.numpy()]), rtol=1e-4)
    assert float((npy(w) * L[t.numpy()]).mean()) == pytest.approx(L.mean(), rel=0.01)


def test_importance_sampling_second_moment():
    """eq. 18 uses sqrt(E[L^2]), not E[L]: a t whose losses alternate 0 and 2 weighs sqrt(2), not 1."""
    torch.manual_seed(14)
    T = 4
    d = GaussianDiffusion(T, "cosine", importance_sampling=True)
    for r in range(10):
        d.update_loss_history(torch.arange(T), torch.tensor([1.0, 1.0, 1.0, 2.0 * (r % 2)]))
    p = 0.999 * np.array([1, 1, 1, math.sqrt(2)]) / (3 + math.sqrt(2)) + 0.001 / T
    t, w = d.sample_timesteps(1000, "cpu")
    np.testing.assert_allclose(npy(w), 1 / (T * p[t.numpy()]), rtol=1e-4)


def test_nonfinite_losses_never_enter_the_history():
    """An fp16 overflow gives inf or NaN losses; recorded, they would make p_t NaN for the rest of the run."""
    T = 4
    d = GaussianDiffusion(T, "cosine", importance_sampling=True)
    d.update_loss_history(torch.tensor([0, 1, 1, 2, 1]), torch.tensor([1.0, float("inf"), 2.0, float("nan"), 3.0]))
    assert d.loss_counts.tolist() == [1, 2, 0, 0]  # t = 1: the inf left out, 2.0 and 3.0 in slots 0 and 1
    assert d.loss_history[1, :3].tolist() == [2.0, 3.0, 0.0] and d.loss_history[0, 0] == 1.0
    assert torch.isfinite(d.loss_history).all()
    for _ in range(10):  # warm every t up with finite losses between non-finite ones
        d.update_loss_history(torch.arange(T), torch.tensor([1.0, 1.0, 1.0, 2.0]))
        d.update_loss_history(torch.arange(T), torch.full((T,), float("nan")))
    assert d.loss_counts.tolist() == [11, 12, 10, 10]
    p = 0.999 * np.array([1, 1, 1, 2]) / 5 + 0.001 / T  # only the finite losses count
    t, w = d.sample_timesteps(1000, "cpu")
    np.testing.assert_allclose(npy(w), 1 / (T * p[t.numpy()]), rtol=1e-4)


def test_loss_history_travels_in_state_dict():
    """The loss history is a buffer: a fresh GaussianDiffusion loaded from state_dict samples the same p_t."""
    T = 20
    L = 1.0 + np.arange(T)
    d = GaussianDiffusion(T, "cosine", importance_sampling=True)
    feed(d, T, lambda t: 1.0 + t.float(), rounds=10)
    fresh = GaussianDiffusion(T, "cosine", importance_sampling=True)
    fresh.load_state_dict(d.state_dict())
    t, w = fresh.sample_timesteps(2_000, "cpu")
    np.testing.assert_allclose(npy(w), 1 / (T * expected_p(T, L)[t.numpy()]), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# sampling, respacing (section 4), DDIM


def test_steps_T_reproduces_the_original_process():
    """steps=T is the original process: same t sequence T-1..0 and the same ancestral sample as steps=None."""
    T = 20
    d = GaussianDiffusion(T, "cosine")
    noise = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(15))
    results = {}
    for steps in [None, T]:
        torch.manual_seed(16)
        ts, outs = step_ts(d, smooth_model, (4, 1, 2, 2), steps=steps, noise=noise)
        assert ts == list(range(T - 1, -1, -1))
        torch.manual_seed(16)
        x = d.sample(smooth_model, (4, 1, 2, 2), steps=steps, noise=noise)
        np.testing.assert_allclose(npy(x), npy(outs[-1]["x"]), atol=1e-6)  # sample = last progressive x
        results[steps] = x
    np.testing.assert_allclose(npy(results[None]), npy(results[T]), atol=1e-5)


def test_respaced_timesteps():
    """Section 4: K=50 of T=1000 steps evenly spaced over [0, 999], the model gets original-schedule t."""
    d = GaussianDiffusion(1000, "cosine")
    seen = []

    def model(x_t, t, **kwargs):
        assert t.dtype == torch.int64
        seen.append(int(t[0]))
        return torch.zeros(x_t.shape[0], 2, *x_t.shape[2:])

    ts, outs = step_ts(d, model, (1, 1, 2, 2), steps=50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    gaps = -np.diff(ts)
    assert (gaps > 0).all() and set(gaps.tolist()) <= {20, 21}  # 999/49 = 20.4
    assert seen == ts
    assert set(outs[0].keys()) >= {"t", "x", "pred_x0"}
    ts, _ = step_ts(d, model, (1, 1, 2, 2), steps=2)  # the fewest: x_T -> x_0 through one intermediate step
    assert ts == [999, 0]
    for steps in (0, 1, 1001):
        with pytest.raises(ValueError, match="must be between 2 and num_timesteps=1000"):
            d.schedule(steps)


@pytest.mark.parametrize("ddim", [True, False])
def test_sampling_with_true_noise_recovers_x0(ddim):
    """A model predicting the true eps of x0 gives x^_0 = x0 at each step; 10 steps (DDIM eta=0 or ancestral) end at x0."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine")
    x0 = grid_image((3, 3, 4, 4), seed=17).float()
    model = oracle_model(ref, x0)
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(18))
    torch.manual_seed(19)
    x = d.sample(model, (3, 3, 4, 4), steps=10, ddim=ddim, noise=noise)
    np.testing.assert_allclose(npy(x), npy(x0), atol=1e-4)
    if ddim:  # eta = 0 is deterministic
        torch.manual_seed(20)
        x_again = d.sample(model, (3, 3, 4, 4), steps=10, ddim=True, noise=noise)
        np.testing.assert_allclose(npy(x_again), npy(x), atol=1e-6)


@pytest.mark.parametrize("u", [1.0, -1.0])
def test_respaced_variance(u):
    """Section 4: respaced beta'_i = 1 - abar_{tau_i}/abar_{tau_{i-1}}; u=+1 samples with beta'_i, u=-1 with beta~'_i."""
    T, K, n = 1000, 10, 20_000
    ref = Ref("linear", T)
    d = GaussianDiffusion(T, "linear")
    model = oracle_model(ref, torch.zeros(n, 1, 1, 1), u=u)  # x^_0 = 0 exactly, so mean = coef_xt * x_t
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(21))
    torch.manual_seed(22)
    ts, outs = step_ts(d, model, (n, 1, 1, 1), steps=K, noise=noise)
    assert len(ts) == K
    x_in = npy(noise).ravel()
    for i, (t, out) in enumerate(zip(ts, outs)):
        x_out = npy(out["x"]).ravel()
        abar_t = ref.abar[t]
        abar_prev = ref.abar[ts[i + 1]] if i + 1 < K else 1.0
        if i + 1 == K:  # t = 0 adds no noise (sd would be 0.01 or more), x = x^_0 = 0
            np.testing.assert_allclose(x_out, 0.0, atol=1e-3)
            break
        beta = 1 - abar_t / abar_prev
        beta_tilde = beta * (1 - abar_prev) / (1 - abar_t)
        coef_xt = (1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar_t)
        residual = x_out - coef_xt * x_in
        expected_var = beta if u == 1.0 else beta_tilde
        assert residual.mean() == pytest.approx(0.0, abs=0.05 * math.sqrt(expected_var))
        assert residual.var() == pytest.approx(expected_var, rel=0.05), f"step {i} (t={t})"
        x_in = x_out


def test_ddim_eta0_steps_closed_form():
    """DDIM eta=0 step: x_prev = sqrt(abar_prev) x^_0 + sqrt(1-abar_prev) eps, eps recomputed from the CLIPPED x^_0."""
    T, K = 1000, 10
    ref = Ref("linear", T)
    d = GaussianDiffusion(T, "linear")
    x0 = torch.tensor([1.5, -1.5, 0.3, -0.7, 1.0, 0.0]).view(6, 1, 1, 1)  # two outside [-1, 1]
    x0_clipped = np.clip(npy(x0), -1, 1)
    noise = torch.randn(6, 1, 1, 1, generator=torch.Generator().manual_seed(29))
    ts, outs = step_ts(d, oracle_model(ref, x0), (6, 1, 1, 1), steps=K, ddim=True, eta=0.0, noise=noise)
    x_in = npy(noise)
    for i, (t, out) in enumerate(zip(ts, outs)):
        abar_t = ref.abar[t]
        abar_prev = ref.abar[ts[i + 1]] if i + 1 < K else 1.0
        np.testing.assert_allclose(npy(out["pred_x0"]), x0_clipped, atol=1e-4)
        eps = (x_in - math.sqrt(abar_t) * x0_clipped) / math.sqrt(1 - abar_t)
        expected = math.sqrt(abar_prev) * x0_clipped + math.sqrt(1 - abar_prev) * eps
        np.testing.assert_allclose(npy(out["x"]), expected, atol=1e-4, err_msg=f"step {i} (t={t})")
        x_in = npy(out["x"])


def test_ddim_eta_variance():
    """DDIM (eq. 12 of Song et al.): x_prev = sqrt(abar_prev) x^_0 + sqrt(1-abar_prev-sigma^2) eps + sigma z,
    sigma = eta sqrt((1-abar_prev)/(1-abar_t)) sqrt(1-abar_t/abar_prev), on the respaced steps."""
    T, K, n, eta = 1000, 8, 20_000, 0.5
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine")
    model = oracle_model(ref, torch.zeros(n, 1, 1, 1))
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(23))
    torch.manual_seed(24)
    ts, outs = step_ts(d, model, (n, 1, 1, 1), steps=K, ddim=True, eta=eta, noise=noise)
    assert len(ts) == K and ts[0] == 999 and ts[-1] == 0
    x_in = npy(noise).ravel()
    for i, (t, out) in enumerate(zip(ts, outs)):
        x_out = npy(out["x"]).ravel()
        if i + 1 == K:
            np.testing.assert_allclose(x_out, 0.0, atol=1e-4)
            break
        abar_t, abar_prev = ref.abar[t], ref.abar[ts[i + 1]]
        sigma2 = eta ** 2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        eps_coef = math.sqrt(1 - abar_prev - sigma2) / math.sqrt(1 - abar_t)  # eps = x_t / sqrt(1 - abar_t)
        residual = x_out - eps_coef * x_in
        assert residual.var() == pytest.approx(sigma2, rel=0.05), f"step {i} (t={t})"
        x_in = x_out


@pytest.mark.parametrize("ddim", [True, False])
def test_sample_range_shape_device(ddim):
    """sample returns x0 in [-1, 1] with the requested shape, on the device of the given noise."""
    d = GaussianDiffusion(20, "cosine")
    model = constant_model(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))  # x^_0 = x_t / sqrt(abar): large
    torch.manual_seed(25)
    noise = 3 * torch.randn(2, 3, 4, 4)
    x = d.sample(model, (2, 3, 4, 4), steps=7, ddim=ddim, noise=noise)
    assert x.shape == (2, 3, 4, 4) and x.device == noise.device
    assert x.min() >= -1 and x.max() <= 1
    x = d.sample(smooth_model, (2, 3, 4, 4), ddim=ddim, device="cpu")
    assert x.shape == (2, 3, 4, 4) and x.min() >= -1 and x.max() <= 1


# ----------------------------------------------------------------------------------------------------
# bits/dim


def test_bpd_of_true_noise_model_hand_computed():
    """Full VLB: with the true eps and u=0 every L_t is a pure variance KL / the decoder NLL at mean x0, plus the prior."""
    T = 50
    ref = Ref("linear", T)  # beta from 0.002 to 0.4
    d = GaussianDiffusion(T, "linear")
    x0 = grid_image((2, 1, 2, 2), seed=26)
    x0[0, 0, 0, 0], x0[1, 0, 1, 1] = -1.0, 1.0  # both edge bins
    out = d.bpd(oracle_model(ref, x0, u=0.0), x0.float())
    assert out["total_bpd"].shape == (2,) and out["prior_bpd"].shape == (2,)
    assert out["vb"].shape == (2, T) and out["mse"].shape == (2, T)

    lv_p = ref.learned_logvar(np.arange(T), 0.0).ravel()  # midpoint of log beta and log beta~
    lv_q = ref.post_logvar_clipped
    expected_vb = np.zeros((2, T))
    expected_vb[:, 1:] = (0.5 * (-1 + lv_p - lv_q + np.exp(lv_q - lv_p)))[1:] / LOG2  # means agree exactly
    x = npy(x0).reshape(2, -1)
    nll = [[-ref_discretized_loglik(xi, xi, 0.5 * lv_p[0]) for xi in row] for row in x]  # mean at t=0 is x0
    expected_vb[:, 0] = np.mean(nll, axis=1) / LOG2
    a = ref.abar[-1]
    prior = ref_normal_kl(math.sqrt(a) * x, math.log(1 - a), 0.0, 0.0).mean(axis=1) / LOG2

    np.testing.assert_allclose(npy(out["vb"]), expected_vb, rtol=1e-4, atol=1e-5)
    assert prior.min() > 1e-7  # abar_T = 2e-5: small but not nothing
    np.testing.assert_allclose(npy(out["prior_bpd"]), prior, rtol=0.02, atol=5e-7)
    np.testing.assert_allclose(npy(out["total_bpd"]), expected_vb.sum(1) + prior, rtol=1e-4)
    np.testing.assert_allclose(npy(out["total_bpd"]), npy(out["vb"].sum(1) + out["prior_bpd"]), rtol=1e-5)
    assert npy(out["mse"]).max() < 1e-6


def test_bpd_knowing_the_data_is_better():
    """The VLB of a model that predicts the true noise is lower than that of a model predicting eps = 0."""
    T = 50
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine")
    x0 = grid_image((2, 1, 2, 2), seed=27).float()
    torch.manual_seed(28)
    good = d.bpd(oracle_model(ref, x0), x0)
    torch.manual_seed(28)
    bad = d.bpd(constant_model(torch.zeros_like(x0), torch.zeros_like(x0)), x0)
    assert (npy(good["total_bpd"]) < npy(bad["total_bpd"])).all()
    assert npy(bad["mse"]).min() > 0
    for out in (good, bad):
        np.testing.assert_allclose(npy(out["total_bpd"]), npy(out["vb"].sum(1) + out["prior_bpd"]), rtol=1e-5)


def test_bpd_prior_term_cosine_T1000():
    """Prior L_T = KL(q(x_T|x0) || N(0, I)) = KL(N(sqrt(abar_T) x0, 1-abar_T) || N(0,1)) ~ 0 for the cosine schedule."""
    T = 1000
    ref = Ref("cosine", T)
    d = GaussianDiffusion(T, "cosine")
    x0 = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    out = d.bpd(oracle_model(ref, x0), x0)
    a = ref.abar[-1]
    x = npy(x0).reshape(1, -1)
    prior = ref_normal_kl(math.sqrt(a) * x, math.log(1 - a), 0.0, 0.0).mean(axis=1) / LOG2
    assert npy(out["prior_bpd"]) == pytest.approx(prior, abs=1e-6)
    assert float(out["prior_bpd"]) < 1e-4
    assert out["vb"].shape == (1, T)
