"""
The Gaussian diffusion process of Improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672), in one class.

Forward process  q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                   (DDPM eq. 4)
Reverse process  p(x_{t-1} | x_t) = N(mu(x_t, t), Sigma(x_t, t))                      (eq. 2)
The network predicts the noise eps (-> mu, eq. 10-11) and a per-pixel variance output, whose v = (output + 1) / 2
interpolates log Sigma between log beta_t and log beta~_t (eq. 15). It is trained on L_hybrid = L_simple + 0.001 L_vlb
(eq. 16), optionally with importance-sampled timesteps (eq. 18), and sampled with any number of steps (sec. 4)
by ancestral sampling or DDIM. Indices are 0-based: t = 0 is the first noising step (the paper's t = 1).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

HYBRID_LAMBDA = 0.001  # eq. 16: L_hybrid = L_simple + lambda L_vlb
HISTORY_PER_TERM = 10  # sec. 3.3: keep the last 10 losses of every t for importance sampling
UNIFORM_SHARE = 0.001  # as the reference code: a little of the uniform distribution in p_t, so every t is drawn


# -- The schedule: beta_t (eq. 17, or DDPM's linear one) and the arrays made from it ------------------------------
def make_betas(noise_schedule, num_timesteps):
    """beta_t for t = 0..T-1, float64."""
    if noise_schedule == "linear":
        # DDPM's 1e-4 .. 0.02 for T = 1000, scaled so that other T give the same overall noise (Improved DDPM code)
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if noise_schedule == "cosine":
        # eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2); the small offset s keeps
        # beta_t from being vanishingly small near t = 0. Clipping at 0.999 prevents a singularity at t = T.
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise_schedule {noise_schedule!r}: use 'cosine' or 'linear'")


def schedule_arrays(betas):
    """Every float64 array the process needs, made from betas[t], t = 0..T-1 (also for respaced processes)."""
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=betas.dtype, device=betas.device), alphas_cumprod[:-1]])
    # posterior q(x_{t-1} | x_t, x_0), DDPM eq. 6-7
    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # beta~_t
    return dict(
        betas=betas,
        log_betas=torch.log(betas),
        alphas_cumprod=alphas_cumprod,  # abar_t = prod_{s <= t} (1 - beta_s)
        # in float64: near t = 0, 1 - abar ~ 1e-4, and forming it in float32 would lose 4 of its 7 digits in x^_0
        sqrt_alphas_cumprod=torch.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1 - alphas_cumprod),
        sqrt_alphas_cumprod_prev=torch.sqrt(alphas_cumprod_prev),  # sqrt(abar_{t-1}), 1 at t = 0
        one_minus_alphas_cumprod_prev=1 - alphas_cumprod_prev,
        posterior_variance=posterior_variance,
        # beta~_0 = 0 would give log(0): clip the first entry to beta~_1 (the decoder at t = 0 needs a finite log)
        posterior_log_variance=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        posterior_mean_coef_x0=betas * torch.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),  # DDPM eq. 7
        posterior_mean_coef_xt=(1 - alphas_cumprod_prev) * torch.sqrt(1 - betas) / (1 - alphas_cumprod),
        # the fixed "large" variance of DDPM: Sigma = beta_t, with beta~_1 at t = 0 where beta_0 is too small
        fixed_log_variance=torch.log(torch.cat([posterior_variance[1:2], betas[1:]])),
    )


# -- Tools: Gaussian KL, the discretised decoder, a schedule value at each t, the network in float32 --------------
def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) in nats, elementwise, of data x in [-1, 1] quantised to 256 levels (bins of width 2/255) under
    N(means, exp(log_scales)^2) (DDPM sec. 3.3, eq. 13)."""
    inv_std = torch.exp(-log_scales)
    cdf_upper = torch.special.ndtr(inv_std * (x - means + 1 / 255))
    cdf_lower = torch.special.ndtr(inv_std * (x - means - 1 / 255))
    # the edge bins extend to -inf (at x = -1) and +inf (at x = 1), so the 256 probabilities sum to 1
    probability = torch.where(x < -0.999, cdf_upper, torch.where(x > 0.999, 1 - cdf_lower, cdf_upper - cdf_lower))
    return torch.log(probability.clamp(min=1e-12))


def mean_flat(x):  # the mean over every dimension but the batch: (B, ...) -> (B,)
    return x.mean(dim=tuple(range(1, x.dim())))


def value_at(array, t, x):
    """array[t] for a batch of timesteps t, (B, 1, 1, 1) to broadcast against x, in x's precision but at least
    float32: the float64 schedule never meets bf16/fp16 arithmetic."""
    values = array.to(t.device)[t].to(torch.promote_types(x.dtype, torch.float32))
    return values.view(-1, *([1] * (x.dim() - 1)))


def run_model(model, x_t, t, model_kwargs):
    """model(x_t, t, **model_kwargs), in at least float32 even when the network ran in bf16/fp16."""
    output = model(x_t, t, **(model_kwargs or {}))
    return output.to(torch.promote_types(output.dtype, torch.float32))


def all_gather_cat(x):  # every rank's x, concatenated in rank order
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x)
    return torch.cat(gathered)


class GaussianDiffusion(nn.Module):
    def __init__(self, num_timesteps=1000, noise_schedule="cosine", learn_sigma=True, loss_type="hybrid",
                 importance_sampling=False):
        super().__init__()
        if loss_type not in ("mse", "hybrid", "kl"):
            raise ValueError(f"unknown loss_type {loss_type!r}: use 'mse', 'hybrid' or 'kl'")
        self.num_timesteps, self.learn_sigma = num_timesteps, learn_sigma
        self.loss_type, self.importance_sampling = loss_type, importance_sampling
        # The schedule is rebuilt from the config: buffers so it follows .to(device), but not in the state_dict.
        schedule = schedule_arrays(make_betas(noise_schedule, num_timesteps))
        for name, array in schedule.items():
            self.register_buffer(name, array, persistent=False)
        self.schedule_names = list(schedule)
        # sec. 3.3: a ring buffer of the last 10 losses of every t and their count, in the state_dict for exact resume
        self.register_buffer("loss_history", torch.zeros(num_timesteps, HISTORY_PER_TERM, dtype=torch.float64))
        self.register_buffer("loss_counts", torch.zeros(num_timesteps, dtype=torch.int64))

    def arrays(self):
        """The schedule arrays of the original T-step process, by name."""
        return {name: getattr(self, name) for name in self.schedule_names}

    def schedule(self, steps=None):
        """(timesteps, arrays) of the process sampled with `steps` steps (sec. 4). timesteps[i] is the original
        t of respaced step i; arrays are indexed by i. steps=None or T gives the original process."""
        T = self.num_timesteps
        if steps is None or steps == T:
            return torch.arange(T, device=self.betas.device), self.arrays()
        if not 2 <= steps <= T:  # one step would need the variance of a posterior that has no previous step
            raise ValueError(f"steps={steps} must be between 2 and num_timesteps={T}")
        timesteps = torch.linspace(0, T - 1, steps, device=self.betas.device).round().long()  # 0 ... T-1
        # abar kept at the chosen steps: beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}} gives exactly their marginals
        alphas_cumprod = self.alphas_cumprod[timesteps]
        previous = torch.cat([torch.ones_like(alphas_cumprod[:1]), alphas_cumprod[:-1]])
        return timesteps, schedule_arrays(1 - alphas_cumprod / previous)

    # -- The forward process: q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0) --------------------------------
    def q_sample(self, x0, t, noise=None):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        noise_scale = value_at(self.sqrt_one_minus_alphas_cumprod, t, x0)  # sqrt(1 - abar_t)
        return value_at(self.sqrt_alphas_cumprod, t, x0) * x0 + noise_scale * noise

    def q_posterior(self, x0, x_t, t, arrays=None):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (DDPM eq. 6-7)."""
        arrays = arrays or self.arrays()
        mean = (value_at(arrays["posterior_mean_coef_x0"], t, x_t) * x0
                + value_at(arrays["posterior_mean_coef_xt"], t, x_t) * x_t)
        variance = value_at(arrays["posterior_variance"], t, x_t).expand_as(x_t)
        log_variance = value_at(arrays["posterior_log_variance"], t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # -- The reverse process: p(x_{t-1} | x_t) from the network's output ------------------------------------------
    def p_mean_variance(self, model, x_t, t, clip_denoised=True, model_kwargs=None):
        """Mean and variance of p(x_{t-1} | x_t) and the predicted x_0, from one call of the network."""
        return self.output_to_distribution(run_model(model, x_t, t, model_kwargs), x_t, t, clip_denoised)

    def output_to_distribution(self, model_output, x_t, t, clip_denoised, arrays=None):
        """The network's output (B, 2C, H, W) = [eps, variance_output] (or (B, C, H, W) = eps) -> p(x_{t-1} | x_t).
        `t` indexes `arrays` (those of a respaced process when sampling with fewer steps)."""
        arrays = arrays or self.arrays()
        C = x_t.shape[1]
        eps = model_output[:, :C]
        if self.learn_sigma:
            # eq. 15: Sigma = exp(v log beta_t + (1 - v) log beta~_t), v = (variance_output + 1) / 2, unclamped. The
            # network only picks a point between the two bounds of DDPM, far easier than predicting Sigma itself.
            v = (model_output[:, C:] + 1) / 2  # model_output[:, C:]: the variance output
            log_variance = (v * value_at(arrays["log_betas"], t, x_t)
                            + (1 - v) * value_at(arrays["posterior_log_variance"], t, x_t))
        else:
            log_variance = value_at(arrays["fixed_log_variance"], t, x_t).expand_as(x_t)
        # DDPM eq. 4 solved for x_0 with the predicted noise; clipping to the data range helps sampling
        sqrt_abar = value_at(arrays["sqrt_alphas_cumprod"], t, x_t)
        sqrt_one_minus_abar = value_at(arrays["sqrt_one_minus_alphas_cumprod"], t, x_t)
        pred_x0 = (x_t - sqrt_one_minus_abar * eps) / sqrt_abar
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t, arrays)  # DDPM eq. 7 with x_0 replaced by its estimate
        return dict(mean=mean, variance=torch.exp(log_variance), log_variance=log_variance, pred_x0=pred_x0)

    # -- The losses: L_t of the bound, L_simple, L_hybrid ---------------------------------------------------------
    def vb_terms(self, model_output, x0, x_t, t, clip_denoised=False):
        """L_t of the variational bound in bits/dim, (B,): KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and
        the discretized decoder NLL -log p(x_0 | x_1) for t = 0  (DDPM eq. 5, Improved DDPM eq. 4-6)."""
        true_mean, _, true_log_variance = self.q_posterior(x0, x_t, t)
        reverse = self.output_to_distribution(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, reverse["mean"], reverse["log_variance"])) / math.log(2)
        log_likelihood = discretized_gaussian_log_likelihood(x0, reverse["mean"], 0.5 * reverse["log_variance"])
        nll = -mean_flat(log_likelihood) / math.log(2)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, t, noise=None, model_kwargs=None):
        """Per-example losses (B,): "loss" to minimise, "mse" (L_simple) and "vb" (L_t in bits/dim)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        model_output = run_model(model, x_t, t, model_kwargs)  # (B, 2C or C, H, W)
        C = x0.shape[1]
        mse = mean_flat((noise - model_output[:, :C]) ** 2)  # L_simple, DDPM eq. 14
        if self.loss_type == "kl":
            vb = self.vb_terms(model_output, x0, x_t, t)
            return dict(loss=vb * self.num_timesteps, mse=mse, vb=vb)  # L_vlb = T * E_t[L_t], estimated by one t
        if not self.learn_sigma:
            return dict(loss=mse, mse=mse)
        # Sigma is learned: L_t trains it, with the gradient into eps stopped so that L_simple alone trains the
        # mean (sec. 3.1). "hybrid" is eq. 16, L_simple + lambda L_vlb: L_vlb = the sum of the T terms, estimated by
        # T L_t at the one t drawn, so L_t is weighted lambda T (1 at T = 1000). "mse" adds L_t unweighted, as the
        # reference code does: without it the variance channels would get no gradient and Sigma would stay untrained.
        eps, variance_output = model_output[:, :C].detach(), model_output[:, C:]
        vb = self.vb_terms(torch.cat([eps, variance_output], dim=1), x0, x_t, t)
        vb_weight = HYBRID_LAMBDA * self.num_timesteps if self.loss_type == "hybrid" else 1.0
        return dict(loss=mse + vb_weight * vb, mse=mse, vb=vb)

    # -- Importance sampling of t (sec. 3.3, eq. 18) --------------------------------------------------------------
    def sample_timesteps(self, batch_size, device):
        """Importance sampling (sec. 3.3, eq. 18): t (B,) and weights (B,) with E[weight * L_t] = the uniform mean."""
        T = self.num_timesteps
        if not self.importance_sampling:
            return torch.randint(0, T, (batch_size,), device=device), torch.ones(batch_size, device=device)
        # p_t ∝ sqrt(E[L_t^2]) once every t has 10 losses, uniform before: torch.where, not `if`, waits for no GPU
        warmed_up = (self.loss_counts >= HISTORY_PER_TERM).all()
        p_t = torch.sqrt((self.loss_history ** 2).mean(dim=1))
        p_t = (1 - UNIFORM_SHARE) * p_t / p_t.sum().clamp(min=1e-300) + UNIFORM_SHARE / T
        p_t = torch.where(warmed_up, p_t, torch.full_like(p_t, 1 / T)).to(device)
        t = torch.multinomial(p_t, batch_size, replacement=True)
        weights = torch.where(warmed_up.to(device), 1 / (T * p_t[t]), torch.ones_like(p_t[t]))
        return t, weights.float()

    @torch.no_grad()
    def update_loss_history(self, t, losses):
        """Record a batch's per-example losses. Under torch.distributed every rank records all ranks' losses, so
        all draw t alike. A loss that is not finite (an fp16 overflow) is left out: it would make p_t NaN for good."""
        t, losses = t.to(self.loss_history.device), losses.detach().to(self.loss_history)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t, losses = all_gather_cat(t), all_gather_cat(losses)
        # As a plain loop, which would wait for the GPU at every example (a ring buffer of 10 losses per t):
        #     for i in range(len(t)):
        #         if torch.isfinite(losses[i]):
        #             self.loss_history[t[i], self.loss_counts[t[i]] % HISTORY_PER_TERM] = losses[i]
        #             self.loss_counts[t[i]] += 1
        # All at once: example i goes to slot (count_t + k) % 10, k = the earlier finite examples with its t.
        finite = torch.isfinite(losses)  # masked, not indexed: boolean indexing would wait for the GPU
        same_t = (t[:, None] == t[None, :]) & finite[None, :]  # (B, B): row i, the finite examples with i's t
        k = same_t.tril(diagonal=-1).sum(dim=1)
        slot = t * HISTORY_PER_TERM + (self.loss_counts[t] + k) % HISTORY_PER_TERM
        order = torch.where(finite, torch.arange(len(t), device=t.device), -1)  # -1: wins no slot
        latest = torch.full((self.loss_history.numel(),), -1, device=t.device).scatter_reduce(0, slot, order, "amax")
        history = self.loss_history.view(-1)
        history.copy_(torch.where(latest >= 0, losses[latest.clamp(min=0)], history))
        self.loss_counts.index_add_(0, t, finite.long())

    # -- Sampling: ancestral or DDIM, in T steps or fewer (sec. 4) ------------------------------------------------
    @torch.no_grad()
    def sample_progressive(self, model, shape, steps=None, ddim=False, eta=0.0, noise=None, clip_denoised=True,
                           model_kwargs=None, device=None, progress=False, generator=None):
        """The reverse process from x_T = noise or ~ N(0, I), yielding dict(t, x, pred_x0) after every step. steps < T
        samples a respaced process (sec. 4); ddim=True uses DDIM's update (Song et al. 2020, eq. 12). generator (on the
        sampling device; None: the global stream) draws x_T and every step's noise. device: None for the model's."""
        if noise is None and device is None:
            parameters = model.parameters() if isinstance(model, nn.Module) else iter(())
            device = next(parameters, torch.empty(0)).device
        x = torch.randn(*shape, device=device, generator=generator) if noise is None else noise  # x_T
        device, B = x.device, x.shape[0]
        timesteps, arrays = self.schedule(steps)
        timesteps = timesteps.to(device)
        indices = reversed(range(len(timesteps)))
        for i in tqdm(indices, total=len(timesteps), desc="sampling", disable=not progress, leave=False):
            step = torch.full((B,), i, device=device, dtype=torch.long)  # index into the respaced arrays
            t = timesteps[step]  # the original timestep, which is what the network was trained on
            reverse = self.output_to_distribution(run_model(model, x, t, model_kwargs), x, step, clip_denoised, arrays)
            not_last = float(i > 0)  # no noise is added when producing x_0
            if ddim:
                # DDIM (its eq. 12 and 16, sigma_t = eta sqrt(beta~_t)), eps recomputed from the clipped x_0 to match it
                eps = ((x - value_at(arrays["sqrt_alphas_cumprod"], step, x) * reverse["pred_x0"])
                       / value_at(arrays["sqrt_one_minus_alphas_cumprod"], step, x))
                sigma = eta * torch.sqrt(value_at(arrays["posterior_variance"], step, x))
                x = (value_at(arrays["sqrt_alphas_cumprod_prev"], step, x) * reverse["pred_x0"]
                     + torch.sqrt(value_at(arrays["one_minus_alphas_cumprod_prev"], step, x) - sigma ** 2) * eps
                     + not_last * sigma * torch.randn(x.shape, device=device, generator=generator))
            else:
                x = reverse["mean"] + not_last * torch.exp(0.5 * reverse["log_variance"]) * torch.randn(
                    x.shape, device=device, generator=generator)
            yield dict(t=t, x=x, pred_x0=reverse["pred_x0"])

    def sample(self, model, shape, **kwargs):
        """Samples x_0 in [-1, 1] of the given shape (B, C, H, W); kwargs as for sample_progressive."""
        for out in self.sample_progressive(model, shape, **kwargs):
            x = out["x"]
        return x.clamp(-1, 1)

    # -- Bits/dim: the whole variational bound --------------------------------------------------------------------
    @torch.no_grad()
    def bpd(self, model, x0, clip_denoised=True, model_kwargs=None, progress=None):
        """The full variational bound in bits/dim (the paper's NLL): every L_t, t = 0..T-1, each on a fresh x_t, plus
        the prior term L_T = KL(q(x_T | x_0) || N(0, I)). progress: None or a tqdm bar to advance by B at every t."""
        B, T = x0.shape[0], self.num_timesteps
        vb, mse = torch.zeros(B, T, device=x0.device), torch.zeros(B, T, device=x0.device)
        for step in range(T):
            t = torch.full((B,), step, device=x0.device, dtype=torch.long)
            noise = torch.randn_like(x0)
            x_t = self.q_sample(x0, t, noise)
            model_output = run_model(model, x_t, t, model_kwargs)
            vb[:, step] = self.vb_terms(model_output, x0, x_t, t, clip_denoised)
            mse[:, step] = mean_flat((noise - model_output[:, :x0.shape[1]]) ** 2)
            if progress is not None:
                progress.update(B)
        last = torch.full((B,), T - 1, device=x0.device, dtype=torch.long)
        mean = value_at(self.sqrt_alphas_cumprod, last, x0) * x0
        log_variance = 2 * torch.log(value_at(self.sqrt_one_minus_alphas_cumprod, last, x0))
        prior_bpd = mean_flat(normal_kl(mean, log_variance, torch.zeros_like(x0), torch.zeros_like(x0))) / math.log(2)
        return dict(total_bpd=vb.sum(dim=1) + prior_bpd, prior_bpd=prior_bpd, vb=vb, mse=mse)


# -- Classifier-free guidance: training with a null label, sampling with a mix ------------------------------------
def drop_labels(y, p, null_label):
    """Each label becomes the null label with probability p, so that the network also learns eps(x_t, no class):
    classifier-free guidance mixes the two at sampling time (Ho & Salimans 2022, Algorithm 1)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_label), y)


def classifier_free_guidance(model, guidance, null_label):
    """A model whose eps is guided toward the class y (Ho & Salimans 2022, eq. 6): eps = (1 + w) eps(x_t, y) -
    w eps(x_t, no class), both in one batch of 2B. The variance channels stay the conditional model's (a choice; the
    guidance paper fixes the variances). guidance = 0 returns model itself: plain conditional sampling exactly."""
    if guidance == 0:
        return model

    def guided(x_t, t, y):
        both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_label)]))
        conditional, unconditional = both.chunk(2)  # (B, 2C, H, W) each
        C = x_t.shape[1]
        eps = (1 + guidance) * conditional[:, :C] - guidance * unconditional[:, :C]
        return torch.cat([eps, conditional[:, C:]], dim=1)

    return guided
