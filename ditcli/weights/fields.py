"""A weight file's records, field by field, each checked like the command-line option it stands for: the one
validation that every reader shares (ditcli.weights.checkpoint for our files, training checkpoints and the
reference's; ditcli.weights.diffusers_format for DiTPipeline folders).

A record is what a file says beside its tensors: the model config, the sampling defaults, the EMA record, the
objective, the beta schedule, the codec, the class names, which weights it holds and its step. Each field is read with
its type (an int is an int, not a bool, a float or the string "2"; an object is a JSON object, not a list) and within
the limits the command line sets for the same value, taken from their one owner: `MAX_STEPS` and `MAX_CFG` of `dit
sample`, the model sizes of `dit train`. A value the command line refuses is refused in a file too, as one line
naming the file and the field, before anything is built from it.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from functools import cache

from ditcli.diffusion.ddpm import BETA_SCHEDULES
from ditcli.diffusion.guidance import GUIDED_CHANNELS, MAX_CFG
from ditcli.diffusion.objectives import Objective, objective_from_record
from ditcli.diffusion.samplers import (
    FLOW_MAP,
    FLOW_SAMPLER_NAMES,
    MAX_STEPS,
    SAMPLERS,
    SamplingDefaults,
)
from ditcli.errors import UserError, UserValueError
from ditcli.model.dit import (
    MAX_DEPTH,
    MAX_HIDDEN_SIZE,
    MAX_IMAGE_SIZE,
    MEAN_FLOW_FORMS,
    TIMESTEP_CONVENTIONS,
    DiTConfig,
)
from ditcli.weights.ema import EmaRecord

WEIGHT_CHOICES = ("ema", "model")  # the weights a file holds: the EMA, or the raw model's
CODEC_KINDS = ("pixel", "vae")
MAX_CLASSES = 1 << 20  # rows of a label table (ImageNet-21k has 21,841): a count no file may exceed
MAX_MLP_RATIO = 64.0  # the MLP's width over the model's (DiT: 4)
MAX_COUNT = 2**63 - 1  # a step or an update count: what a 64-bit counter holds
HINT = "fix or drop that field of the file, or write the file again from its source"
JSON_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (dict, "a JSON object"),
              (list, "a JSON list"), (type(None), "null"))


@dataclass(frozen=True)
class Field:
    """One field of a record: its type, its range (`open` names an excluded end), its choices, and whether it may be
    left out or be null."""

    kind: type
    low: float | None = None
    high: float | None = None
    open: str = ""  # "low" or "high": that end of [low, high] is excluded
    choices: tuple = ()
    required: bool = True
    nullable: bool = False

    def problem(self, value) -> str | None:
        """What is wrong with `value`, as the end of a sentence; None when nothing is."""
        if value is None:
            return None if self.nullable else f"null where {type_name(self.kind)} belongs"
        if not is_kind(value, self.kind):
            return f"{type_name(type(value))} where {type_name(self.kind)} belongs"
        if self.kind is float and not math.isfinite(value):
            return "not a finite number"
        if self.choices and value not in self.choices:
            return f"not one of {', '.join(map(str, self.choices))}"
        if not self.within(value):
            return f"outside {self.range_text()}"
        return None

    def within(self, value) -> bool:
        above = self.low is None or value > self.low or (value == self.low and self.open != "low")
        below = self.high is None or value < self.high or (value == self.high and self.open != "high")
        return above and below

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:,}"
        high = "inf" if self.high is None else f"{self.high:,}"
        return f"{'(' if self.open == 'low' else '['}{low}, {high}{')' if self.open == 'high' else ']'}"


def is_kind(value, kind: type) -> bool:
    """JSON's types as Python reads them: a bool is no number, an int is a number."""
    if kind is object:
        return True
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def type_name(kind: type) -> str:
    return next((name for known, name in JSON_TYPES if issubclass(kind, known)), f"a {kind.__name__}")


def shown(value) -> str:
    """A field's value as the error quotes it: short, and never the whole of a long string or list."""
    if isinstance(value, (dict, list, tuple)):
        return f"{type_name(type(value))} of {len(value)}"
    text = json.dumps(value) if isinstance(value, (bool, int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def refuse(path, what: str, why: str, hint: str = HINT) -> UserError:
    """"<path> records an unusable <what>: <why>", one line."""
    return UserError(f"{path} records an unusable {what}: {why}", hint)


def read_value(value, field: Field, path, what: str, key: str | None = None):
    """`value` once `field` accepts it (a number as a float where a float belongs), else one line naming the file,
    the record `what` and its field `key` (or `what` alone, a field of its own)."""
    problem = field.problem(value)
    if problem is not None:
        raise refuse(path, what, f"{'' if key is None else f'its {key} '}{shown(value)} is {problem}")
    return float(value) if field.kind is float and value is not None else value


def read_fields(data, spec: dict[str, Field], path, what: str, strict: bool = True) -> dict:
    """The fields of object `data` that `spec` names, each read by `read_value`; with `strict`, a field it does not
    name is refused (a misspelt field would otherwise be silently ignored)."""
    data = as_object(data, path, what)
    unknown = sorted(str(key) for key in data if key not in spec)
    if strict and unknown:
        raise refuse(path, what, f"it has an unknown field {unknown[0]!r}")
    values = {}
    for key, field in spec.items():
        if key in data:
            values[key] = read_value(data[key], field, path, what, key)
        elif field.required:
            raise refuse(path, what, f"it has no field {key!r}")
    return values


def parse_json(text: str, path, what: str):
    """A JSON text of a file's metadata; malformed JSON is one line naming the field."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise refuse(path, what, f"it is no readable JSON ({' '.join(str(exc).split())[:80]})") from None


def as_object(value, path, what: str) -> dict:
    """`value` (or the JSON text it is) as a dict; anything else is refused."""
    data = parse_json(value, path, what) if isinstance(value, str) else value
    if not isinstance(data, dict):
        raise refuse(path, what, f"{shown(data)} where a JSON object belongs")
    return data


def read_object(value, path, what: str) -> dict | None:
    """An optional object (JSON text in safetensors metadata, a dict in a .pt); None or null is None."""
    if value is None or (isinstance(value, str) and value.strip() == "null"):
        return None
    return as_object(value, path, what)


# The model config.

# Limits of DiTConfig's fields beyond their declared types: `dit train`'s size limits, and ranges that keep the
# model buildable (a finite, bounded MLP ratio; a dropout probability below 1; a LayerNorm eps in (0, 1]). The heads
# are required: no tensor's shape tells them, and a default would silently sample another model.
CONFIG_LIMITS = {
    "input_size": {"low": 1, "high": MAX_IMAGE_SIZE}, "patch_size": {"low": 1, "high": MAX_IMAGE_SIZE},
    "in_channels": {"low": 1, "high": MAX_HIDDEN_SIZE}, "hidden_size": {"low": 4, "high": MAX_HIDDEN_SIZE},
    "depth": {"low": 1, "high": MAX_DEPTH}, "num_heads": {"low": 1, "high": MAX_HIDDEN_SIZE, "required": True},
    "num_classes": {"low": 0, "high": MAX_CLASSES}, "decoupled_depth": {"low": 1, "high": MAX_DEPTH},
    "mlp_ratio": {"low": 0, "high": MAX_MLP_RATIO, "open": "low"},
    "class_dropout_prob": {"low": 0, "high": 1, "open": "high"}, "norm_eps": {"low": 0, "high": 1, "open": "low"},
    "timestep_convention": {"choices": tuple(TIMESTEP_CONVENTIONS)}, "mean_flow_form": {"choices": MEAN_FLOW_FORMS},
}


def dataclass_spec(cls: type, limits: dict[str, dict]) -> dict[str, Field]:
    """The fields of dataclass `cls` with the types it declares (Optional ones may be null; a container any value,
    for its own check), within `limits`; a field may be left out, as files from before it were written without it,
    unless `limits` require it."""
    spec = {}
    for name, hint in typing.get_type_hints(cls).items():
        kinds = [kind for kind in typing.get_args(hint) or (hint,) if kind is not type(None)]
        kind = kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, bool, str) else object
        nullable = len(kinds) < len(typing.get_args(hint) or (hint,))
        spec[name] = Field(kind, **{"required": False, "nullable": nullable, **limits.get(name, {})})
    return spec


@cache
def config_spec() -> dict[str, Field]:
    """DiTConfig's fields, within `CONFIG_LIMITS`."""
    return dataclass_spec(DiTConfig, CONFIG_LIMITS)


def read_config(data, path, what: str = "model config") -> DiTConfig:
    """A file's model config: each field typed and in range, then DiTConfig's own checks (heads divide the width, the
    patch the input, a decoupled depth within the depth), each one line naming the file."""
    values = read_fields(data, config_spec(), path, what)
    try:
        return DiTConfig(**values)
    except UserValueError as exc:
        raise refuse(path, what, exc.what) from None


# The sampling defaults, the EMA record and the rest.

SAMPLER_NAMES = tuple(dict.fromkeys((*SAMPLERS, *FLOW_SAMPLER_NAMES, FLOW_MAP)))
SAMPLING_FIELDS = {"sampler": Field(str, choices=SAMPLER_NAMES), "steps": Field(int, 1, MAX_STEPS),
                   "cfg": Field(float, 0, MAX_CFG), "interval": Field(list, required=False, nullable=True),
                   "channels": Field(str, choices=GUIDED_CHANNELS, required=False, nullable=True)}
INTERVAL_END = Field(float, 0)
EMA_FIELDS = {"decay": Field(float, 0, 1, open="high"), "warmup": Field(bool), "steps": Field(int, 0, MAX_COUNT),
              "from_source": Field(bool, required=False)}
CODEC_KIND = Field(str, choices=CODEC_KINDS)
CODEC_FIELDS = {"pixel": {"kind": CODEC_KIND, "channels": Field(int, 1, MAX_HIDDEN_SIZE, required=False)},
                "vae": {"kind": CODEC_KIND, "vae": Field(str), "scale": Field(float, 0, open="low", required=False)}}
STEP = Field(int, 0, MAX_COUNT)


def read_sampling(value, path, what: str = "sampling record") -> SamplingDefaults | None:
    """Recorded sampling defaults, within `dit sample`'s own limits (1 to MAX_STEPS steps, cfg in [0, MAX_CFG]), or
    None."""
    data = read_object(value, path, what)
    if not data:
        return None
    values = read_fields(data, SAMPLING_FIELDS, path, what)
    interval = read_interval(values.get("interval"), path, what)
    return SamplingDefaults(values["sampler"], values["steps"], values["cfg"], interval, values.get("channels"))


def read_interval(value: list | None, path, what: str) -> tuple[float, float] | None:
    """A guidance interval [low, high] with 0 <= low <= high, as --guidance-interval takes it."""
    if value is None:
        return None
    if len(value) != 2:
        raise refuse(path, what, f"its interval {shown(value)} is no [low, high]")
    low, high = (read_value(end, INTERVAL_END, path, what, "interval") for end in value)
    if low > high:
        raise refuse(path, what, f"its interval [{low:g}, {high:g}] has low > high")
    return low, high


def read_ema(value, path, what: str = "ema record") -> EmaRecord | None:
    """A recorded EMA: its decay in [0, 1), whether it warmed up, the updates it followed; or None."""
    data = read_object(value, path, what)
    if not data:
        return None
    values = read_fields(data, EMA_FIELDS, path, what)
    return EmaRecord(values["decay"], values["warmup"], values["steps"], values.get("from_source", False))


def read_choice(value, choices: tuple, path, what: str, default: str) -> str:
    """A recorded name among `choices` (the schedule, the weights held); `default` where the file records none."""
    return default if value is None else read_value(value, Field(str, choices=tuple(choices)), path, what)


def read_schedule(value, path, what: str = "schedule") -> str:
    """The recorded beta schedule (files from before it was recorded were all trained with linear betas)."""
    if value is None or (isinstance(value, str) and value in BETA_SCHEDULES):
        return value or "linear"
    name = f"{value[:40]!r}" if isinstance(value, str) else shown(value)
    raise refuse(path, what, f"unknown beta schedule {name}, expected {' or '.join(BETA_SCHEDULES)}")


def read_step(value, path, what: str = "step") -> int | None:
    return None if value is None else read_value(value, STEP, path, what)


def read_codec(value, path, what: str = "codec record") -> dict | None:
    """A recorded codec: pixels (of a channel count, which sampling checks against the model's), or a named VAE (with
    a finite scale > 0); each kind with its own fields only. None where the file records none."""
    data = read_object(value, path, what)
    if not data:
        return None
    if "kind" not in data:
        raise refuse(path, what, "it has no field 'kind'")
    kind = read_value(data["kind"], CODEC_KIND, path, what, "kind")
    values = read_fields(data, CODEC_FIELDS[kind], path, what)
    if kind == "vae" and not values["vae"]:
        raise refuse(path, what, "a VAE codec that names no 'vae'")
    return values


def read_class_names(value, path, num_classes: int, what: str = "class_names") -> list[str] | None:
    """Recorded class names: a list of strings, one per class of the model; or None."""
    names = parse_json(value, path, what) if isinstance(value, str) else value
    if names is None or names == []:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problem = shown(names) if not isinstance(names, list) else "a list with a name that is no string"
        raise refuse(path, what, f"{problem} where a list of names belongs")
    if len(names) != num_classes:
        raise refuse(path, what, f"{len(names)} names for the model's {num_classes} classes")
    return names


def read_objective(record, path, what: str = "objective", older: bool = False) -> Objective:
    """The objective a file records: {objective, time_direction, trained_cfg}, each of a known kind. A time direction
    without an objective is refused: it is a flow model's record that lost its name, which would read as DDPM; but
    not in the `older` train settings of checkpoints from before the objective record."""
    data = read_object(record, path, what) or {}
    if not older and data.get("objective") is None and data.get("time_direction") is not None:
        raise refuse(path, what, f"it records a time_direction {shown(data['time_direction'])} and no objective")
    return objective_from_record(data.get("objective"), data.get("time_direction"), path, data.get("trained_cfg"))


def check_defaults_fit(defaults: SamplingDefaults | None, objective: Objective, config: DiTConfig, schedule: str,
                       where: str, hint: str = HINT, plan: bool = False) -> None:
    """Sampling defaults against the model they are for, as `dit sample` checks its options: a sampler of its
    objective, an interval in its time, guidance only with a null class. With `plan`, also the sampler plan `dit
    sample` would make (DDPM's respacing takes at most the training steps), which for diffusers' solvers imports
    diffusers. `where` starts the error: "m.safetensors records"."""
    if defaults is None:
        return
    problem = None
    if defaults.sampler not in objective.samplers:
        problem = f"the sampler {defaults.sampler} does not sample {objective.noun()}"
    elif defaults.cfg != 1 and config.num_classes > 0 and config.class_dropout_prob == 0:
        problem = f"cfg {defaults.cfg:g} needs a null class, and the model was trained without label dropout"
    else:
        try:
            objective.check_interval(defaults.interval, "")
            if plan:
                objective.plan(defaults.sampler, defaults.steps, config.learn_sigma, schedule=schedule)
        except UserError as exc:
            problem = exc.what
    if problem is not None:
        raise UserError(f"{where} sampling defaults that dit sample refuses: {problem}", hint)
