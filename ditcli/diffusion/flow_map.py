"""The sampler of a mean-flow model (a flow map), on the contract of `ditcli.diffusion.flow_samplers`.

A mean-flow model u(z_t, r, t) predicts the average velocity over [r, t], so one evaluation jumps the whole step:
z_r = z_t - (t - r) u (MeanFlow, Geng et al., 2025). `model_fn(x, t, r=r)` receives the step's end time as
the keyword `r`; guidance, decided at the step's start t, lives in the `model_fn` adapters
(`ditcli.diffusion.guidance`), as for every sampler.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.flow_samplers import Callback, ModelFn, times_like


def flow_map_step(x: torch.Tensor, u: torch.Tensor, t: float, r: float) -> torch.Tensor:
    """z_r = z_t - (t - r) u(z_t, r, t): the flow map from the average velocity (MeanFlow's sampling rule, Alg. 2)."""
    return x - (t - r) * u


@torch.no_grad()
def sample_flow_map(model_fn: ModelFn, x: torch.Tensor, flow: FlowMatching, noise_fn=None, callback: Callback = None,
                    steps: int = 1, shift: float = 1.0) -> torch.Tensor:
    """Few-step sampling of a mean-flow model: one evaluation per step of `flow.time_grid` (steps = NFE).

    MeanFlow's Alg. 2 (the PyTorch port's `meanflow_sampler`) and Decoupled MeanFlow's `euler_sampler`, whose
    `shift` is SD3's shift of the noise level, as `flow.time_grid` applies it. Deterministic: `noise_fn` is never
    drawn from. The state stays float32 (DMF keeps it in float64; the two differ by about 3e-7 here).
    """
    grid = flow.time_grid(steps, shift)
    for step, (t, r) in enumerate(pairwise(grid)):
        u = flow.split_output(model_fn(x, times_like(x, t), r=times_like(x, r)))[0].float()
        x = flow_map_step(x, u, t, r)
        if callback is not None:
            callback(step, steps, x)
    return x
