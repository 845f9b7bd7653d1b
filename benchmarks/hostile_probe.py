"""Try `dit` as a hostile user would, from the outside, and tally what does not fail cleanly (issue 33).

    python benchmarks/hostile_probe.py --only fs opt --out o.jsonl   # those corpora, in /tmp/hostile-probe
    python benchmarks/hostile_probe.py --only st-mf --list           # the probes whose name starts st-mf, not run
    python benchmarks/hostile_probe.py --only fs-fifo --subprocess   # each probe a real `dit` under `timeout`

The corpora, by the prefix of their probes' names: st (.safetensors metadata, about 6,100 probes), pt (training
checkpoints and --resume, 4,600), pipe (diffusers folders, 2,400), opt (every option at its edges, 1,400), fs, home,
long, out (special files, broken links, homes, long names, 950). All of them take a few hours on 2 CPU cores; one
corpus, or a prefix of one, takes minutes.

The valid files it starts from are made by the command itself (tiny `dit train` runs of each objective, `dit convert`
to .safetensors and to a diffusers folder), then corrupted by hand: every record field of a .safetensors file's
metadata, of a training checkpoint and of a diffusers folder set to NaN, infinity, a negative, a huge or a wrongly
typed value; truncated, empty and malformed files; a folder where a file belongs and the reverse; a symlink loop and
a named pipe. Every option of every command is then tried at its edges.

A probe passes when `dit` ends within the timeout with exit code 2 and exactly one stderr line `error: <what> (<how to
fix>)`, no traceback, and every file under the scratch folder (inputs, working folder, DIT_HOME, TMPDIR) as it was;
or, for an input that is in fact valid, with exit code 0; a valid run may write its outputs and caches, never into
its inputs. Each probe runs in a forked child of one process that has imported ditcli once (or, with --subprocess, in
a fresh `dit`), with one thread. Failures are printed as they come, a tally at the end, every outcome as a JSON line
with --out; the inputs accepted as valid are listed for review.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
import typing
from dataclasses import dataclass, field
from pathlib import Path

ONE_LINE = re.compile(r"^error: \S.*\S \(\S.*\)$")  # error: <what> (<how to fix>)
# torch makes its per-user inductor cache folder in the temporary folder when torch._inductor is first imported (here
# through diffusers' schedulers): torch's doing on import, not a file of ours, so not counted as one left behind.
TORCH_TMP = "torchinductor_"
TINY = ["--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size", "8",
        "--channels", "1", "--vae", "none", "--global-batch", "4", "--steps", "2", "--log-every", "1",
        "--ckpt-every", "1", "--ema-decay", "0"]
OBJECTIVES = {"ddpm": [], "flow": ["--objective", "flow"], "mf": ["--objective", "meanflow"],
              "dmf": ["--objective", "meanflow", "--decoupled-depth", "1"]}
# What a hostile record holds where a value belongs, as JSON would carry it.
BAD_JSON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "neg": -1, "zero": 0, "1e300": 1e300,
            "hugeint": 10**30, "int64+": 2**64, "half": 0.5, "str2": "2", "emptystr": "", "list": [], "list2": [2, 3],
            "obj": {}, "null": None, "true": True}


@dataclass
class Probe:
    name: str
    argv: list[str]
    expect: str = "refuse"  # refuse, ok, or either (a value that may be valid: a passing exit 0 is reviewed)
    mentions: str = ""  # a text the error line must contain
    setup: object = None  # a callable(root) run just before the probe, inside the hash


@dataclass
class Outcome:
    probe: Probe
    code: int | None
    stderr: str
    seconds: float
    problems: list[str] = field(default_factory=list)


# Running one probe.

def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (but its .log) with what it is: a file's sha256, a link's target, a folder."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not (folder == str(root) and d == ".log")]
        for name in dirs + files:
            path = Path(folder, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[str(path)] = "link " + os.readlink(path)
            elif stat.S_ISDIR(mode):
                found[str(path)] = "dir"
            elif stat.S_ISREG(mode):
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path)] = f"special {stat.S_IFMT(mode)}"
    return found


def environment(root: Path) -> dict[str, str]:
    return {"DIT_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1", "DIT_OFFLINE": "1", "TMPDIR": str(root / "tmp"),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "WANDB_MODE": "offline"}


def run_forked(argv: list[str], root: Path, timeout: float) -> tuple[int | None, str, str]:
    """`dit ARGV` in a forked child, in root/work: (exit code or None when killed at the timeout, stdout, stderr)."""
    log = root / ".log"
    out, err = log / "stdout", log / "stderr"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.chdir(root / "work")
            os.environ.update(environment(root))
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["dit", *argv]
            from ditcli.cli.app import main as dit_main

            try:
                dit_main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else int(done.code is not None)
        except BaseException:  # noqa: BLE001  the child prints what escaped, as the interpreter would
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return wait_for(pid, timeout), out.read_text(errors="replace"), err.read_text(errors="replace")


def wait_for(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def run_process(argv: list[str], root: Path, timeout: float) -> tuple[int | None, str, str]:
    """`timeout T dit ARGV` as its own process."""
    dit = shutil.which("dit") or "dit"
    result = subprocess.run(["timeout", "-s", "KILL", str(int(timeout)), dit, *argv], cwd=root / "work",
                            env={**os.environ, **environment(root)}, capture_output=True, text=True, check=False)
    return (None if result.returncode in (124, 137, -9) else result.returncode), result.stdout, result.stderr


def judge(probe: Probe, code: int | None, stdout: str, stderr: str, changed: list[str]) -> list[str]:
    """What is wrong with how `dit` ended; [] when it ended cleanly."""
    if code is None:
        return ["ran until killed"]
    problems = []
    if "Traceback" in stderr or "Traceback" in stdout:
        problems.append("traceback")
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if code == 0:
        if probe.expect == "refuse":
            problems.append("accepted")
        return problems
    if probe.expect == "ok":
        problems.append(f"refused a valid input: {lines[-1] if lines else code}")
    if code != 2:
        problems.append(f"exit code {code}")
    if len(lines) != 1 or not ONE_LINE.match(lines[0]):
        problems.append("not one error line")
    elif probe.mentions and probe.mentions.lower() not in lines[0].lower():
        problems.append(f"the line does not name {probe.mentions!r}")
    if changed:
        problems.append(f"changed {len(changed)} paths: {', '.join(changed[:3])}")
    return problems


def run_probe(probe: Probe, root: Path, timeout: float, forked: bool) -> Outcome:
    reset_work(root)
    if probe.setup is not None:
        probe.setup(root)
    before = snapshot(root)
    start = time.monotonic()
    code, stdout, stderr = (run_forked if forked else run_process)(probe.argv, root, timeout)
    seconds = time.monotonic() - start
    after = snapshot(root)
    changed = sorted(path for path in before.keys() | after.keys() if before.get(path) != after.get(path)
                     and not Path(path).name.startswith(TORCH_TMP))
    problems = judge(probe, code, stdout, stderr, changed if code != 0 else [])
    if code == 0:  # a run that went ahead may write its outputs and caches, never its inputs
        outside = [path for path in changed if path.startswith(str(root / "fx"))]
        problems += [f"an accepted run changed {', '.join(outside[:3])}"] if outside else []
    return Outcome(probe, code, stderr.strip()[-2000:] or stdout.strip()[-2000:], seconds, problems)


def reset_work(root: Path) -> None:
    """An empty working folder, temporary folder and home for the next probe."""
    for name in ("work", "tmp", "home"):
        path = root / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    for name in ("work", "tmp"):
        (root / name).mkdir()


# The valid files, made by `dit` itself.

def make_fixtures(root: Path) -> Path:
    """root/fx: an 8-image .npz, a tiny run of each objective (2 steps, a checkpoint each), its .safetensors, a
    diffusers folder of the DDPM one, a SiT-like bare state dict and a REPA-like one, and a reference .npz."""
    fx = root / "fx"
    if (fx / ".done").exists():
        return fx
    shutil.rmtree(fx, ignore_errors=True)
    fx.mkdir(parents=True)
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    np.savez(fx / "good.npz", images=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), labels=np.arange(8) % 2,
             class_names=np.array(["a", "b"]))
    np.savez(fx / "ref.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    for name, flags in OBJECTIVES.items():
        dit(root, "train", "--data", str(fx / "good.npz"), "--out", name, *TINY, *flags)  # a resume finds it anywhere
        dit(root, "convert", f"{name}/ckpt-0000002.pt", f"{name}.safetensors")
    dit(root, "convert", "ddpm/ckpt-0000002.pt", "pipe", "--to", "diffusers", "--vae", "none")
    state = torch.load(fx / "flow" / "ckpt-0000002.pt", weights_only=True)["ema"]
    torch.save(state, fx / "SiT-XL-2-256x256.pt")
    torch.save({**state, "projectors.0.0.weight": torch.zeros(8, 32)}, fx / "repa.pt")
    dmf = torch.load(fx / "dmf" / "ckpt-0000002.pt", weights_only=True)["ema"]
    torch.save(dmf, fx / "dmf-bare.pt")
    (fx / "text.npz").write_text("not a zip\n")
    (fx / "folder").mkdir()  # an empty folder, where an option takes a path
    (fx / ".done").write_text("")
    return fx


def dit(root: Path, *argv: str) -> None:
    result = subprocess.run([shutil.which("dit") or "dit", *argv], cwd=root / "fx", capture_output=True, text=True,
                            env={**os.environ, **environment(root)}, check=False)
    if result.returncode != 0:
        raise SystemExit(f"dit {' '.join(argv)} failed:\n{result.stderr}")


# Corrupted .safetensors files: every metadata field.

def edited_safetensors(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose metadata (and tensors) `edit(metadata, tensors)` changed in place."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        metadata, tensors = dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    edit(metadata, tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def set_text(key: str, text: str | None):
    def edit(metadata, tensors):
        if text is None:
            metadata.pop(key, None)
        else:
            metadata[key] = text
    return edit


def set_json_field(key: str, sub: str, value, drop: bool = False):
    def edit(metadata, tensors):
        record = json.loads(metadata.get(key) or "{}")
        if drop:
            record.pop(sub, None)
        else:
            record[sub] = value
        metadata[key] = json.dumps(record)
    return edit


JSON_KEYS = {"config": ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                        "num_classes", "learn_sigma", "class_dropout_prob", "timestep_convention", "norm_eps",
                        "mean_flow_form", "decoupled_depth"),
             "sampling": ("sampler", "steps", "cfg", "interval", "channels"),
             "ema": ("decay", "warmup", "steps", "from_source"), "codec": ("kind", "channels", "vae", "scale")}
TEXT_KEYS = ("weights", "time_direction", "format", "schedule", "objective", "trained_cfg")
BAD_TEXT = {"empty": "", "garbage": "garbage", "nan": "NaN", "null": "null", "obj": "{}", "list": "[]",
            "brace": "{", "long": "x" * 100000}
FEW = ("nan", "inf", "neg", "zero", "1e300", "hugeint", "half", "str2", "list", "obj", "null", "true")


def file_commands(path: str, objective: list[str], every: bool) -> list[tuple[str, list[str]]]:
    """The commands that read a weight file: always --info and sample; with `every`, also convert, classes and a
    fine-tune from it."""
    commands = [("info", ["convert", "--info", path]), ("sample", ["sample", "--ckpt", path, "--num", "2", "--out", "o"])]
    if every:
        commands += [("convert", ["convert", path, "o.safetensors"]), ("classes", ["classes", "--ckpt", path]),
                     ("init", ["train", "--data", "../fx/good.npz", "--out", "run", *TINY[:-8], "--steps", "1",
                               *objective, "--init-from", path])]
    return commands


def safetensors_probes(fx: Path) -> list[Probe]:
    """Each metadata field of each objective's file set to each bad value (the mean-flow file, which records the most,
    to every value of BAD_JSON), read by each command; the file is written just before its probe."""
    probes = []
    for src, flags in OBJECTIVES.items():
        values = BAD_JSON if src == "mf" else {k: BAD_JSON[k] for k in FEW}
        edits = {f"{key}.{sub}.{label}": set_json_field(key, sub, value)
                 for key, subs in JSON_KEYS.items() for sub in subs for label, value in values.items()}
        edits |= {f"{key}.{sub}.drop": set_json_field(key, sub, None, drop=True)
                  for key, subs in JSON_KEYS.items() for sub in subs}
        edits |= {f"{key}.unknown": set_json_field(key, "bogus", 1) for key in JSON_KEYS}
        edits |= {f"{key}.{label}": set_text(key, text) for key in (*JSON_KEYS, "class_names", *TEXT_KEYS)
                  for label, text in BAD_TEXT.items()}
        edits |= {f"{key}.drop": set_text(key, None) for key in (*JSON_KEYS, "class_names", *TEXT_KEYS)}
        edits |= {f"class_names.{label}": set_text("class_names", text) for label, text in
                  {"three": '["a","b","c"]', "ints": "[1, 2]", "nested": '[["a"], "b"]', "obj": '{"0": "a"}'}.items()}
        edits |= tensor_edits()
        for label, edit in edits.items():
            every = label.endswith((".nan", ".hugeint", ".str2", ".null", ".drop", ".garbage")) or "tensor" in label
            make = (lambda root, s=fx / f"{src}.safetensors", e=edit:
                    edited_safetensors(s, root / "work" / "bad.safetensors", e))
            probes += [Probe(f"st-{src}-{label}-{cmd}", argv, "either", setup=make)
                       for cmd, argv in file_commands("bad.safetensors", flags, every)]
    return probes


def tensor_edits() -> dict:
    import torch

    def drop(metadata, tensors):
        tensors.pop(min(tensors))

    def extra(metadata, tensors):
        tensors["bogus.weight"] = torch.zeros(2)

    def reshape(metadata, tensors):
        key = next(k for k in sorted(tensors) if tensors[k].dim() == 2)
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])

    def nan(metadata, tensors):
        key = next(k for k in sorted(tensors) if tensors[k].dim() == 2 and "pos_embed" not in k)
        tensors[key] = torch.full_like(tensors[key], float("nan"))

    def dtype(metadata, tensors):
        key = min(tensors)
        tensors[key] = tensors[key].to(torch.int32)

    return {"tensor.drop": drop, "tensor.extra": extra, "tensor.reshape": reshape, "tensor.nan": nan,
            "tensor.int": dtype}


# Corrupted training checkpoints: every field, the stored settings included.

MISSING = object()
PY_BAD = {"nan": float("nan"), "inf": float("inf"), "neg": -1, "zero": 0, "1e300": 1e300, "hugeint": 10**30,
          "half": 0.5, "str2": "2", "list": [], "obj": {}, "none": None, "true": True}
TRAIN_BAD = ("nan", "neg", "hugeint", "str2", "list", "none", "true")


def edited_checkpoint(src: Path, dst: Path, where: tuple, value) -> Path:
    """A copy of training checkpoint `src` with the field at key path `where` set to `value` (MISSING drops it)."""
    import torch

    data = torch.load(src, weights_only=True)
    set_field(data, where, value() if callable(value) else value)
    torch.save(data, dst)
    return dst


def set_field(data: dict, where: tuple, value) -> None:
    """Set the field at key path `where` of nested `data` to `value`; MISSING drops it."""
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    if value is MISSING:
        parent.pop(where[-1], None)
    else:
        parent[where[-1]] = value


def checkpoint_fields(src: Path) -> list[tuple]:
    """The key paths of a training checkpoint's records: its top-level fields and those of its records."""
    import torch

    data = torch.load(src, weights_only=True)
    paths = [(key,) for key in data]
    for key in ("sampling", "objective", "ema_record", "codec"):
        paths += [(key, sub) for sub in (data.get(key) or {})]
    paths += [("config", "model", sub) for sub in data["config"]["model"]]
    paths += [("config", "train", sub) for sub in data["config"]["train"]]
    return paths


def checkpoint_probes(fx: Path, sources=("mf", "ddpm")) -> list[Probe]:
    """Each field of a training checkpoint, and of the mean-flow run's stored settings, set to each bad value, read by
    each command and by --resume; the file is written just before its probe."""
    probes = []
    for src in sources:
        ckpt = fx / src / "ckpt-0000002.pt"
        for where in checkpoint_fields(ckpt):
            if where[:2] == ("config", "train") and src != "mf":
                continue
            labels = TRAIN_BAD if where[:2] == ("config", "train") else PY_BAD
            values = {label: PY_BAD[label] for label in labels} | {"drop": MISSING}
            if where[0] in ("model", "ema", "optimizer", "rng") and len(where) == 1:
                values = {"drop": MISSING, "none": None, "list": [], "str2": "2"}
            for label, value in values.items():
                probes += checkpoint_commands(f"pt-{src}-{'.'.join(where)}.{label}", ckpt, src, where, value, label)
        for label, (key, value) in {"model.reshape": ("model", lambda c=ckpt: reshaped(c, "model")),
                                    "ema.reshape": ("ema", lambda c=ckpt: reshaped(c, "ema")),
                                    "ema.nan": ("ema", lambda c=ckpt: nan_weights(c))}.items():
            probes += checkpoint_commands(f"pt-{src}-{label}", ckpt, src, (key,), value, label)
    return probes


def reshaped(ckpt: Path, key: str) -> dict:
    import torch

    state = dict(torch.load(ckpt, weights_only=True)[key])
    name = next(k for k in sorted(state) if state[k].dim() == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    return state


def nan_weights(ckpt: Path) -> dict:
    import torch

    state = dict(torch.load(ckpt, weights_only=True)["ema"])
    name = next(k for k in sorted(state) if state[k].dim() == 2 and "pos_embed" not in k)
    state[name] = torch.full_like(state[name], float("nan"))
    return state


def checkpoint_commands(name: str, ckpt: Path, src: str, where: tuple, value, label: str) -> list[Probe]:
    """The stored settings only matter to --resume; every other field to every reader too."""
    def bad_file(root: Path) -> Path:
        return edited_checkpoint(ckpt, root / "work" / "bad.pt", where, value)

    resume = Probe(f"{name}-resume", ["train", "--resume", "auto", "--out", "run", "--steps", "3"], "either",
                   setup=lambda root: copy_run(root, bad_file(root), src))
    if where[:2] == ("config", "train"):
        return [resume]
    every = label in ("nan", "hugeint", "str2", "none", "drop") or "reshape" in label
    readers = file_commands("bad.pt", OBJECTIVES[src], every)
    return [Probe(f"{name}-{cmd}", argv, "either", setup=bad_file) for cmd, argv in readers] + [resume]


def copy_run(root: Path, bad: Path, src: str) -> None:
    """root/work/run: a copy of the run `src` whose newest checkpoint is `bad`."""
    run = root / "work" / "run"
    shutil.copytree(root / "fx" / src, run)
    shutil.move(bad, run / "ckpt-0000002.pt")



# Corrupted diffusers folders: every field of model_index.json, transformer/config.json, scheduler_config.json.

PIPE_FILES = {"index": "model_index.json", "transformer": "transformer/config.json",
              "scheduler": "scheduler/scheduler_config.json"}


def edited_pipe(root: Path, relative: str, where: tuple, value) -> None:
    """root/work/pipe: a copy of the DDPM pipeline folder with the JSON field at `where` of `relative` set to
    `value` (MISSING drops it)."""
    pipe = root / "work" / "pipe"
    shutil.copytree(root / "fx" / "pipe", pipe)
    path = pipe / relative
    data = json.loads(path.read_text())
    set_field(data, where, value)
    path.write_text(json.dumps(data))


def json_paths(data, prefix=()) -> list[tuple]:
    """Every key path of a JSON object, its nested objects' keys included."""
    paths = []
    for key, value in data.items():
        paths.append((*prefix, key))
        if isinstance(value, dict) and value:
            paths += json_paths(value, (*prefix, key))
    return paths


def pipe_commands(name: str, setup, expect: str = "either", every: bool = True) -> list[Probe]:
    """The commands that read a diffusers folder; without `every`, --info, sample and convert only."""
    argv = {"info": ["convert", "--info", "pipe"], "sample": ["sample", "--ckpt", "pipe", "--num", "2", "--out", "o"],
            "convert": ["convert", "pipe", "o.safetensors"], "classes": ["classes", "--ckpt", "pipe"],
            "init": ["train", "--data", "../fx/good.npz", "--out", "run", *TINY[:-8], "--steps", "1",
                     "--init-from", "pipe"]}
    return [Probe(f"{name}-{cmd}", args, expect, setup=setup) for cmd, args in argv.items()
            if every or cmd in ("info", "sample", "convert")]


def pipe_probes(fx: Path) -> list[Probe]:
    probes = []
    for short, relative in PIPE_FILES.items():
        data = json.loads((fx / "pipe" / relative).read_text())
        for where in json_paths(data):
            values = {label: BAD_JSON[label] for label in FEW} | {"drop": MISSING}
            if where == ("trained_betas",):
                values |= {"short": [0.1] * 3, "nan": [float("nan")] * 1000, "one": [1.0] * 1000}
            for label, value in values.items():
                setup = (lambda root, r=relative, w=where, v=value: edited_pipe(root, r, w, v))
                probes += pipe_commands(f"pipe-{short}-{'.'.join(where)}.{label}", setup,
                                        every=label in ("nan", "str2", "null", "drop"))
        probes += pipe_commands(f"pipe-{short}-unknown", lambda root, r=relative: edited_pipe(root, r, ("bogus",), 1))
        for label, text in {"malformed": "{", "empty": "", "list": "[]", "nan": "NaN", "null": "null"}.items():
            probes += pipe_commands(f"pipe-{short}-file.{label}",
                                    lambda root, r=relative, t=text: replace_file(root, r, t))
        probes += pipe_commands(f"pipe-{short}-file.dir", lambda root, r=relative: replace_file(root, r, None))
        probes += pipe_commands(f"pipe-{short}-file.drop", lambda root, r=relative: replace_file(root, r, MISSING))
    weights = "transformer/diffusion_pytorch_model.safetensors"
    for label, text in {"empty": "", "garbage": "garbage" * 100}.items():
        probes += pipe_commands(f"pipe-weights-{label}", lambda root, t=text: replace_file(root, weights, t))
    probes += pipe_commands("pipe-weights-truncated", lambda root: truncate(root / "work" / "pipe" / weights, root))
    probes += pipe_commands("pipe-weights-drop", lambda root: replace_file(root, weights, MISSING))
    probes += pipe_commands("pipe-weights-dir", lambda root: replace_file(root, weights, None))
    return probes


def replace_file(root: Path, relative: str, text) -> None:
    """In a copy of the pipeline folder: `relative` holding `text`, a folder (None) or nothing (MISSING)."""
    pipe = root / "work" / "pipe"
    shutil.copytree(root / "fx" / "pipe", pipe)
    (pipe / relative).unlink()
    if text is None:
        (pipe / relative).mkdir()
    elif text is not MISSING:
        (pipe / relative).write_text(text)


def truncate(path: Path, root: Path) -> None:
    if not path.exists():
        shutil.copytree(root / "fx" / "pipe", root / "work" / "pipe")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])



# Every option of every command at its edges, each on a base command that would use it.

TRAIN = ["train", "--data", "../fx/good.npz", "--out", "run", *TINY[:-8], "--steps", "1"]
MEANFLOW = [*TRAIN, "--objective", "meanflow"]
EVAL = [*TRAIN, "--eval-every", "1", "--eval-num", "2", "--eval-ref", "../fx/ref.npz", "--eval-features",
        "fashion-judge"]
SAMPLE = ["sample", "--ckpt", "../fx/ddpm/ckpt-0000002.pt", "--num", "2", "--steps", "2", "--out", "o"]
# The base command of the options that only apply beside others: by option, else by command.
BASES = {"train": TRAIN, "sample": SAMPLE, "convert": ["convert", "../fx/ddpm/ckpt-0000002.pt", "o.safetensors"],
         "fid": ["fid", "../fx/ref.npz", "--ref", "../fx/ref.npz", "--features", "fashion-judge", "--no-pr"],
         "classes": ["classes"]}
OPTION_BASES = {
    **{f"train {o}": MEANFLOW for o in ("--interval-ratio", "--mf-time-mean", "--mf-time-std", "--adaptive-p",
                                        "--adaptive-c", "--train-guidance", "--decoupled-depth")},
    **{f"train {o}": [*MEANFLOW, "--train-guidance", "model"] for o in ("--train-omega", "--train-guidance-interval")},
    "train --train-kappa": [*MEANFLOW, "--train-guidance", "meanflow"],
    **{f"train {o}": [*TRAIN, "--objective", "flow"] for o in ("--time-direction", "--time-sampling",
                                                                "--time-shift")},
    **{f"train {o}": [*TRAIN, "--align", "self"] for o in ("--align-depth", "--align-weight",
                                                           "--align-teacher-depth")},
    "train --align-projector-dim": [*TRAIN, "--align", "repa", "--align-encoder", "fashion-judge"],
    "train --align-encoder": [*TRAIN, "--align", "repa"],
    **{f"train {o}": [*TRAIN, "--dispersive"] for o in ("--dispersive-depth", "--dispersive-weight",
                                                        "--dispersive-temperature")},
    **{f"train {o}": EVAL for o in ("--eval-num", "--eval-sampler", "--eval-steps", "--eval-cfg", "--eval-ref",
                                    "--eval-features", "--dinov2-weights", "--eval-every")},
    "train --init-weights": [*TRAIN, "--init-from", "../fx/ddpm/ckpt-0000002.pt"],
    "train --force": [*TRAIN, "--resume", "auto"],
    **{f"sample {o}": ["sample", "--ckpt", "../fx/flow/ckpt-0000002.pt", "--num", "2", "--out", "o", "--sampler",
                       "dopri5"] for o in ("--atol", "--rtol")},
    "sample --time-shift": ["sample", "--ckpt", "../fx/flow/ckpt-0000002.pt", "--num", "2", "--out", "o",
                            "--steps", "2"],
    "sample --eta": [*SAMPLE, "--sampler", "ddim"],
    "sample --decoupled-depth": ["sample", "--ckpt", "../fx/dmf-bare.pt", "--num", "2", "--out", "o",
                                 "--objective", "meanflow", "--time-direction", "noise-to-data", "--num-heads", "2",
                                 "--vae", "none"],
    "convert --decoupled-depth": ["convert", "../fx/dmf-bare.pt", "o.safetensors", "--objective", "meanflow",
                                  "--time-direction", "noise-to-data", "--num-heads", "2"],
    "fid --make-ref": ["fid", "-o", "r.npz", "--features", "fashion-judge"],
    **{f"fid {o}": ["fid", "--make-ref", "../fx/good.npz", "-o", "r.npz", "--features", "fashion-judge"]
       for o in ("--split", "--output", "--force")},
}
EDGE_NUMBERS = {"zero": "0", "neg": "-1", "nan": "nan", "inf": "inf", "-inf": "-inf", "1e300": "1e300",
                "hugeint": "99999999999999999999", "int64": "9223372036854775807", "half": "0.5", "empty": ""}
EDGE_TEXTS = {"empty": "", "bogus": "bogus", "space": " ", "long": "x" * 5000, "dash": "-", "comma": ",",
              "nan": "nan", "zero": "0", "path": "../fx/good.npz", "dir": "../fx/folder", "none": "none"}


def command_options(name: str) -> list[tuple[str, str]]:
    """(flag, kind) of every option of `dit NAME`: int, float, bool, or text."""
    from typer.main import get_command

    from ditcli.cli.app import app

    found = []
    for param in get_command(app).commands[name].params:
        flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
        if flag == "--help" or param.param_type_name != "option":
            continue
        annotation = param.type_descriptor.annotation
        kinds = {int: "int", float: "float", bool: "bool"}
        kind = next((kinds[a] for a in (annotation, *typing.get_args(annotation)) if a in kinds), "text")
        found.append((flag, "bool" if param.is_flag else kind))
    return found


def option_probes(fx: Path) -> list[Probe]:
    probes = []
    for command, default_base in BASES.items():
        for flag, kind in command_options(command):
            base = OPTION_BASES.get(f"{command} {flag}", default_base)
            if kind == "bool":
                probes += [Probe(f"opt-{command}{flag}", [*base, flag], "either"),
                           Probe(f"opt-{command}{flag}.twice", [*base, flag, flag], "either")]
                continue
            values = EDGE_NUMBERS if kind in ("int", "float") else EDGE_TEXTS
            probes += [Probe(f"opt-{command}{flag}.{label}", [*base, flag, value], "either")
                       for label, value in values.items()]
    return probes



# What stands where a file belongs: nothing readable, a folder, a loop, a pipe, a file cut short.

def make_thing(kind: str, path: Path, root: Path) -> None:
    """At `path`: an empty file, a folder, a symlink loop, a dangling link, a named pipe, a cut .safetensors or .pt,
    a file of random bytes, a safetensors header that announces more than the file holds, a .pt of the wrong type."""
    import torch

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "dir":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "dangling":
        path.symlink_to("nowhere")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "cut-st":
        data = (root / "fx" / "mf.safetensors").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "cut-pt":
        data = (root / "fx" / "mf" / "ckpt-0000002.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "big-header":
        path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    elif kind == "deep-header":
        header = b"[" * 100000 + b"]" * 100000
        path.write_bytes(len(header).to_bytes(8, "little") + header)
    elif kind in PT_THINGS:
        torch.save(PT_THINGS[kind](), path)
    elif kind in NPZ_THINGS:
        write_npz(path, NPZ_THINGS[kind]())


def write_npz(path: Path, arrays) -> None:
    """np.savez's archive of `arrays` under `path` exactly (np.savez would add .npz), or np.save's lone array."""
    import numpy as np

    with open(path, "wb") as f:
        if isinstance(arrays, dict):
            np.savez(f, **arrays)
        else:
            np.save(f, arrays, allow_pickle=True)


PT_THINGS = {"pt-list": lambda: [1, 2], "pt-tensor": lambda: __import__("torch").zeros(2), "pt-empty": dict,
             "pt-strings": lambda: {"a": "b"}, "pt-deep": lambda: deep_dict(200),
             "pt-train-bare": lambda: {"format": "ditcli-train"}}

def npz_things() -> dict:
    import numpy as np

    images = np.zeros((4, 8, 8, 3), np.uint8)
    objects = np.array([{"a": 1}, None], dtype=object)
    return {"npy": lambda: images, "npz-none": dict, "npz-object": lambda: {"arr_0": objects},
            "npz-object-stats": lambda: {"mu": objects, "sigma": objects},
            "npz-object-extractor": lambda: {"arr_0": images, "feature_extractor": objects},
            "npz-float": lambda: {"arr_0": images.astype(np.float32), "images": images.astype(np.float32)},
            "npz-nan-stats": lambda: {"mu": np.full(4, np.nan), "sigma": np.eye(4)},
            "npz-1d": lambda: {"arr_0": np.zeros(4, np.uint8), "images": np.zeros(4, np.uint8)},
            "npz-no-images": lambda: {"arr_0": np.zeros((0, 8, 8, 3), np.uint8), "images": np.zeros((0, 8, 8, 1),
                                                                                                     np.uint8)},
            "npz-labels": lambda: {"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.array([-1, 0, 2**40, 1])},
            "npz-labels-float": lambda: {"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.full(4, np.nan)},
            "npz-labels-short": lambda: {"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros(2, int)},
            "npz-names-object": lambda: {"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros(4, int),
                                         "class_names": objects},
            "npz-one-image": lambda: {"arr_0": np.zeros((1, 8, 8, 3), np.uint8)}}


NPZ_THINGS = npz_things()
# What a reader rightly takes: an array it does not read holds objects; one image trains (a covariance needs two).
VALID_THINGS = {("npz-object-extractor", "data"), ("npz-object-extractor", "fid-samples"), ("npz-one-image", "data")}
THINGS = ("empty", "dir", "loop", "dangling", "fifo", "cut-st", "cut-pt", "random", "big-header", "deep-header",
          *PT_THINGS, *NPZ_THINGS)


def deep_dict(depth: int) -> dict:
    data: dict = {}
    for _ in range(depth):
        data = {"a": data}
    return data


def thing_probes(fx: Path) -> list[Probe]:
    """Each thing as the file of each command that reads one, under the names a reader tells apart by."""
    probes = []
    readers = {"info": lambda f: ["convert", "--info", f],
               "sample": lambda f: ["sample", "--ckpt", f, "--num", "2", "--out", "o"],
               "convert": lambda f: ["convert", f, "o.safetensors"], "classes": lambda f: ["classes", "--ckpt", f],
               "init": lambda f: [*TRAIN, "--init-from", f],
               "resume": lambda f: [*TRAIN, "--resume", f],
               "eval-ref": lambda f: [*EVAL[:-4], "--eval-ref", f, "--eval-features", "fashion-judge"],
               "eval-features": lambda f: [*EVAL[:-2], "--eval-features", f],
               "align-encoder": lambda f: [*TRAIN, "--align", "repa", "--align-encoder", f],
               "data": lambda f: ["train", "--data", f, *TRAIN[3:]],
               "fid-samples": lambda f: ["fid", f, "--ref", "../fx/ref.npz", "--features", "fashion-judge"],
               "fid-ref": lambda f: ["fid", "../fx/ref.npz", "--ref", f, "--features", "fashion-judge"],
               "fid-features": lambda f: ["fid", "../fx/ref.npz", "--ref", "../fx/ref.npz", "--features", f],
               "inception": lambda f: ["fid", "../fx/ref.npz", "--ref", "../fx/ref.npz", "--inception-weights", f],
               "dinov2": lambda f: ["fid", "../fx/ref.npz", "--ref", "../fx/ref.npz", "--features", "dinov2",
                                    "--dinov2-weights", f],
               "vae": lambda f: ["sample", "--ckpt", "../fx/ddpm/ckpt-0000002.pt", "--num", "2", "--out", "o",
                                 "--vae", f]}
    for kind in THINGS:
        for suffix in suffixes(kind):
            name = f"thing{suffix}"
            for reader, argv in readers.items():
                setup = (lambda root, k=kind, n=name: make_thing(k, root / "work" / n, root))
                expect = "ok" if (kind, reader) in VALID_THINGS else "refuse"
                probes.append(Probe(f"fs-{kind}{suffix}-{reader}", argv(name), expect, setup=setup))
    probes += home_probes()
    return probes


def suffixes(kind: str) -> tuple[str, ...]:
    """The names a thing is tried under: what it claims to be, and no suffix at all (read by content)."""
    if kind.startswith("npz") or kind == "npy":
        return (".npz",)
    if kind.startswith(("pt", "cut-pt")):
        return (".pt", "")
    if kind in ("cut-st", "big-header", "deep-header"):
        return (".safetensors", "")
    return (".safetensors", ".pt", ".npz", "")


def home_probes() -> list[Probe]:
    """DIT_HOME a file, a loop, a dangling link; the run folder a file; an output under a file; a name too long."""
    probes = []
    for kind in ("file", "loop", "dangling"):
        setup = (lambda root, k=kind: make_thing({"file": "random"}.get(k, k), root / "home", root))
        for name, argv in {"compile": [*SAMPLE, "--compile"], "sample": SAMPLE,
                           "fid": ["fid", "../fx/ref.npz", "--ref", "../fx/ref.npz"],
                           "train-compile": [*TRAIN, "--compile"]}.items():
            probes.append(Probe(f"home-{kind}-{name}", argv, "either", setup=setup))
    long = "x" * 300
    for name, argv in {"sample-out": [*SAMPLE[:-1], long], "sample-npz": [*SAMPLE, "--npz", f"{long}.npz"],
                       "train-out": [*TRAIN[:4], long, *TRAIN[5:]], "convert-dst": [*BASES["convert"][:2],
                                                                                   f"{long}.safetensors"],
                       "fid-o": ["fid", "--make-ref", "../fx/good.npz", "-o", f"{long}.npz"],
                       "ckpt": ["sample", "--ckpt", f"{long}.pt", "--out", "o"],
                       "data": ["train", "--data", f"{long}.npz", *TRAIN[3:]]}.items():
        probes.append(Probe(f"long-{name}", argv))
    for name, argv in {"train-out": TRAIN, "sample-out": [*SAMPLE[:-1], "run"],
                       "sample-npz": [*SAMPLE, "--npz", "run/x.npz"], "convert": [*BASES["convert"][:2],
                                                                                   "run/o.safetensors"],
                       "fid-o": ["fid", "--make-ref", "../fx/good.npz", "-o", "run/r.npz"]}.items():
        probes.append(Probe(f"out-a-file-{name}", argv, setup=lambda root: (root / "work" / "run").write_text("x")))
    return probes


# The corpus and the tally.

# Each corpus by the prefixes of its probes' names.
CORPORA = [(("st",), safetensors_probes), (("pt",), checkpoint_probes), (("pipe",), pipe_probes),
           (("opt",), option_probes), (("fs", "home", "long", "out"), thing_probes)]


def corpus(fx: Path, only: list[str]) -> list[Probe]:
    """The probes whose names start with one of `only` (all without), building only the corpora they need."""
    probes = []
    for prefixes, build in CORPORA:
        if not only or any(o.startswith(p) or p.startswith(o) for o in only for p in prefixes):
            probes += build(fx)
    return [p for p in probes if not only or p.name.startswith(tuple(only))]


def tally(outcomes: list[Outcome]) -> dict:
    failed = [o for o in outcomes if o.problems]
    classes: dict[str, int] = {}
    for outcome in failed:
        for problem in outcome.problems:
            kind = problem.split(":")[0] if not problem.startswith("changed") else "changed files"
            classes[kind] = classes.get(kind, 0) + 1
    accepted = sorted(o.probe.name for o in outcomes if o.code == 0 and o.probe.expect == "either")
    return {"probes": len(outcomes), "clean": len(outcomes) - len(failed), "failed": len(failed), "classes": classes,
            "accepted_for_review": accepted,
            "slowest": sorted(((round(o.seconds, 1), o.probe.name) for o in outcomes), reverse=True)[:5]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/hostile-probe"))
    parser.add_argument("--only", nargs="*", default=[], help="run the probes whose name starts with one of these")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--subprocess", action="store_true", help="each probe a real `dit` process")
    parser.add_argument("--list", action="store_true", help="list the probes, run none")
    parser.add_argument("--out", type=Path, help="write every outcome as JSON lines here")
    args = parser.parse_args()
    root = args.root.resolve()
    os.environ.update(environment(root))
    (root / ".log").mkdir(parents=True, exist_ok=True)
    reset_work(root)
    probes = corpus(make_fixtures(root), args.only)
    if args.list:
        print("\n".join(p.name for p in probes))
        return
    import diffusers  # noqa: F401  (imported once, as ditcli.cli.app: every forked probe starts from here)

    import ditcli.cli.app  # noqa: F401

    outcomes = []
    for index, probe in enumerate(probes):
        outcome = run_probe(probe, root, args.timeout, not args.subprocess)
        outcomes.append(outcome)
        if (index + 1) % 200 == 0:
            print(f"[{index + 1}/{len(probes)}] {sum(bool(o.problems) for o in outcomes)} failed so far", flush=True)
        if outcome.problems:
            print(f"[{index + 1}/{len(probes)}] FAIL {probe.name}: {'; '.join(outcome.problems)}\n    "
                  f"{' '.join(probe.argv)}\n    {outcome.stderr.splitlines()[-1] if outcome.stderr else ''}",
                  flush=True)
    if args.out:
        args.out.write_text("".join(json.dumps({"name": o.probe.name, "argv": o.probe.argv, "code": o.code,
                                                "problems": o.problems, "stderr": o.stderr[-600:],
                                                "seconds": round(o.seconds, 2)}) + "\n" for o in outcomes))
    print(json.dumps(tally(outcomes), indent=1))


if __name__ == "__main__":
    main()
