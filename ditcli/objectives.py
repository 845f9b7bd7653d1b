"""The training objective as a stored choice: DDPM's discrete diffusion or linear-interpolant flow matching.

`build_objective` gives the one object (`Diffusion` or `FlowMatching`) whose `draw_times`, `q_sample`,
`training_losses`, `model_timesteps` and `split_output` training and sampling call; nothing else asks which it is.
"""

from __future__ import annotations

from ditcli.diffusion import Diffusion
from ditcli.flow import TIME_DIRECTIONS, FlowMatching

OBJECTIVES = ("ddpm", "flow")
DEFAULT_TIME_DIRECTION = TIME_DIRECTIONS[0]  # what `dit train --objective flow` writes: SiT's


def build_objective(objective: str = "ddpm", *, learn_sigma: bool = True, schedule: str = "linear",
                    time_direction: str | None = None, time_sampling: str = "uniform",
                    time_shift: float = 1.0) -> Diffusion | FlowMatching:
    """The unrespaced training process of `objective`."""
    if objective == "ddpm":
        return Diffusion.create("", schedule, learn_sigma)
    if objective == "flow":
        return FlowMatching(time_direction or DEFAULT_TIME_DIRECTION, learn_sigma, time_sampling, time_shift)
    raise ValueError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
