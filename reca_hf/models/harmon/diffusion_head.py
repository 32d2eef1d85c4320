"""MAR's per-token diffusion head: the AdaLN MLP, its IDDPM training loss and its sampler.

As the authors' `DiffLoss` (`Harmon/src/models/mar/diffloss.py`, with the DiT/IDDPM diffusion code under
`mar/diffusion/`): epsilon prediction with a learned-range variance on a cosine schedule of 1000 steps; the loss is
the epsilon MSE plus the variational bound (in bits, with the mean detached); sampling runs the schedule respaced to
``num_sampling_steps`` steps, with the noise scaled by a temperature and classifier-free guidance on epsilon. The
schedule arithmetic is done in float64 and cast to float32 where it meets a tensor, as theirs. diffusers'
`DDPMScheduler` has the schedule but neither the variational-bound loss nor the temperature, so they are here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (GLIDE's, cos first) through a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class ResBlock(GradientCheckpointingLayer):
    """LayerNorm, AdaLN shift/scale from the condition, a SiLU MLP, a gated residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT's final layer: an affine-free LayerNorm, AdaLN shift/scale, a linear to the outputs."""

    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels, 2 * model_channels))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: ``(x_t, t, z) -> (epsilon, variance values)``, ``2 * in_channels`` outputs per row."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.input_proj(x.to(self.input_proj.weight.dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(self.cond_embed.weight.dtype))
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """IDDPM's cosine schedule: ``alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2``, in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ]
    )


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """The kept steps of a respaced schedule: ``"100"`` keeps 100 evenly strided steps of ``num_timesteps``
    (comma-separated counts split the range into sections, as IDDPM's)."""
    counts = [int(x) for x in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"num_sampling_steps: cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


class GaussianSchedule:
    """The float64 tables of a (possibly respaced) Gaussian diffusion, and the steps that use them.

    ``timestep_map[i]`` is the original step the denoiser sees at index ``i`` (the identity without respacing).
    """

    def __init__(self, base_betas: np.ndarray, use_timesteps: list[int] | None = None):
        if use_timesteps is None:
            betas, timestep_map = base_betas, list(range(len(base_betas)))
        else:
            base_cumprod = np.cumprod(1.0 - base_betas)
            keep = set(use_timesteps)
            betas, timestep_map, last = [], [], 1.0
            for i, cumprod in enumerate(base_cumprod):
                if i in keep:
                    betas.append(1 - cumprod / last)
                    last = cumprod
                    timestep_map.append(i)
            betas = np.array(betas)
        self.betas = np.asarray(betas, dtype=np.float64)
        self.timestep_map = timestep_map
        self.num_timesteps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        posterior_variance = self.betas * (1.0 - cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(self.betas)

    @staticmethod
    def take(table: np.ndarray, t: torch.Tensor) -> torch.Tensor:
        """``table[t]`` as a float32 column, broadcastable against ``(rows, channels)``."""
        return torch.from_numpy(table).to(t.device)[t].float()[:, None]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            self.take(self.sqrt_alphas_cumprod, t) * x_start + self.take(self.sqrt_one_minus_alphas_cumprod, t) * noise
        )

    def posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.take(self.posterior_mean_coef1, t) * x_start + self.take(self.posterior_mean_coef2, t) * x_t

    def model_mean_log_variance(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, var_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """p(x_{t-1} | x_t): the mean from the predicted epsilon, the log variance between the posterior's
        (clipped) and beta by ``(var_values + 1) / 2``."""
        min_log = self.take(self.posterior_log_variance_clipped, t)
        max_log = self.take(self.log_betas, t)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        x_start = (
            self.take(self.sqrt_recip_alphas_cumprod, t) * x_t - self.take(self.sqrt_recipm1_alphas_cumprod, t) * eps
        )
        return self.posterior_mean(x_start, x_t, t), log_variance


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` under a Gaussian discretised to 8-bit bins on [-1, 1] (IDDPM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffLoss(nn.Module):
    """The diffusion head: the denoiser ``net`` and its training and sampling schedules (not saved)."""

    def __init__(
        self,
        target_channels: int,
        z_channels: int,
        depth: int,
        width: int,
        num_sampling_steps: str,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        self.in_channels = target_channels
        self.net = SimpleMLPAdaLN(target_channels, width, target_channels * 2, z_channels, depth)
        betas = cosine_betas(num_train_timesteps)
        self.train_schedule = GaussianSchedule(betas)
        self.sample_schedule = GaussianSchedule(betas, space_timesteps(num_train_timesteps, num_sampling_steps))

    def row_losses(
        self, target: torch.Tensor, z: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Per-row loss, ``(rows,)``: the epsilon MSE plus the variational-bound term (bits per channel) of the
        learned variance, the mean detached in the bound (IDDPM's hybrid loss with ``LossType.MSE``)."""
        schedule = self.train_schedule
        x_t = schedule.q_sample(target, timesteps, noise)
        output = self.net(x_t, timesteps, z)
        eps, var_values = output.split(self.in_channels, dim=1)
        model_mean, model_log_variance = schedule.model_mean_log_variance(x_t, timesteps, eps.detach(), var_values)
        true_mean = schedule.posterior_mean(target, x_t, timesteps)
        true_log_variance = schedule.take(schedule.posterior_log_variance_clipped, timesteps)
        kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).mean(dim=1) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(target, model_mean, 0.5 * model_log_variance)
        decoder_nll = decoder_nll.mean(dim=1) / math.log(2.0)
        vb = torch.where(timesteps == 0, decoder_nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return mse + vb

    def draw(
        self, rows: int, device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps ``U{0..T-1}`` then standard-normal noise for ``rows`` rows, in the authors' order."""
        draw_device = generator.device if generator is not None else device
        timesteps = torch.randint(
            0, self.train_schedule.num_timesteps, (rows,), generator=generator, device=draw_device
        )
        noise = torch.randn(rows, self.in_channels, generator=generator, device=draw_device)
        return timesteps.to(device), noise.to(device)

    @torch.no_grad()
    def sample(
        self,
        z: torch.Tensor,
        temperature: float = 1.0,
        cfg: float = 1.0,
        *,
        z_uncond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sample one token per row of the condition ``z`` with the respaced ancestral sampler.

        With ``cfg != 1``, ``z_uncond`` (one row per row of ``z``) gives the unconditional epsilon and the
        guided one is ``uncond + cfg * (cond - uncond)``; the variance stays the conditional prediction's.
        ``noise`` (``(num_sampling_steps + 1, rows, channels)``: the start, then one draw per step) replaces the
        draws from ``generator``. The last step adds no noise.
        """
        if cfg != 1.0 and z_uncond is None:
            raise ValueError(f"DiffLoss.sample: cfg={cfg} needs z_uncond (the unconditional rows); pass it or cfg=1.")
        schedule = self.sample_schedule
        rows, steps = z.shape[0], schedule.num_timesteps
        shape = (rows, self.in_channels)
        if noise is None:
            draw_device = generator.device if generator is not None else z.device
            noise = torch.randn(steps + 1, *shape, generator=generator, device=draw_device)
        if tuple(noise.shape) != (steps + 1, *shape):
            raise ValueError(
                f"DiffLoss.sample: noise has shape {tuple(noise.shape)}, expected {(steps + 1, *shape)} "
                "(the start and one draw per sampling step)."
            )
        noise = noise.to(device=z.device, dtype=torch.float32)
        timestep_map = torch.tensor(schedule.timestep_map, device=z.device)
        x = noise[0]
        for index in reversed(range(steps)):
            t = torch.full((rows,), index, device=z.device, dtype=torch.long)
            if cfg != 1.0:
                output = self.net(torch.cat([x, x]), timestep_map[torch.cat([t, t])], torch.cat([z, z_uncond]))
                eps, var_values = output[:rows].split(self.in_channels, dim=1)
                uncond_eps = output[rows:, : self.in_channels]
                eps = uncond_eps + cfg * (eps - uncond_eps)
            else:
                eps, var_values = self.net(x, timestep_map[t], z).split(self.in_channels, dim=1)
            mean, log_variance = schedule.model_mean_log_variance(x, t, eps, var_values)
            step_noise = noise[steps - index] if index > 0 else torch.zeros_like(x)
            x = mean + torch.exp(0.5 * log_variance) * step_noise * temperature
        return x
