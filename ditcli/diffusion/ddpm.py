"""The Gaussian diffusion process DiT trains and samples with: the part of ADM's code it uses, written out.

Everything follows Ho et al. (DDPM) and Nichol & Dhariwal (improved DDPM, "IDDPM"): a discrete process of
`num_timesteps` steps, eps prediction, and an optional learned-range variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ditcli.diffusion.process import predict_and_score
from ditcli.errors import UserValueError

TRAIN_TIMESTEPS = 1000
BETA_SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Linear schedule of DDPM, 1e-4 to 0.02 at 1000 steps, rescaled for other lengths (IDDPM Sec. 3.2)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule, Eq. 17 of IDDPM, with betas clipped at `max_beta`."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = np.arange(num_timesteps) / num_timesteps
    betas = [1 - alpha_bar(s + 1 / num_timesteps) / alpha_bar(s) for s in steps]
    return np.minimum(np.array(betas, dtype=np.float64), max_beta)


def named_betas(schedule: str, num_timesteps: int = TRAIN_TIMESTEPS) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise UserValueError(f"unknown beta schedule {schedule!r}", f"choose from {', '.join(BETA_SCHEDULES)}")


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """Timesteps kept by a respacing spec: "250", "ddim50" or sections "10,10,5" (ADM's `space_timesteps`)."""
    spec = str(spec).strip()
    if spec == "":
        return list(range(num_timesteps))
    if spec.startswith("ddim"):
        count = _parse_count(spec[4:], spec)
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise UserValueError(f"respacing {spec!r}: no integer stride of {num_timesteps} steps gives exactly {count}",
                             f"use a plain count such as {count!r}, or a ddimN with N dividing {num_timesteps}")
    counts = [_parse_count(part, spec) for part in spec.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise UserValueError(f"respacing {spec!r}: cannot take {count} steps from a section of {size}",
                                 f"take at most {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def _parse_count(text: str, spec: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise UserValueError(f"unknown respacing spec {spec!r}",
                             "use a step count like '250', 'ddim50', or sections '10,10,5'")
    return int(text)


@dataclass(frozen=True)
class Diffusion:
    """A (possibly respaced) discrete diffusion process; index i runs the model at `timesteps[i]`.

    All tables are float64 numpy arrays, as in ADM; `extract` casts them to float32 at use, as ADM does.
    """

    betas: np.ndarray
    timesteps: np.ndarray
    learn_sigma: bool = True

    @classmethod
    def create(cls, respacing: str = "", schedule: str = "linear", learn_sigma: bool = True,
               num_timesteps: int = TRAIN_TIMESTEPS) -> Diffusion:
        """The training process, respaced to keep only the timesteps named by `respacing`."""
        alphas_cumprod = np.cumprod(1.0 - named_betas(schedule, num_timesteps))
        kept = space_timesteps(num_timesteps, respacing)
        kept_cumprod = alphas_cumprod[kept]
        previous = np.append(1.0, kept_cumprod[:-1])
        return cls(betas=1.0 - kept_cumprod / previous, timesteps=np.array(kept, dtype=np.int64),
                   learn_sigma=learn_sigma)

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def posterior_variance(self) -> np.ndarray:
        """Variance of q(x_{t-1} | x_t, x_0), Eq. 7 of DDPM."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        """log of the posterior variance, with the t=0 entry (which is 0) replaced by the t=1 entry.

        A one-step process has no t=1 entry (ADM leaves the table empty); its only step adds no noise, so log(beta)
        stands in to keep the table defined.
        """
        variance = self.posterior_variance
        return np.log(np.append(variance[1], variance[1:])) if len(variance) > 1 else np.log(self.betas)

    def draw_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training timesteps, uniform over the process's steps (Algorithm 1 of DDPM)."""
        return torch.randint(0, self.num_steps, (batch,), generator=generator)

    def model_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Respaced indices to the training-process timesteps the model was trained on.

        Fractional indices (from continuous-time solvers) pass through, which is only meaningful unrespaced.
        """
        if index.is_floating_point():
            return index
        return torch.as_tensor(self.timesteps, device=index.device)[index]

    def less_noisy(self, index: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
        """The step `amount` of the whole chain nearer the data than `index`, at least step 0."""
        return (index - torch.round(amount * self.num_steps).long()).clamp(min=0)

    def q_sample(self, x_start: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0), Eq. 4 of DDPM."""
        ac = self.alphas_cumprod
        return extract(np.sqrt(ac), index, x_start) * x_start + extract(np.sqrt(1.0 - ac), index, x_start) * noise

    def q_posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0), Eq. 7 of DDPM."""
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef1 = self.betas * np.sqrt(ac_prev) / (1.0 - ac)
        coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ac)
        return extract(coef1, index, x_t) * x_start + extract(coef2, index, x_t) * x_t

    def predict_xstart(self, x_t: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 from x_t and eps, inverting Eq. 4 of DDPM."""
        ac = self.alphas_cumprod
        return extract(np.sqrt(1.0 / ac), index, x_t) * x_t - extract(np.sqrt(1.0 / ac - 1), index, x_t) * eps

    def learned_log_variance(self, var_values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Learned-range log variance, Eq. 15 of IDDPM: v in [-1, 1] interpolates log beta_tilde and log beta."""
        min_log = extract(self.posterior_log_variance_clipped, index, var_values)
        max_log = extract(np.log(self.betas), index, var_values)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def split_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, variance values) of a raw model output: the one place the learned-sigma layout is read.

        A learned-sigma DiT outputs 2C channels, eps then IDDPM's variance values (ADM's convention); the variance
        values are None for a fixed-variance model.
        """
        if self.learn_sigma:
            eps, var_values = model_output.chunk(2, dim=1)  # 2 x (N, C, H, W)
            return eps, var_values
        return model_output, None

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor) -> dict:
        """Mean, variance and x_0 prediction of p(x_{t-1} | x_t) from one model output (no clipping)."""
        eps, var_values = self.split_output(model_output)
        if var_values is not None:
            log_variance = self.learned_log_variance(var_values, index)
        else:
            # DiT's fixed-variance models use the "fixed large" variance, with the t=0 entry taken from beta_tilde.
            fixed = np.append(self.posterior_variance[1], self.betas[1:])
            log_variance = extract(np.log(fixed), index, x_t)
        pred_xstart = self.predict_xstart(x_t, index, eps)
        mean = self.q_posterior_mean(pred_xstart, x_t, index)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": eps}

    def loss(self, net, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor,
             drop: torch.Tensor) -> dict:
        """One forward on x_t, scored against this process's target (ditcli.diffusion.process)."""
        return predict_and_score(self, net, x_start, t, noise, labels, drop)

    def training_losses(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                        index: torch.Tensor, noise: torch.Tensor) -> dict:
        """Per-sample loss terms of DiT: eps MSE, plus the variational bound (IDDPM's L_hybrid) with learned sigma."""
        eps, var_values = self.split_output(model_output)
        if var_values is None:
            mse = mean_flat((noise - eps) ** 2)
            return {"loss": mse, "mse": mse}
        frozen = torch.cat([eps.detach(), var_values], dim=1)  # the bound trains only the variance
        vb = self.vb_terms_bpd(frozen, x_start, x_t, index)
        mse = mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     index: torch.Tensor) -> torch.Tensor:
        """One term of the variational bound in bits per dimension: KL for t > 0, decoder NLL at t = 0."""
        true_mean = self.q_posterior_mean(x_start, x_t, index)
        true_log_variance = extract(self.posterior_log_variance_clipped, index, x_t)
        out = self.p_mean_variance(model_output, x_t, index)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(index == 0, nll, kl)


def extract(table: np.ndarray, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[index] as float32, shaped to broadcast against `like` (ADM's `_extract_into_tensor`)."""
    values = torch.from_numpy(table).to(index.device)[index].float()  # (N,)
    return values.view(-1, *([1] * (like.ndim - 1))).to(like.device)  # (N, 1, ..., 1)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log-likelihood of data in [-1, 1] discretised to 256 bins under a Gaussian (Sec. 3.3 of DDPM)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))
