"""The training objective as one adapter per kind: DDPM's discrete diffusion, linear-interpolant flow matching, and
mean flows (MeanFlow, Decoupled MeanFlow), which learn the average velocity over an interval and sample in 1-4 steps.

An `Objective` owns everything that depends on which objective trained a model: the process its loss and time draws
come from, the samplers that fit it and their plans, the sampling defaults of a file that records none and of a
`dit train` run, the preview sampler, what a file records, which exports can carry it, and the options that apply to
it alone. Training, sampling, conversion and fine-tuning call these methods; nothing outside this module asks which
objective it holds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import ClassVar, Protocol

from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.flow import TIME_DIRECTIONS, FlowMatching
from ditcli.diffusion.flow_map import sample_flow_map
from ditcli.diffusion.guidance import MAX_CFG
from ditcli.diffusion.meanflow import MeanFlow
from ditcli.diffusion.process import Process
from ditcli.diffusion.samplers import (
    FLOW_MAP,
    FLOW_SAMPLER_NAMES,
    SAMPLERS,
    FlowSettings,
    SamplerPlan,
    SamplingDefaults,
    plan_flow_sampler,
    plan_sampler,
)
from ditcli.errors import UserError, UserValueError

DEFAULT_TIME_DIRECTION = TIME_DIRECTIONS[0]  # what `dit train --objective flow` writes: SiT's


class Objective(Protocol):
    """What a model's objective decides, asked of it by training, sampling and conversion."""

    name: ClassVar[str]  # the `objective` a file records
    training_flags: ClassVar[tuple[str, ...]]  # the `dit train` options that belong to it alone or to a few
    samplers: ClassVar[tuple[str, ...]]  # `--sampler` names that fit it
    default_sampling: ClassVar[SamplingDefaults]  # a file that records no defaults samples with these
    trained_sampling: ClassVar[SamplingDefaults]  # what `dit train` records
    preview_sampler: ClassVar[str]  # the quick sampler of training previews
    exports: ClassVar[tuple[str, ...]]  # `dit convert --to` formats whose readers sample it correctly

    def describe(self) -> str: ...

    def noun(self) -> str: ...

    def schedule_text(self, schedule: str) -> str: ...

    def architecture(self, decoupled_depth: int | None) -> dict: ...

    def check_export(self, to: str, source) -> None: ...

    def check_source(self, source: Objective, name: str) -> str | None: ...

    def check_teacher(self, teacher: Objective, name: str) -> None: ...

    def guidance_warning(self, cfg: float) -> str | None: ...

    def to_metadata(self) -> dict[str, str]: ...

    def process(self, learn_sigma: bool, schedule: str = "linear", **settings) -> Process: ...

    def plan(self, name: str, steps: int, learn_sigma: bool, *, schedule: str = "linear", eta: float = 0.0,
             flow: FlowSettings = FlowSettings()) -> SamplerPlan: ...

    def sampler_settings(self, shift: float | None, atol: float | None, rtol: float | None) -> FlowSettings: ...

    def check_interval(self, interval: tuple[float, float] | None, context: str) -> None: ...

    def check_training(self, schedule: str, given: list[str]) -> None: ...

    def provenance(self, flow: FlowSettings) -> dict: ...


@dataclass(frozen=True)
class DdpmObjective:
    """DiT's objective: eps (and, with learned sigma, the variance) on a discrete beta schedule (DDPM, IDDPM)."""

    name: ClassVar[str] = "ddpm"
    training_flags: ClassVar[tuple[str, ...]] = ("--schedule",)
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

    def architecture(self, decoupled_depth: int | None) -> dict:
        """DiT as it is: one time input."""
        return {}

    def check_export(self, to: str, source) -> None:
        """Every output format carries a DDPM model."""

    def check_source(self, source: Objective, name: str) -> str | None:
        """Any source fine-tunes as DDPM, with a warning when it was trained otherwise."""
        return change_warning(source, self, name)

    def check_teacher(self, teacher: Objective, name: str) -> None:
        refuse_teacher(self, name)

    def guidance_warning(self, cfg: float) -> str | None:
        return None

    def to_metadata(self) -> dict[str, str]:
        return {"objective": self.name}

    def process(self, learn_sigma: bool, schedule: str = "linear", **settings) -> Diffusion:
        """The unrespaced training process on `schedule`'s betas."""
        return Diffusion.create("", schedule, learn_sigma)

    def plan(self, name: str, steps: int, learn_sigma: bool, *, schedule: str = "linear", eta: float = 0.0,
             flow: FlowSettings = FlowSettings()) -> SamplerPlan:
        if name in FLOW_SAMPLER_NAMES and name not in SAMPLERS:
            raise UserValueError(f"sampler {name!r} samples flow-matching models, and this is a DDPM model",
                                 f"choose from {', '.join(SAMPLERS)}")
        return plan_sampler(name, steps, learn_sigma, eta, schedule=schedule)

    def sampler_settings(self, shift: float | None, atol: float | None, rtol: float | None) -> FlowSettings:
        """A DDPM sampler takes none of a flow sampler's settings: given ones are refused, not ignored."""
        given = [flag for flag, value in (("--time-shift", shift), ("--atol", atol), ("--rtol", rtol))
                 if value is not None]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UserError(f"{' and '.join(given)} only {verb} to flow-matching and mean-flow models, and this is a "
                            "DDPM model", f"drop {' and '.join(given)}")
        return FlowSettings()

    def check_interval(self, interval: tuple[float, float] | None, context: str) -> None:
        """Any interval of training timesteps fits."""

    def check_training(self, schedule: str, given: list[str]) -> None:
        refuse_foreign_flags(self, given)

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
    training_flags: ClassVar[tuple[str, ...]] = ("--time-direction", "--time-sampling", "--time-shift")
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

    def architecture(self, decoupled_depth: int | None) -> dict:
        """SiT's network is DiT's."""
        return {}

    def check_export(self, to: str, source) -> None:
        if to not in self.exports:
            raise UserError(f"{source} is {self.noun()}, and a DiTPipeline folder would sample it as a DDPM eps model "
                            "(its scheduler and timesteps are DDPM's)",
                            "convert it to .safetensors, which records the objective")

    def check_source(self, source: Objective, name: str) -> str | None:
        """A flow source whose time runs the other way would be trained backwards; another objective is warned of."""
        check_direction(source, self, name)
        return change_warning(source, self, name)

    def check_teacher(self, teacher: Objective, name: str) -> None:
        refuse_teacher(self, name)

    def guidance_warning(self, cfg: float) -> str | None:
        return None

    def to_metadata(self) -> dict[str, str]:
        return {"objective": self.name, "time_direction": self.time_direction}

    def process(self, learn_sigma: bool, schedule: str = "linear", time_sampling: str = "uniform",
                time_shift: float = 1.0, **settings) -> FlowMatching:
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

    def check_training(self, schedule: str, given: list[str]) -> None:
        refuse_schedule(schedule)
        refuse_foreign_flags(self, given)

    def provenance(self, flow: FlowSettings) -> dict:
        return {"objective": self.to_metadata(), "flow_sampler": asdict(flow)}


@dataclass(frozen=True)
class MeanFlowObjective:
    """Mean-flow models (MeanFlow, Geng et al., 2025; Decoupled MeanFlow): the network predicts the average velocity
    u(z_t, r, t) over [r, t] on the linear path, and the flow map z_r = z_t - (t - r) u samples in 1-4 steps.

    `trained_cfg` is the guidance scale trained into the model (1: none), recorded so that runtime guidance, which
    hurts such a model, is warned of.
    """

    time_direction: str = DEFAULT_TIME_DIRECTION
    trained_cfg: float = 1.0

    name: ClassVar[str] = "meanflow"
    training_flags: ClassVar[tuple[str, ...]] = (
        "--time-direction", "--decoupled-depth", "--interval-ratio", "--mf-time-mean", "--mf-time-std",
        "--mf-r-time",        "--adaptive-p", "--adaptive-c", "--train-guidance", "--train-omega", "--train-kappa",
        "--train-guidance-interval", "--teacher")
    # The flow map; the flow samplers run its instantaneous velocity u(z_t, t, t).
    samplers: ClassVar[tuple[str, ...]] = (FLOW_MAP, *FLOW_SAMPLER_NAMES)
    # A released mean-flow file records no defaults: one step, no runtime guidance (MeanFlow's and DMF's 1-NFE setting).
    default_sampling: ClassVar[SamplingDefaults] = SamplingDefaults(FLOW_MAP, 1, 1.0)
    trained_sampling: ClassVar[SamplingDefaults] = SamplingDefaults(FLOW_MAP, 2, 1.0)
    preview_sampler: ClassVar[str] = FLOW_MAP
    exports: ClassVar[tuple[str, ...]] = ("safetensors",)  # DiTPipeline has no second time input

    def __post_init__(self):
        if self.time_direction not in TIME_DIRECTIONS:
            raise UserError(f"a mean-flow objective needs a time direction, got {self.time_direction!r}",
                            f"pass --time-direction {' or '.join(TIME_DIRECTIONS)}")
        if not (math.isfinite(self.trained_cfg) and 0 <= self.trained_cfg <= MAX_CFG):
            raise UserError(f"the trained guidance scale must be a finite number in [0, {MAX_CFG:g}] as --cfg, got "
                            f"{self.trained_cfg:g}")

    def describe(self) -> str:
        guided = f", guidance {self.trained_cfg:g} trained in" if self.trained_cfg != 1 else ""
        return f"meanflow, time {self.time_direction}{guided}"

    def noun(self) -> str:
        return f"a mean-flow model ({self.describe()})"

    def schedule_text(self, schedule: str) -> str:
        return "none (a mean-flow model)"

    def architecture(self, decoupled_depth: int | None) -> dict:
        """DMF's decoupled blocks when a depth is given, MeanFlow's separate embedder of t - r otherwise."""
        if decoupled_depth is None:
            return {"mean_flow_form": "separate"}
        return {"mean_flow_form": "decoupled", "decoupled_depth": decoupled_depth}

    def check_export(self, to: str, source) -> None:
        if to not in self.exports:
            raise UserError(f"{source} is {self.noun()}, and a DiTPipeline folder has no second time input for it",
                            "convert it to .safetensors, which records the objective")

    def check_source(self, source: Objective, name: str) -> str | None:
        """The cheap route of DMF: a flow model of the same time direction, fine-tuned; a DDPM model is refused."""
        if isinstance(source, DdpmObjective):
            raise UserError(f"--init-from {name} is a DDPM model; a mean-flow model starts from a flow model",
                            "fine-tune a flow-matching checkpoint (ours, SiT or REPA), or train without --init-from")
        check_direction(source, self, name)
        return None

    def check_teacher(self, teacher: Objective, name: str) -> None:
        """`--teacher`: its velocity is the target, so it must be a flow model running this run's time."""
        if teacher != FlowObjective(self.time_direction):
            raise UserError(f"--teacher {name} is {teacher.noun()}, not a flow model of time {self.time_direction}",
                            "pass the flow model the run starts from (its --init-from), or one trained like it")

    def guidance_warning(self, cfg: float) -> str | None:
        """Runtime guidance on a model with guidance trained in extrapolates twice (MeanFlow issue #45)."""
        if cfg == 1 or self.trained_cfg == 1:
            return None
        return (f"this model has guidance {self.trained_cfg:g} trained in; --cfg {cfg:g} guides it again and usually "
                "hurts: pass --cfg 1")

    def to_metadata(self) -> dict[str, str]:
        data = {"objective": self.name, "time_direction": self.time_direction}
        return data if self.trained_cfg == 1 else {**data, "trained_cfg": repr(float(self.trained_cfg))}

    def process(self, learn_sigma: bool, schedule: str = "linear", **settings) -> MeanFlow:
        """The mean-flow process on this direction's path, with the run's time draws, weight and guidance."""
        named = {"time_mean": "mf_time_mean", "time_std": "mf_time_std", "r_time": "mf_r_time",
                 "interval_ratio": "interval_ratio",
                 "adaptive_p": "adaptive_p", "adaptive_c": "adaptive_c", "guidance": "guidance"}
        given = {field: settings[option] for field, option in named.items() if option in settings}
        return MeanFlow(FlowMatching(self.time_direction, learn_sigma), **given)

    def plan(self, name: str, steps: int, learn_sigma: bool, *, schedule: str = "linear", eta: float = 0.0,
             flow: FlowSettings = FlowSettings()) -> SamplerPlan:
        path = FlowMatching(self.time_direction, learn_sigma)
        if name not in self.samplers:
            raise UserValueError(f"sampler {name!r} cannot sample a mean-flow model", "choose from "
                                 f"{', '.join(self.samplers)}: the flow map, or a flow sampler on its instant velocity")
        if name != FLOW_MAP:
            return plan_flow_sampler(name, steps, path, flow)
        if steps < 1:
            raise UserValueError(f"steps must be >= 1, got {steps}")
        return SamplerPlan(name, steps, path, partial(sample_flow_map, steps=steps, shift=flow.shift), steps)

    def sampler_settings(self, shift: float | None, atol: float | None, rtol: float | None) -> FlowSettings:
        return FlowObjective.sampler_settings(self, shift, atol, rtol)

    def check_interval(self, interval: tuple[float, float] | None, context: str) -> None:
        FlowObjective.check_interval(self, interval, context)

    def check_training(self, schedule: str, given: list[str]) -> None:
        refuse_schedule(schedule)
        refuse_foreign_flags(self, given)

    def provenance(self, flow: FlowSettings) -> dict:
        return {"objective": self.to_metadata(), "flow_sampler": asdict(flow)}


OBJECTIVES: dict[str, type] = {"ddpm": DdpmObjective, "flow": FlowObjective, "meanflow": MeanFlowObjective}
DDPM = DdpmObjective()


def refuse_teacher(objective: Objective, name: str) -> None:
    """Only a mean-flow run regresses onto a teacher's velocity."""
    raise UserError(f"--teacher {name}: a {objective.name} run trains on its data alone", "drop --teacher, or pass "
                    "--objective meanflow --train-guidance distill")


def make_objective(name: str, time_direction: str | None = None, **record) -> Objective:
    """The adapter of objective `name`; flow and mean-flow objectives need their time direction, DDPM takes none.
    `record` holds what else a file records (a mean-flow model's trained guidance)."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}", f"choose from {', '.join(OBJECTIVES)}")
    kind = OBJECTIVES[name]
    if "--time-direction" in kind.training_flags:
        return kind(time_direction, **record)
    if time_direction is not None:
        owners = " or ".join(owners_of("--time-direction"))
        raise UserError(f"--time-direction only applies to --objective {owners}",
                        f"add --objective {FlowObjective.name}, or drop --time-direction")
    return kind(**record)


def objective_from_options(objective: str | None, time_direction: str | None) -> Objective | None:
    """What `--objective` and `--time-direction` say; None when neither is given. A time direction alone means a flow
    objective, and a flow objective without one takes SiT's, as `dit train --objective flow` does."""
    if objective is None and time_direction is None:
        return None
    if objective is None:
        objective = FlowObjective.name
    if time_direction is None and "--time-direction" in OBJECTIVES.get(objective, DdpmObjective).training_flags:
        time_direction = DEFAULT_TIME_DIRECTION
    return make_objective(objective, time_direction)


def objective_from_record(objective: str | None, time_direction: str | None = None, path="the file",
                          trained_cfg: str | float | None = None) -> Objective:
    """The record of a file; files from before the field are DDPM models. A direction recorded beside an objective
    that takes none (a DDPM run's unused --time-direction) is ignored. A name that is no string, or a trained scale
    that is no number, is one line naming the file and the field."""
    kind = OBJECTIVES.get(objective or DdpmObjective.name) if isinstance(objective, (str, type(None))) else None
    takes_direction = kind is not None and "--time-direction" in kind.training_flags
    for name, value, known in (("objective", objective, OBJECTIVES),
                               ("time_direction", time_direction if takes_direction else None, TIME_DIRECTIONS)):
        if value is not None and not (isinstance(value, str) and value in known):
            shown = f"{value[:40]!r}" if isinstance(value, str) else f"a {type(value).__name__}"
            raise UserError(f"{path} records an unusable objective: its {name} {shown} is not one of "
                            f"{', '.join(known)}",
                            "convert the source checkpoint again")
    record = {} if trained_cfg is None else {"trained_cfg": _number(trained_cfg, path)}
    if record and "trained_cfg" not in kind.__dataclass_fields__:
        raise UserError(f"{path} records a trained guidance scale (trained_cfg) for a {kind.name} model, which has "
                        "none", "convert the source checkpoint again")
    try:
        return make_objective(objective or DdpmObjective.name, time_direction if takes_direction else None, **record)
    except UserError as exc:
        raise UserError(f"{path} records an unusable objective: {exc}",
                        "convert the source checkpoint again") from None


def _number(value: str | float, path) -> float:
    """A recorded trained guidance scale: a number, or the text of one (safetensors metadata holds text)."""
    try:
        if isinstance(value, bool):
            raise TypeError("a boolean is no scale")
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path} records an unusable trained guidance scale (trained_cfg) {str(value)[:40]!r}",
                        "convert the source checkpoint again") from None


def owners_of(flag: str) -> list[str]:
    """The objectives a `dit train` flag belongs to."""
    return [name for name, kind in OBJECTIVES.items() if flag in kind.training_flags]


def refuse_foreign_flags(objective: Objective, given: list[str]) -> None:
    """Options of other objectives are refused, not silently ignored."""
    foreign = [flag for flag in given if flag not in objective.training_flags]
    if foreign:
        owners = [name for name in OBJECTIVES if all(name in owners_of(flag) for flag in foreign)] or owners_of(
            foreign[0])
        verb = "applies" if len(foreign) == 1 else "apply"
        raise UserError(f"{', '.join(foreign)} only {verb} to --objective {' or '.join(owners)}",
                        f"add --objective {owners[0]}")


def refuse_schedule(schedule: str) -> None:
    if schedule != "linear":
        raise UserError("--schedule (the beta schedule) only applies to --objective ddpm",
                        "drop --schedule, or train with --objective ddpm")


def check_direction(source: Objective, target: Objective, name: str) -> None:
    """A source whose time runs the other way would be trained backwards."""
    direction = getattr(source, "time_direction", None)
    if direction is not None and direction != target.time_direction:
        raise UserError(f"--init-from {name} is a {source.name} model with time {direction}, this run's time is "
                        f"{target.time_direction}",
                        f"pass --time-direction {direction}")


def change_warning(source: Objective, target: Objective, name: str) -> str | None:
    """The warning for a source trained as another objective: it starts far from its optimum."""
    if source == target:
        return None
    return (f"warning: --init-from {name} was trained as {source.describe()}; this run trains it as "
            f"{target.describe()}, so it starts far from its source's optimum; pass --objective "
            f"{source.name} to fine-tune it as it was trained")
