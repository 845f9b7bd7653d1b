"""A file's records are checked like the command line, and a file under a release's name is that release.

Every record field of our `.safetensors`, of a `dit train` checkpoint and of a diffusers folder (`model_index.json`,
`transformer/config.json` and the rest) is set to what a hostile file holds: NaN, infinity, a negative number, a huge
one, the wrong type, the wrong shape. Each such file must end `dit sample`, `dit convert` and `dit convert --info`
with exit code 2 and exactly one line, `error: <what> (<how to fix>)`, naming the file, with no traceback, and leave
every file as it was: the folders of inputs and outputs are hashed before and after. Each checker is also shown to
pass what is valid. Tiny models throughout: the whole file runs in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import ditcli
from ditcli.cli.app import app
from ditcli.diffusion.guidance import MAX_CFG
from ditcli.diffusion.objectives import DDPM, FlowObjective, objective_from_record
from ditcli.diffusion.samplers import MAX_STEPS, SamplingDefaults
from ditcli.errors import UserError
from ditcli.model.dit import DiT, DiTConfig
from ditcli.sampling.config import GenerateConfig
from ditcli.weights import registry
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.diffusers_format import to_diffusers
from ditcli.weights.ema import EmaRecord
from ditcli.weights.fields import (
    Field,
    check_defaults_fit,
    read_class_names,
    read_codec,
    read_config,
    read_ema,
    read_sampling,
    read_schedule,
)
from ditcli.weights.locate import find_checkpoint, verify_known
from ditcli.weights.record import Checkpoint

ONE_LINE = re.compile(r"^error: \S.*\S \(\S.*\)$")  # error: <what> (<how to fix>)
CONFIG = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=2)
CODEC = {"kind": "pixel", "channels": 1}
SAMPLING = {"sampler": "ddim", "steps": 2, "cfg": 1.5, "interval": [0.0, 700.0], "channels": "all"}
EMA = {"decay": 0.999, "warmup": True, "steps": 10, "from_source": False}
# What a hostile file holds where a number, a name or an object belongs.
BAD = {"nan": float("nan"), "inf": float("inf"), "negative": -1, "huge": 10**30, "string": "2", "list": [2],
       "object": {"a": 1}}


def accepted(*args) -> None:
    """`dit ARGS` must succeed: the valid file each sweep starts from passes every command."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def refused(args: list, *fragments: str) -> str:
    """`dit ARGS` must end with exit code 2 and one `error: <what> (<how to fix>)` line naming every fragment."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, f"exit code {result.exit_code}: {result.output}"
    assert len(lines) == 1 and ONE_LINE.match(lines[0]), result.output
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]}"
    return lines[0]


def tree(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`, with the sha256 of each file's bytes."""
    found = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            found[str(path)] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def all_refused(path: Path, work: Path, *fragments: str, commands: str = "sample") -> None:
    """`dit sample` (and with `commands="all"` also `dit convert` and `--info`) refuse `path`, naming it, and change
    nothing under its folder or the working folder."""
    before = tree(path.parent, work)
    runs = [["sample", "--ckpt", path, "--num", 2, "--out", work / "out"]]
    if commands == "all":
        runs += [["convert", path, work / "out.safetensors"], ["convert", "--info", path]]
    for args in runs:
        refused(args, str(path), *fragments)
    assert tree(path.parent, work) == before, "files were created or changed"


@pytest.fixture
def work(tmp_path, offline, monkeypatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("DIT_OFFLINE", "1")
    return folder


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return DiT(CONFIG).state_dict()


# Our .safetensors: every metadata record.

@pytest.fixture(scope="module")
def metadata(state, tmp_path_factory) -> dict[str, str]:
    """The metadata of a valid file, every record present."""
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_safetensors(Checkpoint(state, CONFIG, "safetensors", "ema", ["a", "b"], CODEC,
                                sampling=SamplingDefaults.from_dict(SAMPLING), ema=EmaRecord.from_dict(EMA)), path)
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def safetensors_with(folder: Path, state: dict, metadata: dict, key: str, value, field: str | None = None) -> Path:
    """A copy of the file whose metadata `key` (or the `field` of its JSON record) holds `value`."""
    metadata = dict(metadata)
    if field is None:
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    else:
        metadata[key] = json.dumps({**json.loads(metadata[key]), field: value})
    folder.mkdir(exist_ok=True)
    save_file(state, str(folder / "m.safetensors"), metadata=metadata)
    return folder / "m.safetensors"


def test_the_valid_file_samples_and_converts(state, metadata, work, tmp_path):
    path = safetensors_with(tmp_path / "in", state, metadata, "weights", "ema")
    checkpoint = load_checkpoint(path)
    assert checkpoint.sampling == SamplingDefaults.from_dict(SAMPLING) and checkpoint.ema == EmaRecord.from_dict(EMA)
    assert checkpoint.config == CONFIG and checkpoint.codec == CODEC and checkpoint.class_names == ["a", "b"]
    accepted("sample", "--ckpt", path, "--num", 1, "--out", work / "out")
    accepted("convert", path, work / "out.safetensors")


JSON_RECORDS = [("config", field) for field in [*CONFIG.to_dict(), "mean_flow_form", "decoupled_depth"]]
JSON_RECORDS += [("sampling", field) for field in SAMPLING] + [("ema", field) for field in EMA]
JSON_RECORDS += [("codec", field) for field in ("kind", "channels", "vae", "scale")]


@pytest.mark.parametrize("key, field", JSON_RECORDS, ids=[f"{k}.{f}" for k, f in JSON_RECORDS])
def test_every_field_of_a_safetensors_record(key, field, state, metadata, work, tmp_path):
    for name, value in BAD.items():
        path = safetensors_with(tmp_path / name, state, metadata, key, value, field)
        all_refused(path, work, key if key != "config" else "model config", field)


TEXT_KEYS = ["config", "sampling", "ema", "codec", "class_names", "schedule", "weights", "objective", "trained_cfg"]


@pytest.mark.parametrize("key", TEXT_KEYS)
def test_every_metadata_key_set_to_a_bad_value(key, state, metadata, work, tmp_path):
    """Each key as a number, NaN, a string of the wrong kind, a list, an object, and malformed JSON."""
    for name, value in {**BAD, "malformed": "{[", "deep": "[" * 100_000}.items():
        path = safetensors_with(tmp_path / name, state, metadata, key, value)
        all_refused(path, work, key if key != "config" else "model config",
                    commands="all" if name == "nan" else "sample")


def test_extra_safetensors_cases(state, metadata, work, tmp_path):
    """Interval ends, a direction of a flow model, a class count, and the tensors against the config."""
    flow = {**metadata, "objective": "flow", "time_direction": "noise-to-data"}
    cases = [("sampling", {**SAMPLING, "interval": [float("nan"), 1.0]}, "interval"),
             ("sampling", {**SAMPLING, "interval": [700.0, 1.0]}, "low > high"),
             ("sampling", {**SAMPLING, "steps": MAX_STEPS + 1}, "10,000"),
             ("sampling", {**SAMPLING, "cfg": MAX_CFG * 2}, "cfg"),
             ("sampling", {**SAMPLING, "sampler": "dopri5", "interval": None}, "dopri5"),  # a flow model's only
             ("class_names", ["a"], "1 names"), ("config", {**CONFIG.to_dict(), "depth": 3}, "does not match"),
             ("config", {**CONFIG.to_dict(), "num_heads": 3}, "not divisible"),
             ("config", {**CONFIG.to_dict(), "patch_size": 3}, "not divisible"),
             ("config", {**CONFIG.to_dict(), "bogus": 1}, "unknown field"),
             ("ema", {**EMA, "decay": 1.0}, "decay"), ("codec", {"kind": "vae", "vae": ""}, "names no 'vae'"),
             ("codec", {"kind": "pixel", "vae": "ema"}, "unknown field 'vae'")]
    for i, (key, value, fragment) in enumerate(cases):
        all_refused(safetensors_with(tmp_path / f"c{i}", state, metadata, key, value), work, fragment)
    for i, direction in enumerate(["nan", "sideways", "[1]"]):
        all_refused(safetensors_with(tmp_path / f"d{i}", state, flow, "time_direction", direction), work, "objective")
    shapes = {**state, "x_embedder.proj.weight": torch.zeros(3, 3)}
    path = safetensors_with(tmp_path / "shape", shapes, metadata, "weights", "ema")
    all_refused(path, work, "x_embedder.proj.weight", commands="all")


def test_what_no_shape_tells_must_be_recorded_right(state, metadata, work, tmp_path):
    """Found from the outside (benchmarks/hostile_probe.py): weights of an integer dtype ended in a traceback; a
    config without its heads sampled DiTConfig's default 16, and a flow file whose objective was cut out sampled as
    DDPM, since no tensor's shape tells either."""
    ints = {**state, "t_embedder.mlp.0.bias": state["t_embedder.mlp.0.bias"].to(torch.int32)}
    all_refused(safetensors_with(tmp_path / "ints", ints, metadata, "weights", "ema"), work, "int32", commands="all")
    headless = {k: v for k, v in json.loads(metadata["config"]).items() if k != "num_heads"}
    all_refused(safetensors_with(tmp_path / "heads", state, metadata, "config", headless), work, "'num_heads'",
                commands="all")
    nameless = {k: v for k, v in metadata.items() if k != "objective"}  # a flow model's record that lost its name
    all_refused(safetensors_with(tmp_path / "lost", state, nameless, "time_direction", "noise-to-data"), work,
                "time_direction", "no objective", commands="all")


# A `dit train` checkpoint: its config, its train settings and every record beside the weights.

@pytest.fixture(scope="module")
def train_payload(state) -> dict:
    return {"format": "ditcli-train", "step": 10,
            "config": {"model": CONFIG.to_dict(), "train": {"schedule": "linear", "ema_decay": 0.999,
                                                            "ema_warmup": True}},
            "model": state, "ema": state, "class_names": ["a", "b"], "codec": CODEC, "sampling": SAMPLING,
            "objective": {"objective": "ddpm"}, "ema_record": EMA}


def train_with(folder: Path, payload: dict, keys: tuple, value) -> Path:
    """A copy of the checkpoint whose entry at `keys` (a path into the nested dicts) holds `value`; None deletes."""
    payload = copy.deepcopy(payload)
    target = payload
    for key in keys[:-1]:
        target = target[key]
    if value is None:
        target.pop(keys[-1], None)
    else:
        target[keys[-1]] = value
    folder.mkdir(exist_ok=True)
    torch.save(payload, folder / "ckpt.pt")
    return folder / "ckpt.pt"


def test_the_valid_training_checkpoint_samples(train_payload, work, tmp_path):
    path = train_with(tmp_path, train_payload, ("step",), 10)
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 10 and checkpoint.ema == EmaRecord.from_dict(EMA) and checkpoint.schedule == "linear"
    accepted("sample", "--ckpt", path, "--num", 1, "--out", work / "out")


TRAIN_FIELDS = [("config",), ("config", "model"), ("config", "train"), ("config", "train", "schedule"), ("step",),
                ("class_names",), ("codec",), ("sampling",), ("objective",), ("objective", "objective"),
                ("ema_record",), ("ema",)]
TRAIN_FIELDS += [("config", "model", field) for field in CONFIG.to_dict()]
TRAIN_FIELDS += [("sampling", field) for field in SAMPLING] + [("ema_record", field) for field in EMA]
TRAIN_FIELDS += [("codec", "kind"), ("codec", "channels")]


@pytest.mark.parametrize("keys", TRAIN_FIELDS, ids=[".".join(keys) for keys in TRAIN_FIELDS])
def test_every_field_of_a_training_checkpoint(keys, train_payload, work, tmp_path):
    for name, value in BAD.items():
        if keys == ("config", "train") and name == "object":
            continue  # the train settings are a free dict: {"a": 1} is one without settings
        path = train_with(tmp_path / name, train_payload, keys, value)
        all_refused(path, work, commands="all" if name == "huge" else "sample")


def test_the_ema_settings_of_an_older_training_checkpoint(train_payload, work, tmp_path):
    """Without an ema_record, the EMA is read from the train settings: its decay is checked as --ema-decay."""
    older = dict(train_payload)
    older.pop("ema_record")
    for name, value in BAD.items():
        path = train_with(tmp_path / name, older, ("config", "train", "ema_decay"), value)
        all_refused(path, work, "ema_decay")
    weights = train_with(tmp_path / "weights", train_payload, ("ema", "pos_embed"), [1.0])
    all_refused(weights, work, "pos_embed")


def test_a_reference_train_checkpoint_with_bad_arguments(state, work, tmp_path):
    for name, value in {**BAD, "unknown model": "DiT-Q/3"}.items():
        for arg in ("image_size", "num_classes", "model"):
            if name == "unknown model" and arg != "model":
                continue
            (tmp_path / name).mkdir(exist_ok=True)
            path = tmp_path / name / f"{arg}.pt"
            torch.save({"model": state, "ema": state, "args": {"model": "DiT-S/2", arg: value}}, path)
            all_refused(path, work, "args")


# A diffusers folder: model_index.json and its _ditcli record, the transformer's config.json, the scheduler, the VAE.

@pytest.fixture(scope="module")
def pipeline(state, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipe") / "pipe"
    to_diffusers(Checkpoint(state, CONFIG, "safetensors", "ema", ["a", "b"], CODEC,
                            sampling=SamplingDefaults.from_dict(SAMPLING), ema=EmaRecord.from_dict(EMA)), folder)
    return folder


def pipeline_with(folder: Path, pipeline: Path, file: str, keys: tuple, value) -> Path:
    """A copy of the folder whose JSON `file` holds `value` at `keys` (None deletes; `()` replaces the file's text)."""
    import shutil

    shutil.copytree(pipeline, folder)
    path = folder / file
    if not keys:
        path.write_text(value if isinstance(value, str) else json.dumps(value))
        return folder
    data = json.loads(path.read_text())
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is None:
        target.pop(keys[-1])
    else:
        target[keys[-1]] = value
    path.write_text(json.dumps(data))
    return folder


INDEX_FIELDS = [("model_index.json", keys) for keys in [
    (), ("_ditcli",), ("id2label",), ("_ditcli", "weights"), ("_ditcli", "schedule"), ("_ditcli", "sampling"),
    ("_ditcli", "ema"), ("_ditcli", "codec"), ("_ditcli", "timestep_convention"),
    *[("_ditcli", "sampling", field) for field in SAMPLING], *[("_ditcli", "ema", field) for field in EMA]]]
INDEX_FIELDS += [("transformer/config.json", keys) for keys in [
    (), ("num_layers",), ("num_attention_heads",), ("attention_head_dim",), ("in_channels",), ("out_channels",),
    ("sample_size",), ("patch_size",), ("num_embeds_ada_norm",), ("norm_eps",)]]


@pytest.mark.parametrize("file, keys", INDEX_FIELDS, ids=[f"{f}:{'.'.join(k)}" for f, k in INDEX_FIELDS])
def test_every_field_of_a_diffusers_folder(file, keys, pipeline, work, tmp_path):
    for name, value in {**BAD, **({"malformed": "{[", "deep": "[" * 100_000} if not keys else {})}.items():
        if keys in ((), ("_ditcli",)) and file == "model_index.json" and name == "object":
            continue  # an index, or our entry in it, that records nothing: a folder from another tool
        folder = pipeline_with(tmp_path / name, pipeline, file, keys, value)
        all_refused(folder, work, commands="all" if name == "inf" else "sample")


def test_a_falsy_record_is_a_bad_record_not_none(pipeline, train_payload, work, tmp_path):
    """`"codec": 0` or `[]` in model_index.json, and an objective or EMA record of 0 or [] in a training checkpoint,
    were read as no record at all."""
    for i, value in enumerate([0, [], False, ""]):
        folder = pipeline_with(tmp_path / f"c{i}", pipeline, "model_index.json", ("_ditcli", "codec"), value)
        all_refused(folder, work, "_ditcli.codec record")
        for key in ("objective", "ema_record"):
            all_refused(train_with(tmp_path / f"{key}{i}", train_payload, (key,), value), work, f"{key} record")


def test_the_valid_folder_reads_and_its_other_files_are_checked(pipeline, work, tmp_path):
    checkpoint = load_checkpoint(pipeline)
    assert checkpoint.sampling == SamplingDefaults.from_dict(SAMPLING) and checkpoint.class_names == ["a", "b"]
    accepted("sample", "--ckpt", pipeline, "--num", 1, "--out", work / "out")
    for i, betas in enumerate([["a"], [float("nan")] * 1000, 5, [2.0] * 1000]):
        folder = pipeline_with(tmp_path / f"b{i}", pipeline, "model_index.json", ("_ditcli",), None)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"trained_betas": betas}))
        all_refused(folder, work, "trained_betas")
    for i, scale in enumerate(["x", float("nan"), -1]):
        folder = pipeline_with(tmp_path / f"v{i}", pipeline, "model_index.json", ("_ditcli", "codec"), None)
        (folder / "vae").mkdir()
        (folder / "vae" / "config.json").write_text(json.dumps({"scaling_factor": scale}))
        all_refused(folder, work, "scaling_factor")
    weights = pipeline / "transformer" / "diffusion_pytorch_model.safetensors"
    folder = pipeline_with(tmp_path / "shape", pipeline, "model_index.json", ("id2label",), None)
    with safe_open(str(weights), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open handle is no dict
    tensors["proj_out_2.weight"] = torch.zeros(5)
    save_file(tensors, str(folder / "transformer" / weights.name))
    all_refused(folder, work, "proj_out_2.weight", commands="all")


# Through a real process: the one line is on stderr, nothing on stdout.

def test_a_real_process_prints_one_line_on_stderr(state, metadata, tmp_path):
    path = safetensors_with(tmp_path / "in", state, metadata, "sampling", {**SAMPLING, "steps": 10_000_000})
    env = {**os.environ, "DIT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "DIT_HOME": str(tmp_path / "home")}
    before = tree(tmp_path)
    run = subprocess.run([sys.executable, "-m", "ditcli", "sample", "--ckpt", str(path), "--out", "out"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert run.returncode == 2 and run.stdout == "", run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE.match(lines[0]) and "sampling record" in lines[0], run.stderr
    assert tree(tmp_path) == before


# `dit convert` writes no default that `dit sample` refuses.

@pytest.fixture
def source(state, tmp_path) -> Path:
    save_safetensors(Checkpoint(state, CONFIG, "safetensors", "ema", codec=CODEC), tmp_path / "src.safetensors")
    return tmp_path / "src.safetensors"


@pytest.mark.parametrize("options, fragments", [
    (["--steps", 10_000_000], ["--steps", "10,000"]), (["--cfg", 101], ["--cfg 101"]), (["--cfg", "nan"], ["--cfg"]),
    (["--sampler", "ddpm", "--steps", 2000], ["2000 steps"]), (["--sampler", "ddim", "--steps", 1001], ["1001"]),
])
def test_convert_refuses_defaults_sample_would_refuse(options, fragments, source, work):
    before = tree(source.parent)
    refused(["convert", source, work / "out.safetensors", *options], *fragments)
    assert tree(source.parent) == before and not (work / "out.safetensors").exists()


def test_convert_records_defaults_at_the_limits(source, work):
    for options, sampling in ((["--sampler", "ddpm", "--steps", 1000, "--cfg", MAX_CFG], ("ddpm", 1000, MAX_CFG)),
                              (["--sampler", "ddim", "--steps", 1], ("ddim", 1, 4.0))):
        out = work / f"{sampling[0]}.safetensors"
        result = CliRunner().invoke(app, ["convert", str(source), str(out), *map(str, options)])
        assert result.exit_code == 0, result.output
        recorded = load_checkpoint(out).sampling
        assert (recorded.sampler, recorded.steps, recorded.cfg) == sampling


def test_convert_refuses_to_copy_a_source_record_sample_refuses(state, work, tmp_path):
    """A file from before the check, recording DDPM at 2,000 steps: read and described, but neither copied by `dit
    convert` nor sampled."""
    path = tmp_path / "old.safetensors"
    save_safetensors(Checkpoint(state, CONFIG, "safetensors", "ema", codec=CODEC,
                                sampling=SamplingDefaults("ddpm", 2000, 1.0)), path)
    assert CliRunner().invoke(app, ["convert", "--info", str(path)]).exit_code == 0
    refused(["convert", path, work / "out.safetensors"], "dit convert would record", "2000")
    refused(["sample", "--ckpt", path, "--num", 1, "--out", work / "out"], "2000")
    assert list(work.iterdir()) == []


# Known release files are verified before they are trusted.

def test_the_shipped_weights_are_what_the_registry_names():
    for entry in {e.filename: e for e in registry.REGISTRY.values() if e.sha256}.values():
        path = registry.CHECKOUT_WEIGHTS / entry.filename
        assert path.stat().st_size == entry.size, f"{entry.filename}: update its size in the registry"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256, f"{entry.filename}: update its sha256"
    for name, file in (("fashion-mnist", "fashion-mnist-meanflow"), ("fashion-mnist-flow", "fashion-mnist")):
        path, entry = find_checkpoint(name, None, None, offline=True)
        assert path == registry.CHECKOUT_WEIGHTS / f"{file}.safetensors" and entry.model == name


@pytest.mark.parametrize("model", ["SiT-XL/2", "DiT-XL/2"])
def test_a_small_model_under_a_release_name_is_refused(model, state, work, tmp_path):
    home = Path(os.environ["DIT_HOME"])
    home.mkdir()
    torch.save(state, home / registry.known_weights(model).filename)  # a 2-block model where the release belongs
    before = tree(home, work)
    refused(["sample", "--model", model, "--out", work / "out"], f"not {model} as released", "blocks")
    assert tree(home, work) == before
    with pytest.raises(UserError, match="as released"):
        ditcli.load_model(model)


def test_an_embedded_model_replaced_in_the_home_folder_is_refused(state, work, tmp_path):
    home = Path(os.environ["DIT_HOME"])
    home.mkdir()
    file = registry.known_weights("fashion-mnist").filename
    save_safetensors(Checkpoint(state, CONFIG, "safetensors", "ema", codec=CODEC), home / file)
    refused(["sample", "--model", "fashion-mnist", "--out", work / "out"], "not fashion-mnist as released", "bytes")
    payload = bytearray((registry.CHECKOUT_WEIGHTS / file).read_bytes())
    payload[-100] ^= 1  # one bit of one weight: the same size, another file
    (home / file).write_bytes(bytes(payload))
    before = tree(home, work)
    refused(["sample", "--model", "fashion-mnist", "--out", work / "out"], "sha256")
    assert tree(home, work) == before


def test_the_shape_check_passes_the_release_and_refuses_another(state, pipeline, monkeypatch, tmp_path):
    entry = registry.KnownWeights("Test", 256, "Test.pt", preset="DiT-S/2")
    monkeypatch.setattr(registry.KnownWeights, "config", lambda self: CONFIG)  # the tiny model is "the release"
    torch.save(state, tmp_path / "Test.pt")
    verify_known(entry, tmp_path / "Test.pt")
    verify_known(entry, pipeline)  # its hub copy, a diffusers folder
    deeper = DiT(dataclasses.replace(CONFIG, depth=3)).state_dict()
    torch.save(deeper, tmp_path / "Test.pt")
    with pytest.raises(UserError, match="not Test as released: .*3 blocks found, expected 2"):
        verify_known(entry, tmp_path / "Test.pt")
    monkeypatch.setattr(registry.KnownWeights, "config", lambda self: dataclasses.replace(CONFIG, num_classes=3))
    with pytest.raises(UserError, match="num_classes 2 .the release's 3."):
        verify_known(entry, pipeline)


# Each checker passes what is valid and refuses what is not.

def test_a_field_checks_its_type_range_and_choices():
    decay = Field(float, 0, 1, open="high")
    assert [decay.problem(v) for v in (0, 0.5, 0.999)] == [None, None, None]
    assert all(decay.problem(v) for v in (1, -0.1, float("nan"), float("inf"), True, "0.5", None, [0.5]))
    steps = Field(int, 1, MAX_STEPS)
    assert steps.problem(MAX_STEPS) is None and steps.problem(1) is None
    assert all(steps.problem(v) for v in (0, MAX_STEPS + 1, 2.0, True, "2"))
    assert Field(str, choices=("a",)).problem("a") is None and Field(str, choices=("a",)).problem("b")


def test_each_reader_passes_a_valid_record_and_refuses_an_invalid_one():
    assert read_config(CONFIG.to_dict(), "f") == CONFIG
    assert read_config({**CONFIG.to_dict(), "mlp_ratio": 4}, "f").mlp_ratio == 4.0  # an int where a float belongs
    assert read_sampling(json.dumps(SAMPLING), "f") == SamplingDefaults.from_dict(SAMPLING)
    assert read_sampling(None, "f") is None and read_ema(EMA, "f") == EmaRecord.from_dict(EMA)
    assert read_codec(json.dumps(CODEC), "f") == CODEC and read_schedule(None, "f") == "linear"
    assert read_class_names('["a", "b"]', "f", 2) == ["a", "b"]
    for read, value in ((read_config, {**CONFIG.to_dict(), "depth": True}), (read_sampling, {**SAMPLING, "steps": 0}),
                        (read_ema, {**EMA, "steps": -1}), (read_codec, {"kind": "latent"}),
                        (read_schedule, "cubic")):
        with pytest.raises(UserError, match="^f records an unusable"):
            read(value, "f")


def test_the_record_types_and_the_run_keep_the_command_lines_limits():
    assert SamplingDefaults("ddpm", MAX_STEPS, MAX_CFG).steps == MAX_STEPS
    for fields in (("ddpm", MAX_STEPS + 1, 1.0), ("ddpm", 2, MAX_CFG + 1), ("ddpm", 2, float("nan"))):
        with pytest.raises(UserError):
            SamplingDefaults(*fields)
    with pytest.raises(UserError, match="interval"):
        SamplingDefaults("ddpm", 2, 1.0, (0.0, float("inf")))
    assert GenerateConfig((0,), steps=MAX_STEPS).steps == MAX_STEPS
    with pytest.raises(UserError, match="steps"):
        GenerateConfig((0,), steps=10_000_000)


def test_objective_records_are_typed():
    assert objective_from_record("flow", "noise-to-data") == FlowObjective("noise-to-data")
    assert objective_from_record(None) == DDPM
    for record in ((["flow"], None, None), ("flow", 5, None), ("meanflow", "noise-to-data", "nan"),
                   ("meanflow", "noise-to-data", True), ("meanflow", "noise-to-data", 10**400), ("ddpm", None, "2"),
                   ("meanflow", "noise-to-data", "-1"), ("meanflow", "noise-to-data", "1000")):
        with pytest.raises(UserError, match="^f records"):
            objective_from_record(record[0], record[1], "f", record[2])


def test_defaults_are_checked_against_their_model():
    defaults = SamplingDefaults("ddpm", 1000, 4.0)
    check_defaults_fit(defaults, DDPM, CONFIG, "linear", "f records", plan=True)
    for bad, config in ((SamplingDefaults("dopri5", 9, 4.0), CONFIG), (SamplingDefaults("ddpm", 2000, 4.0), CONFIG),
                        (defaults, dataclasses.replace(CONFIG, class_dropout_prob=0.0))):
        with pytest.raises(UserError, match="f records sampling defaults that dit sample refuses"):
            check_defaults_fit(bad, DDPM, config, "linear", "f records", plan=True)
    flow = SamplingDefaults("euler", 9, 4.0, (0.0, 700.0))  # an interval in training timesteps, not flow time
    with pytest.raises(UserError, match="flow time"):
        check_defaults_fit(flow, FlowObjective(), CONFIG, "linear", "f records")
