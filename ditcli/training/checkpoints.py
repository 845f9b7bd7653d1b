"""Run checkpoints: `ckpt-<step>.pt` files in the run folder, saved and loaded through one named list of state.

`train_state(run)` names everything a checkpoint holds, in the order it is written, each entry with how it is read
for saving and, where a resumed run takes it back, how it is put back. `Checkpoints.save` writes the entries in that
order and `Checkpoints.load` walks the same list, so what is saved and what is restored cannot drift apart (edm2's
`CheckpointIO`). The component also owns the decisions around the files, as torchtitan's checkpointer does: whether
one is due at a step, which one a run resumes from (chosen by rank 0, read by every rank), the atomic write and
keeping the last `keep_last`.

It also owns the run folder as a whole. Nothing a user made is lost: a folder that holds a run (checkpoints,
metrics.jsonl or run.json) is only continued (`--resume`), never started over, and `keep_last` deletes only this run's
own checkpoints, never one of a later step than the one just written. `run.json`, rewritten at every start, keeps the
run's settings, so `--resume auto` alone continues it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ditcli.data.sources import ImageSet
from ditcli.errors import UserError
from ditcli.io import atomic_write, read_json, safe_torch_load, write_json
from ditcli.model.dit import DiTConfig
from ditcli.ranks import SHARED_DISK_HINT, Ranks, from_rank0, on_every_rank
from ditcli.training.align import load_heads
from ditcli.training.config import RESUMABLE_CHANGES, TrainConfig
from ditcli.weights.checkpoint import TRAIN_FORMAT, read_train_records, train_ema_record
from ditcli.weights.fields import (
    STEP,
    Field,
    as_object,
    dataclass_spec,
    read_config,
    read_fields,
    read_step,
    read_value,
    refuse,
    shown,
)
from ditcli.weights.record import check_state_dict

CHECKPOINT_NAME = re.compile(r"ckpt-(\d+)\.pt")  # ckpt-0001000.pt holds step 1000
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # the run's settings, rewritten at every start
RUN_FORMAT = "ditcli-run"
NO_RESUME = (None, "", "none")  # --resume values that start afresh


@dataclass(frozen=True)
class Slot:
    """One named entry of a checkpoint: how to read it for saving and, if a resumed run takes it back, how to put
    it back. An entry without `load` is a record for readers (`dit sample`, `dit convert`) or for the resume check."""

    name: str
    save: Callable[[], Any]
    load: Callable[[Any], None] | None = None
    read: Callable[[dict], Any] | None = None  # how resume reads it where older checkpoints lack it; else payload[name]
    every_rank: bool = False  # read through a collective, so every rank reads it and rank 0 writes it


def train_state(run) -> list[Slot]:
    """A training run's checkpoint, entry by entry, in the order written; `run` is the `Trainer`."""
    def epoch_length() -> int:
        return max(1, len(run.data) // run.config.global_batch)

    return [
        Slot("format", lambda: TRAIN_FORMAT),
        Slot("step", lambda: run.state.step, lambda step: setattr(run.state, "step", int(step))),
        Slot("epoch", lambda: run.state.step // epoch_length()),
        Slot("position", lambda: (run.state.step % epoch_length()) * run.config.global_batch),
        Slot("config", lambda: {"model": run.model_config.to_dict(), "train": run.config.to_dict()}),
        Slot("model", lambda: run.model.state_dict(), lambda weights: run.model.load_state_dict(weights)),
        Slot("ema", lambda: run.ema.state_dict(), lambda weights: run.ema.load_state_dict(weights)),
        Slot("optimizer", lambda: run.optimizer.state_dict(), lambda saved: run.optimizer.load_state_dict(saved)),
        Slot("rng", lambda: gather_rng_states(run.device, run.dist),
             lambda states: restore_rng_states(states, run.device, run.dist.rank),
             read=lambda payload: payload.get("rng") or [], every_rank=True),
        Slot("bad_steps", lambda: run.state.bad_steps, lambda bad: setattr(run.state, "bad_steps", int(bad)),
             read=lambda payload: payload.get("bad_steps", 0)),
        Slot("class_names", lambda: run.images.class_names),
        Slot("codec", lambda: run.codec.to_dict()),
        Slot("sampling", lambda: run.sampling_defaults().to_dict()),
        Slot("objective", lambda: run.config.training_objective().to_metadata()),
        Slot("ema_record", lambda: run.ema_record().to_dict(),
             lambda record: setattr(run, "ema_from_source", bool(record and record.from_source)),
             read=train_ema_record),
        Slot("data_fingerprint", lambda: run.images.fingerprint()),
        Slot("versions", lambda: {"torch": str(torch.__version__), "ditcli": _version()}),
        *align_slots(run),
    ]


def align_slots(run) -> list[Slot]:
    """A run that trains alignment heads (--align repa or self): the heads, in REPA's key layout
    (`projectors.0.0.weight`, ...), and their optimizer's state. A checkpoint without them (resumed with --force)
    leaves them as initialised."""
    if run.config.align == "none":
        return []
    return [Slot("align", lambda: run.alignment.heads.state_dict(),
                 lambda state: load_heads(run.alignment.heads, state, run.out), read=lambda payload: payload.get("align")),
            Slot("align_optimizer", lambda: run.head_optimizer.state_dict(),
                 lambda state: state and run.head_optimizer.load_state_dict(state),
                 read=lambda payload: payload.get("align_optimizer"))]


class Checkpoints:
    """The run folder's checkpoints: due every `every` steps, `keep_last` kept, written on rank 0 from `slots`.

    Every decision reads agreed state (the step, the step last saved or loaded, rank 0's choice of checkpoint), so
    all ranks save at the same steps and resume from the same file.
    """

    def __init__(self, out: Path, every: int, keep_last: int, ranks: Ranks, slots: list[Slot]):
        self.out, self.every, self.keep_last, self.ranks, self.slots = Path(out), every, keep_last, ranks, slots
        self.saved_step = -1  # the step last saved or resumed from
        self.owned: set[int] = set()  # rank 0: the steps of this run's checkpoints, which keep_last may delete

    def due(self, step: int, last: bool = False) -> bool:
        """Is a checkpoint due after `step`: every `every` steps, and at the end of a run unless `step` is saved."""
        return step != self.saved_step if last else step % self.every == 0

    def path(self, step: int) -> Path:
        return self.out / f"ckpt-{step:07d}.pt"

    def save(self, step: int) -> Path | None:
        """Every rank calls it: write ckpt-<step>.pt atomically on rank 0 and keep the last `keep_last`; the path
        written on rank 0, None elsewhere."""
        gathered = {slot.name: slot.save() for slot in self.slots if slot.every_rank}  # collectives: all ranks
        self.saved_step = step
        if self.ranks.rank != 0:
            return None
        payload = {slot.name: gathered[slot.name] if slot.every_rank else slot.save() for slot in self.slots}
        path = self.path(step)
        atomic_write(path, lambda tmp: torch.save(payload, tmp), force=True)
        self.owned.add(step)
        self.keep(step)
        return path

    def keep(self, step: int) -> None:
        """Delete this run's checkpoints before its `keep_last` newest up to `step`; never a checkpoint of a later
        step, nor a file this run did not write or resume from."""
        mine = sorted(s for s in self.owned if s <= step)
        for old in mine[: -self.keep_last]:
            self.path(old).unlink(missing_ok=True)
            self.owned.discard(old)

    def load(self, payload: dict, path: Path) -> None:
        """Put back every entry a resumed run takes back, in the list's order (`check_payload` read each before). The
        metrics log is trimmed only once the run goes ahead (`start`): a resume refused after this leaves it as it
        was."""
        for slot in self.slots:
            if slot.load is None:
                continue
            try:
                slot.load(slot.read(payload) if slot.read is not None else payload[slot.name])
            except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as exc:  # what torch's loaders raise
                raise UserError(f"{path} records an unusable {slot.name}: {' '.join(str(exc).split())[:200]}",
                                "resume from another checkpoint of the run, or pass a new --out") from None
        self.saved_step = payload["step"]

    def agreed_resume(self, resume: str | None) -> tuple[dict, Path] | None:
        """The checkpoint `--resume` names (`auto`: the latest in the run folder) and its payload, or None to start
        afresh. Rank 0 picks it and its step; every rank then reads that one, and a rank that cannot stops them all."""
        def choose() -> int | None:
            if self.ranks.rank != 0:
                return None
            path = find_resume(resume, self.out)
            check_run_folder(self.out, resume, path)
            step = None if path is None else _checkpoint_step(path)
            self.owned = {s for s, _ in list_checkpoints(self.out) if step is not None and s <= step}
            return step

        step = from_rank0(on_every_rank(choose))
        if step is None:
            return None
        path = self.path(step) if resume == "auto" else Path(resume)
        payload = on_every_rank(lambda: read_train_checkpoint(path, step),
                                f"cannot read the checkpoint {path} that rank 0 resumes from", SHARED_DISK_HINT)
        return payload, path


    def agreed_run_file(self) -> dict | None:
        """Rank 0's run.json on every rank, or None where the folder has none."""
        return from_rank0(on_every_rank(
            lambda: read_run_file(self.out) if self.ranks.rank == 0 and (self.out / RUN_FILE).exists() else None))

    def start(self, record: dict) -> None:
        """Rank 0, once every check has passed and before the first step: drop the metrics rows logged after the
        step the run starts from (a resumed run's checkpoint, or step 0 for a run stopped before its first one), then
        write run.json (atomically), the settings a bare --resume reads. Nothing in the folder changes before."""
        if self.ranks.rank != 0:
            return
        trim_metrics(self.out / METRICS_FILE, max(self.saved_step, 0))
        write_json(self.out / RUN_FILE, {"format": RUN_FORMAT, **record})


# The run folder.

def run_marks(out: Path) -> list[str]:
    """What makes `out` hold a run: its newest checkpoint, metrics.jsonl, run.json (the names found)."""
    newest = [path.name for _, path in list_checkpoints(out)[-1:]]
    return newest + [name for name in (METRICS_FILE, RUN_FILE) if (Path(out) / name).exists()]


def check_run_folder(out: Path, resume: str | None, path: Path | None) -> None:
    """Rank 0, before anything is written: a folder that holds a run is continued, from its newest checkpoint, and
    never started over, so no run's checkpoints or metrics are overwritten, deleted or mixed with another's."""
    marks = run_marks(out)
    if not marks:
        return
    held = f"--out {out} already holds a run ({', '.join(marks)})"
    if resume in NO_RESUME:
        raise UserError(held, "continue it with --resume auto, or pass a new --out for a new run")
    if path is None or resume == "auto":
        return
    if Path(path).resolve().parent != Path(out).resolve():
        raise UserError(f"{held}, and --resume {path} continues the run of another folder",
                        "pass a new --out to continue that run there, or --resume auto to continue the run in --out")
    resumed = _checkpoint_step(path)
    newer = [found.name for step, found in list_checkpoints(out) if step > resumed]
    if newer:
        raise UserError(f"--resume {path} is older than {newer[-1]} in --out {out}, which continuing from it would "
                        "overwrite", "continue from the newest with --resume auto, or copy the checkpoint into a new "
                        "--out")


def read_run_file(out: Path) -> dict:
    """The run folder's run.json: the settings (`train`, `model`) and data fingerprint of the run's last start, each
    checked as a checkpoint's are."""
    path = Path(out) / RUN_FILE
    data = read_json(path)
    if data.get("format") != RUN_FORMAT or not isinstance(data.get("train"), dict):
        raise UserError(f"{path} is not a dit train run file", "move it out of the run folder")
    read_settings(data["train"], path)
    if data.get("model") is not None:
        read_config(data["model"], path, "model config (model)")
    read_value(data.get("data_fingerprint"), FINGERPRINT, path, "data_fingerprint")
    return data


# The records of a checkpoint or run.json that resuming reads, each read as the command line would take it.
FINGERPRINT = Field(str, nullable=True, required=False)


@cache
def settings_spec() -> dict[str, Field]:
    """TrainConfig's fields by their types; their ranges are TrainConfig's own checks, which name the option."""
    return dataclass_spec(TrainConfig, {})


def read_settings(value, path: Path, what: str = "stored settings (config.train)") -> dict:
    """The stored settings of a run, each of its option's type (`log` a list of names); fields this version does not
    know are left out."""
    settings = read_fields(value, settings_spec(), path, what, strict=False)
    log = settings.get("log", ())
    if not isinstance(log, (list, tuple)) or not all(isinstance(name, str) for name in log):
        raise refuse(path, what, f"its log {shown(log)} is no list of tracker names")
    return settings


def check_payload(data: dict, path: Path) -> None:
    """Every entry a resume reads, before any of it is used: the records and EMA weights as `dit sample` reads them,
    the raw weights, the stored settings, the step and bad-step count, the generators' states and the optimizer's
    layout."""
    config = read_train_records(data, path).config
    read_settings(as_object(data["config"], path, "config record").get("train"), path)
    if read_step(data.get("step"), path) is None:
        raise refuse(path, "step", "the checkpoint records none")
    read_value(data.get("bad_steps", 0), STEP, path, "bad_steps")
    read_value(data.get("data_fingerprint"), FINGERPRINT, path, "data_fingerprint")
    check_state_dict(data["model"], config, f"{path}'s model weights")
    rng, cpu = data.get("rng") or [], torch.get_rng_state()
    if not isinstance(rng, list) or not all(isinstance(s, dict) and isinstance(s.get("torch"), torch.Tensor)
                                            and s["torch"].dtype == cpu.dtype and s["torch"].shape == cpu.shape
                                            for s in rng):
        raise refuse(path, "rng record", "it is no list of generator states")
    optimizer = data["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise refuse(path, "optimizer record", "it has no state and param_groups")


def stored_settings(resume: str | None, out: Path) -> dict | None:
    """The settings `--resume` continues with where an option is not given: those of --resume CHECKPOINT, else the
    run folder's run.json, else its newest checkpoint's; None where there is no run. The folder (`out`) is never
    taken, nor, from a checkpoint named, the --init-from source (a run resumed from a file does not start from one)."""
    if resume in NO_RESUME:
        return None
    path = find_resume(resume, out)
    if resume == "auto" and (Path(out) / RUN_FILE).exists():
        train = read_settings(read_run_file(out)["train"], Path(out) / RUN_FILE)
    elif path is not None:
        train = read_settings(read_train_checkpoint(path, mmap=True)["config"]["train"], path)
    else:
        return None
    skipped = {"out"} | (set() if resume == "auto" else {"init_from", "init_weights"})
    names = {field.name for field in dataclasses.fields(TrainConfig)} - skipped
    settings = {name: value for name, value in train.items() if name in names}
    if "log" in settings:
        settings["log"] = tuple(settings["log"])
    return settings


def check_resume(resume: str | None, init_from: str | None) -> None:
    """`--resume CHECKPOINT` names where a run continues, so it cannot also start from `--init-from`."""
    if init_from and resume not in (None, "", "none", "auto"):
        raise UserError("--init-from and --resume CHECKPOINT exclude each other",
                        "pass --resume auto: it starts from --init-from once, then continues the run in --out")


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in the run folder `out`, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("ckpt-*.pt") if (m := CHECKPOINT_NAME.match(p.name))]
    return sorted(found)


def find_resume(resume: str | None, out: Path) -> Path | None:
    """The file `--resume` names: None for none, the latest in `out` for `auto` (None if there is none yet)."""
    if resume in NO_RESUME:
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.exists():
        raise UserError(f"resume checkpoint not found: {path}", "pass --resume auto or an existing ckpt-*.pt")
    if not path.is_file():  # a folder, or a pipe, whose read would wait for a writer forever
        raise UserError(f"--resume {path} is no checkpoint file", "pass --resume auto or a ckpt-*.pt")
    return path


def read_train_checkpoint(path: Path, step: int | None = None, mmap: bool = False) -> dict:
    """A complete training checkpoint's payload; `step`, if given, must be the one it holds. `mmap` maps the tensors
    instead of reading them, for a look at the settings."""
    data = _mapped(path) if mmap else None
    data = safe_torch_load(path) if data is None else data
    if not isinstance(data, dict) or data.get("format") != TRAIN_FORMAT or not all(
            isinstance(data.get(k), dict) for k in ("config", "model", "ema", "optimizer")):
        raise UserError(f"{path} is not a complete ditcli training checkpoint",
                        "resume needs a ckpt-*.pt written by dit train")
    check_payload(data, path)
    if step is not None and data["step"] != step:
        raise UserError(f"{path} holds step {data['step']}, not step {step} as on rank 0")
    return data


def _mapped(path: Path) -> dict | None:
    """The checkpoint with its tensors memory-mapped; None where that fails (safe_torch_load then says why)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any failure is reported by the plain load that follows
        return None


def _checkpoint_step(path: Path) -> int:
    """The step a checkpoint holds: from its ckpt-<step>.pt name, else from its payload."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else int(read_train_checkpoint(path)["step"])


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows an interrupted run logged after the checkpoint it resumes from, and any torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)), force=True)


# Resuming checks the configuration.

def check_compatible(config: TrainConfig, model_config: DiTConfig, images: ImageSet, stored: dict, path: Path,
                     fingerprint: str | None = None, force: bool = False) -> None:
    """Refuse to resume from `path` when its stored configuration differs from this run's, unless `force`."""
    ours = config.to_dict()
    defaults = TrainConfig.__dataclass_fields__  # a field added since the checkpoint was written has its default
    before = {k: stored["train"].get(k, defaults[k].default) for k in ours}
    differs = [f"{k}: {before[k]!r} -> {v!r}" for k, v in ours.items()
               if k not in RESUMABLE_CHANGES and k not in ("out", "data") and before[k] != v]
    if config.init_from and _source_key(before["init_from"]) != _source_key(config.init_from):
        differs.append(f"init_from: {before['init_from']!r} -> {config.init_from!r}")  # another run's folder
    if not same_data(config, images, stored["train"].get("data"), fingerprint):
        differs.append(f"data: {stored['train'].get('data')!r} -> {config.data!r}")
    if DiTConfig.from_dict(stored["model"]) != model_config:
        differs.append("model architecture")
    if differs and not force:
        raise UserError(f"cannot resume from {path}: the configuration differs ({'; '.join(differs)})",
                        "use the original settings, or pass --force to resume anyway")


def same_data(config: TrainConfig, images: ImageSet, stored: str | None, fingerprint: str | None) -> bool:
    """The data's fingerprint decides (`pngs` and `./pngs/` are one folder); older checkpoints compare paths."""
    if fingerprint is not None:
        return fingerprint == images.fingerprint()
    return stored is not None and _data_path(stored) == _data_path(config.data)


def _data_path(data: str) -> str:
    return data if data.startswith("fashion-mnist") else str(Path(data).expanduser().resolve())


def _source_key(source: str | None) -> str | None:
    """An --init-from source as compared on resume: local files by resolved path, hub ids as written."""
    if source is None or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


# This rank's generators.

def gather_rng_states(device: torch.device, ranks: Ranks) -> list:
    """Every rank's generators, rank by rank: the CPU's, and on CUDA the GPU's. A collective under torchrun."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if not ranks.grouped:
        return [state]
    gathered = [None] * ranks.world
    dist.all_gather_object(gathered, state)
    return gathered


def restore_rng_states(states: list, device: torch.device, rank: int) -> None:
    """This rank's saved generators: the CPU's, and on CUDA the GPU's where the checkpoint holds it."""
    if len(states) <= rank:
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _version() -> str:
    from ditcli.version import __version__

    return __version__
