"""The training objective as a stored choice: DDPM's discrete diffusion or linear-interpolant flow matching.

`build_objective` gives the one object (`Diffusion` or `FlowMatching`) whose `draw_times`, `q_sample`,
`training_losses`, `model_timesteps` and `split_output` training and sampling call; nothing else asks which it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.flow import TIME_DIRECTIONS, FlowMatching
from ditcli.errors import UserError

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


@dataclass(frozen=True)
class ObjectiveSpec:
    """What a file records about its objective: `ddpm`, or `flow` with its time direction.

    The tensors of a SiT or REPA checkpoint have DiT's layout, so this cannot be read from them: files we write record
    it, and a user names it (`--objective flow --time-direction ...`) for a file from elsewhere.
    """

    objective: str = "ddpm"
    time_direction: str | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}", f"choose from {', '.join(OBJECTIVES)}")
        if self.objective == "flow" and self.time_direction not in TIME_DIRECTIONS:
            raise UserError(f"a flow objective needs a time direction, got {self.time_direction!r}",
                            f"pass --time-direction {' or '.join(TIME_DIRECTIONS)}")
        if self.objective == "ddpm" and self.time_direction is not None:
            raise UserError("--time-direction only applies to --objective flow",
                            "add --objective flow, or drop --time-direction")

    @classmethod
    def from_options(cls, objective: str | None, time_direction: str | None) -> ObjectiveSpec | None:
        """What `--objective` and `--time-direction` say; None when neither is given. A flow objective without a
        direction takes SiT's, as `dit train --objective flow` does."""
        if objective is None and time_direction is None:
            return None
        if objective is None:
            objective = "flow"
        if objective == "flow" and time_direction is None:
            time_direction = DEFAULT_TIME_DIRECTION
        return cls(objective, time_direction)

    @classmethod
    def from_record(cls, objective: str | None, time_direction: str | None, path) -> ObjectiveSpec:
        """The record of a file; files from before the field are DDPM models."""
        try:
            return cls(objective or "ddpm", time_direction if objective == "flow" else None)
        except UserError as exc:
            raise UserError(f"{path} records an unusable objective: {exc}",
                            "convert the source checkpoint again") from None

    def build(self, learn_sigma: bool, schedule: str = "linear") -> Diffusion | FlowMatching:
        return build_objective(self.objective, learn_sigma=learn_sigma, schedule=schedule,
                               time_direction=self.time_direction)

    def describe(self) -> str:
        return "ddpm" if self.objective == "ddpm" else f"flow, time {self.time_direction}"

    def to_metadata(self) -> dict[str, str]:
        data = {"objective": self.objective}
        return data if self.time_direction is None else {**data, "time_direction": self.time_direction}


DDPM = ObjectiveSpec()
