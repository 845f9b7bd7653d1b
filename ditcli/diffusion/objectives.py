"""The training objective as one adapter per kind: DDPM's discrete diffusion and linear-interpolant flow matching.

An `Objective` owns everything that depends on which objective trained a model: the process its loss and time draws
come from, the samplers that fit it and their plans, the sampling defaults of a file that records none and of a
`dit train` run, the preview sampler, what a file records, which exports can carry it, and the options that apply to
it alone. Training, sampling, conversion and fine-tuning call these methods; nothing outside this module asks which
objective it holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Protocol

from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.flow import TIME_DIRECTIONS, FlowMatching
from ditcli.diffusion.process import Process
from ditcli.diffusion.samplers import (
    FLOW_SAMPLER_NAMES,
    SAMPLERS,
    FlowSettings,
    SamplerPlan,
    SamplingDefaults,
    plan_flow_sampler,
    plan_sampler,
)
from ditcli.errors import UserError

DEFAULT_TIME_DIRECTION = TIME_DIRECTIONS[0]  # what `dit train --objective flow` writes: SiT's


class Objective(Protocol):
    """What a model's objective decides, asked of it by training, sampling and conversion."""

    name: ClassVar[str]  # the `objective` a file records
    samplers: ClassVar[tuple[str, ...]]  # `--sampler` names that fit it
    default_sampling: ClassVar[SamplingDefaults]  # a file that records no defaults samples with these
    trained_sampling: ClassVar[SamplingDefaults]  # what `dit train` records
    preview_sampler: ClassVar[str]  # the quick sampler of training previews
    exports: ClassVar[tuple[str, ...]]  # `dit convert --to` formats whose readers sample it correctly

    def describe(self) -> str: ...

    def noun(self) -> str: ...

    def schedule_text(self, schedule: str) -> str: ...

    def check_export(self, to: str, source) -> None: ...

    def check_source(self, source: Objective, name: str) -> None: ...

    def to_metadata(self) -> dict[str, str]: ...

    def process(self, learn_sigma: bool, schedule: str = "linear", time_sampling: str = "uniform",
                time_shift: float = 1.0) -> Process: ...

    def plan(self, name: str, steps: int, learn_sigma: bool, *, schedule: str = "linear", eta: float = 0.0,
             flow: FlowSettings = FlowSettings()) -> SamplerPlan: ...

    def sampler_settings(self, shift: float | None, atol: float | None, rtol: float | None) -> FlowSettings: ...

    def check_interval(self, interval: tuple[float, float] | None, context: str) -> None: ...

    def check_training(self, schedule: str, flow_options: list[str]) -> None: ...

    def provenance(self, flow: FlowSettings) -> dict: ...


@dataclass(frozen=True)
class DdpmObjective:
    """DiT's objective: eps (and, with learned sigma, the variance) on a discrete beta schedule (DDPM, IDDPM)."""

    name: ClassVar[str] = "ddpm"
    samplers: ClassVar[tuple[str, ...]] = SAMPLERS
    # DiT's published evaluation settings (DDPM, 250 steps, guidance 4): for a released .pt, which names none.
    default_sampling: ClassVar[SamplingDefaults] = SamplingDefaults()
    # The embedded Fashion-MNIST run measured DPM-Solver++(2M) at 25 steps as good as DDPM-250 at a tenth of the
    # model evaluations (docs/fashion-mnist.md); cfg 4 gave its lowest Frechet distance.
    trained_sampling: ClassVar[SamplingDefaults] = SamplingDefaults("dpm++2m", 25, 4.0)
    preview_sampler: ClassVar[str] = "ddim"
    exports: ClassVar[tuple[str, ...]] = ("safetensors", "diffusers")

    def describe(self) -> str:
        return "ddpm"

    def noun(self) -> str:
        return "a DDPM model"

    def schedule_text(self, schedule: str) -> str:
        return schedule

    def check_export(self, to: str, source) -> None:
        """Every output format carries a DDPM model."""

    def check_source(self, source: Objective, name: str) -> None:
        """Any DDPM source fine-tunes as DDPM."""

    def to_metadata(self) -> dict[str, str]:
        return {"objective": self.name}

    def process(self, learn_sigma: bool, schedule: str = "linear", time_sampling: str = "uniform",
                time_shift: float = 1.0) -> Diffusion:
        """The unrespaced training process on `schedule`'s betas."""
        return Diffusion.create("", schedule, learn_sigma)

    def plan(self, name: str, steps: int, learn_sigma: bool, *, schedule: str = "linear", eta: float = 0.0,
             flow: FlowSettings = FlowSettings()) -> SamplerPlan:
        if name in FLOW_SAMPLER_NAMES and name not in SAMPLERS:
            raise ValueError(f"sampler {name!r} samples flow-matching models, and this is a DDPM model "
                             f"(choose from {', '.join(SAMPLERS)})")
        return plan_sampler(name, steps, learn_sigma, eta, schedule=schedule)

    def sampler_settings(self, shift: float | None, atol: float | None, rtol: float | None) -> FlowSettings:
        """A DDPM sampler takes none of a flow sampler's settings: given ones are refused, not ignored."""
        given = [flag for flag, value in (("--time-shift", shift), ("--atol", atol), ("--rtol", rtol))
                 if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} only apply to flow-matching models, and this is a DDPM model",
                            f"drop {', '.join(given)}")
        return FlowSettings()

    def check_interval(self, interval: tuple[float, float] | None, context: str) -> None:
        """Any interval of training timesteps fits."""

    def check_training(self, schedule: str, flow_options: list[str]) -> None:
        if flow_options:
            verb = "applies" if len(flow_options) == 1 else "apply"
            raise UserError(f"{', '.join(flow_options)} only {verb} to --objective flow", "add --objective flow")

    def provenance(self, flow: FlowSettings) -> dict:
        return {"objective": self.to_metadata()}


@dataclass(frozen=True)
class FlowObjective:
    """Flow matching on the linear interpolant (SiT, REPA), in one of its two time directions.

    The tensors of a SiT or REPA checkpoint have DiT's layout, so the direction cannot be read from them: files we
    write record it, and a user names it (`--objective flow --time-direction ...`) for a file from elsewhere.
    """

    time_direction: str = DEFAULT_TIME_DIRECTION

    name: ClassVar[str] = "flow"
    samplers: ClassVar[tuple[str, ...]] = FLOW_SAMPLER_NAMES
    # A flow model that records no defaults (a SiT or REPA file): SiT's default ODE solver, dopri5 at atol 1e-6,
    # rtol 1e-3 (its steps do not apply), cfg 4 as SiT's sample.py.
    default_sampling: ClassVar[SamplingDefaults] = SamplingDefaults("dopri5", 50, 4.0)
    # What `dit train --objective flow` records: Heun at 25 steps (50 evaluations per image), not yet tuned on a
    # trained flow model (docs/flow.md).
    trained_sampling: ClassVar[SamplingDefaults] = SamplingDefaults("heun", 25, 4.0)
    preview_sampler: ClassVar[str] = "euler"
    exports: ClassVar[tuple[str, ...]] = ("safetensors",)  # a DiTPipeline would sample it as a DDPM eps model

    def __post_init__(self):
        if self.time_direction not in TIME_DIRECTIONS:
            raise UserError(f"a flow objective needs a time direction, got {self.time_direction!r}",
                            f"pass --time-direction {' or '.join(TIME_DIRECTIONS)}")

    def describe(self) -> str:
        return f"flow, time {self.time_direction}"

    def noun(self) -> str:
        return f"a flow-matching model ({self.describe()})"

    def schedule_text(self, schedule: str) -> str:
        return "none (a flow model)"  # the flow has no betas

    def check_export(self, to: str, source) -> None:
        if to not in self.exports:
            raise UserError(f"{source} is {self.noun()}, and a DiTPipeline folder would sample it as a DDPM eps model "
                            "(its scheduler and timesteps are DDPM's)",
                            "convert it to .safetensors, which records the objective")

    def check_source(self, source: Objective, name: str) -> None:
        """A flow source whose time runs the other way would be trained backwards."""
        if isinstance(source, FlowObjective) and source != self:
            raise UserError(f"--init-from {name} is a flow model with time {source.time_direction}, this run's time "
                            f"is {self.time_direction}", f"pass --time-direction {source.time_direction}")

    def to_metadata(self) -> dict[str, str]:
        return {"objective": self.name, "time_direction": self.time_direction}

    def process(self, learn_sigma: bool, schedule: str = "linear", time_sampling: str = "uniform",
                time_shift: float = 1.0) -> FlowMatching:
        """The flow in this direction; the beta schedule does not apply."""
        return FlowMatching(self.time_direction, learn_sigma, time_sampling, time_shift)

    def plan(self, name: str, steps: int, learn_sigma: bool, *, schedule: str = "linear", eta: float = 0.0,
             flow: FlowSettings = FlowSettings()) -> SamplerPlan:
        return plan_flow_sampler(name, steps, self.process(learn_sigma), flow)

    def sampler_settings(self, shift: float | None, atol: float | None, rtol: float | None) -> FlowSettings:
        """--time-shift, --atol and --rtol over SiT's defaults."""
        base = FlowSettings()
        return FlowSettings(*(default if value is None else value
                              for value, default in ((shift, base.shift), (atol, base.atol), (rtol, base.rtol))))

    def check_interval(self, interval: tuple[float, float] | None, context: str) -> None:
        """A flow model's guidance interval is in flow time, [0, 1]; training timesteps such as 0,700 would guide
        every step. `context` ends the message: where the model comes from."""
        if interval is not None and interval[1] > 1:
            low, high = interval
            raise UserError(f"--guidance-interval {low:g},{high:g} is not in flow time [0, 1]{context}",
                            "pass LOW,HIGH in [0, 1], e.g. 0,0.7 as REPA (on its data-to-noise time)")

    def check_training(self, schedule: str, flow_options: list[str]) -> None:
        if schedule != "linear":
            raise UserError("--schedule (the beta schedule) only applies to --objective ddpm",
                            "drop --schedule, or train with --objective ddpm")

    def provenance(self, flow: FlowSettings) -> dict:
        return {"objective": self.to_metadata(), "flow_sampler": asdict(flow)}


OBJECTIVES: dict[str, type] = {"ddpm": DdpmObjective, "flow": FlowObjective}
DDPM = DdpmObjective()


def make_objective(name: str, time_direction: str | None = None) -> Objective:
    """The adapter of objective `name`; a flow objective needs its time direction, DDPM takes none."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}", f"choose from {', '.join(OBJECTIVES)}")
    if name == FlowObjective.name:
        return FlowObjective(time_direction)
    if time_direction is not None:
        raise UserError(f"--time-direction only applies to --objective {FlowObjective.name}",
                        f"add --objective {FlowObjective.name}, or drop --time-direction")
    return OBJECTIVES[name]()


def objective_from_options(objective: str | None, time_direction: str | None) -> Objective | None:
    """What `--objective` and `--time-direction` say; None when neither is given. A time direction alone means a flow
    objective, and a flow objective without one takes SiT's, as `dit train --objective flow` does."""
    if objective is None and time_direction is None:
        return None
    if objective is None:
        objective = FlowObjective.name
    if objective == FlowObjective.name and time_direction is None:
        time_direction = DEFAULT_TIME_DIRECTION
    return make_objective(objective, time_direction)


def objective_from_record(objective: str | None, time_direction: str | None = None, path="the file") -> Objective:
    """The record of a file; files from before the field are DDPM models."""
    try:
        return make_objective(objective or DdpmObjective.name,
                              time_direction if objective == FlowObjective.name else None)
    except UserError as exc:
        raise UserError(f"{path} records an unusable objective: {exc}",
                        "convert the source checkpoint again") from None

