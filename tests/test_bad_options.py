"""Every option checked before anything is written or computed (issue 33), through the front door.

- Every option that names a file, a folder, a package or a reference, given a bad one, ends with exit code 2 and one
  line `error: <what> (<how to fix>)`, and leaves every file as it found it: the working folder, the inputs, the home
  folder (DIT_HOME) and the temporary folder are hashed before and after.
- An option the run would not use is refused in one line, never kept and recorded as if used.
- A refused `--resume` leaves the run folder as it was, its metrics.jsonl included.
- Files from elsewhere that `dit sample` reads given --objective and --time-direction (SiT, REPA) start a fine-tune
  and list their classes the same way.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import sys
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturbed, tiny_config
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.diffusion.objectives import MeanFlowObjective
from ditcli.model.dit import DiT
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

ONE_LINE = re.compile(r"^error: \S.*\S \(\S.*\)$")  # error: <what> (<how to fix>)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# A tiny pixel-space recipe: 8x8 grayscale, a 2-block 32-wide DiT, one step.
TINY = ["--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size", "8",
        "--channels", "1", "--vae", "none", "--global-batch", "4", "--steps", "1", "--log-every", "1"]
TINY_CONFIG = {"model": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2, "image_size": 8, "channels": 1,
               "vae": None, "global_batch": 4, "steps": 1, "ema_decay": 0.0}
SIT = "SiT-XL-2-256x256.pt"  # the name SiT's download.py gives its release: how a bare state dict is known as SiT's
FLOW_SIT = ["--objective", "flow", "--time-direction", "noise-to-data"]
FLOW_REPA = ["--objective", "flow", "--time-direction", "data-to-noise"]


def make_fixtures(fx: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(fx / "good.npz", images=rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), labels=np.arange(8) % 2,
             class_names=np.array(["a", "b"]))
    np.savez(fx / "ref.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.savez(fx / "dinov2-stats.npz", mu=np.zeros(4), sigma=np.eye(4), feature_extractor=np.array("dinov2"))
    np.savez(fx / "dinov2-ref.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
             feature_extractor=np.array("dinov2"))
    np.savez(fx / "inception-stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    (fx / "text.npz").write_text("not a zip\n")
    for name in ("garbage.safetensors", "garbage.pt"):
        (fx / name).write_bytes(bytes(range(256)) * 4)
    (fx / "afile").write_text("a file, not a folder\n")
    (fx / "emptydir").mkdir()
    # A SiT release and a REPA checkpoint in miniature: DiT's layout, no record of their objective (REPA's
    # alignment projectors tell it apart); pixel space, so that a tiny run can fine-tune them.
    state = perturbed(DiT(tiny_config(in_channels=1, num_classes=2)), std=0.02).state_dict()
    torch.save(state, fx / SIT)
    torch.save({**state, "projectors.0.0.weight": torch.zeros(8, 32), "projectors.0.0.bias": torch.zeros(8)},
               fx / "repa.pt")
    # DMF's release in miniature: DiT's layout plus its training-only log-variance head; and our mean-flow file.
    torch.save({**state, "logvar_linear.weight": torch.zeros(1, 32), "logvar_linear.bias": torch.zeros(1)},
               fx / "DMF-tiny.pt")
    decoupled = tiny_config(in_channels=1, num_classes=2, mean_flow_form="decoupled", decoupled_depth=1)
    save_safetensors(Checkpoint(state, decoupled, "safetensors", "ema", codec={"kind": "pixel", "channels": 1},
                                objective=MeanFlowObjective()), fx / "meanflow.safetensors")
    latent = DiT(tiny_config())  # a latent model that records no codec: the SD VAE's 4 channels
    save_safetensors(Checkpoint(latent.state_dict(), latent.config, "safetensors", "ema"), fx / "latent.safetensors")
    for objective in ("ddpm", "flow"):  # one step of our own training of each objective
        Trainer(TrainConfig(data=str(fx / "good.npz"), out=str(fx / objective), objective=objective,
                            **TINY_CONFIG)).run()


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fixtures")
    make_fixtures(root)
    return root


def digest(*roots: Path) -> dict[str, str | None]:
    """Every path under `roots` with its content's sha256 (None for a folder): what a refused command must keep."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            found[str(path)] = None if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder with its own temporary folder and home, offline: nothing a command does escapes it."""
    folder = tmp_path / "work"
    (folder / ".tmp").mkdir(parents=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TMPDIR", str(folder / ".tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(folder / ".tmp"))
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    for name in ("DIT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    return folder


def refused(args: list, *roots: Path) -> str:
    """`dit ARGS`, which must end with exit code 2 and one error line, no traceback, and `roots` as they were; the
    line."""
    before = digest(*roots)
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and ONE_LINE.match(lines[0]), result.output
    assert digest(*roots) == before, "a refused command created or changed files"
    return lines[0]


def ok(*args) -> str:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def fill(args: list, fx: Path) -> list[str]:
    return [str(arg).replace("{fx}", str(fx)) for arg in args]


T = ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY]
EVAL = [*T, "--eval-every", "1", "--eval-num", "4"]
S = ["sample", "--ckpt", "{fx}/ddpm/ckpt-0000001.pt", "--num", "2", "--steps", "2", "--out", "out"]
F = ["fid", "{fx}/ref.npz", "--ref", "{fx}/ref.npz", "--features", "fashion-judge"]

# (id, argv, a text the error line must contain): a bad value for every option that names a file, a folder, a
# package or a reference.
PATHS: list[tuple[str, list[str], str]] = [
    ("train-data", ["train", "--data", "{fx}/missing.npz", "--out", "run", *TINY], "missing.npz"),
    ("train-out", ["train", "--data", "{fx}/good.npz", "--out", "{fx}/afile", *TINY], "afile"),
    ("train-resume", [*T, "--resume", "{fx}/garbage.pt"], "garbage.pt"),
    ("train-init-from-missing", [*T, "--init-from", "{fx}/missing.pt"], "missing.pt"),
    ("train-init-from-garbage", [*T, "--init-from", "{fx}/garbage.pt"], "garbage.pt"),
    ("train-vae", ["train", "--data", "{fx}/good.npz", "--out", "run", "--vae", "{fx}/emptydir", "--steps", "1"],
     "emptydir"),
    ("train-eval-ref-missing", [*EVAL, "--eval-ref", "{fx}/missing.npz"], "missing.npz"),
    ("train-eval-ref-unreadable", [*EVAL, "--eval-ref", "{fx}/text.npz"], "text.npz"),
    ("train-eval-ref-not-a-reference", [*EVAL, "--eval-ref", "{fx}/good.npz", "--eval-features", "fashion-judge"],
     "good.npz"),
    ("train-eval-ref-other-statistics", [*EVAL, "--eval-ref", "{fx}/dinov2-stats.npz"], "dinov2"),
    ("train-eval-ref-not-dinov2", [*EVAL, "--eval-ref", "{fx}/inception-stats.npz", "--eval-features", "dinov2"],
     "dinov2"),
    ("train-eval-features-unknown", [*EVAL, "--eval-ref", "{fx}/ref.npz", "--eval-features", "clip-xxl"],
     "clip-xxl"),
    ("train-eval-features-missing-file", [*EVAL, "--eval-ref", "{fx}/ref.npz", "--eval-features",
                                          "{fx}/missing.safetensors"], "missing.safetensors"),
    ("train-eval-features-garbage-safetensors", [*EVAL, "--eval-ref", "{fx}/ref.npz", "--eval-features",
                                                 "{fx}/garbage.safetensors"], "garbage.safetensors"),
    ("train-eval-features-garbage-torchscript", [*EVAL, "--eval-ref", "{fx}/ref.npz", "--eval-features",
                                                 "{fx}/garbage.pt"], "garbage.pt"),
    ("train-eval-features-dinov2-offline", [*EVAL, "--eval-ref", "{fx}/dinov2-ref.npz", "--eval-features",
                                            "dinov2"], "DINOv2 weights"),
    ("train-eval-features-inception-offline", [*EVAL, "--eval-ref", "{fx}/ref.npz"], "Inception"),
    ("train-dinov2-weights", [*EVAL, "--eval-ref", "{fx}/dinov2-ref.npz", "--eval-features", "dinov2",
                              "--dinov2-weights", "{fx}/missing.pth"], "missing.pth"),
    ("train-align-encoder-missing", [*T, "--align", "repa", "--align-encoder", "{fx}/missing.safetensors"],
     "missing.safetensors"),
    ("train-align-encoder-garbage", [*T, "--align", "repa", "--align-encoder", "{fx}/garbage.safetensors"],
     "garbage.safetensors"),
    ("train-log-wandb", [*T, "--log", "wandb"], "wandb"),
    ("train-log-tensorboard", [*T, "--log", "tensorboard"], "tensorboard"),
    ("sample-ckpt", ["sample", "--ckpt", "{fx}/missing.pt", "--out", "out"], "missing.pt"),
    ("sample-out", [*S[:-1], "{fx}/afile"], "afile"),
    ("sample-npz", [*S, "--npz", "{fx}/emptydir"], "emptydir"),
    ("sample-vae", ["sample", "--ckpt", "{fx}/latent.safetensors", "--vae", "{fx}/emptydir", "--out", "out"],
     "emptydir"),
    ("sample-compile-home-a-file", [*S, "--compile"], "DIT_HOME"),
    ("sample-compile-package-folder", [*S, "--compile"], "aoti"),
    ("classes-ckpt", ["classes", "--ckpt", "{fx}/garbage.pt"], "garbage.pt"),
    ("fid-samples", ["fid", "{fx}/missing.npz", "--ref", "{fx}/ref.npz"], "missing.npz"),
    ("fid-ref", ["fid", "{fx}/ref.npz", "--ref", "{fx}/text.npz"], "text.npz"),
    ("fid-features", [*F[:-1], "{fx}/garbage.safetensors"], "garbage.safetensors"),
    ("fid-inception-weights", [*F[:-2], "--inception-weights", "{fx}/garbage.pt"], "garbage.pt"),
    ("fid-dinov2-weights", ["fid", "--make-ref", "{fx}/good.npz", "-o", "ref.npz", "--features", "dinov2",
                            "--dinov2-weights", "{fx}/missing.pth"], "missing.pth"),
    ("fid-make-ref", ["fid", "--make-ref", "{fx}/missing", "-o", "ref.npz"], "missing"),
    ("fid-output", ["fid", "--make-ref", "{fx}/good.npz", "-o", "{fx}/afile/ref.npz"], "afile"),
    ("convert-src", ["convert", "{fx}/garbage.pt", "o.safetensors"], "garbage.pt"),
    ("convert-dst", ["convert", "{fx}/flow/ckpt-0000001.pt", "{fx}/afile/o.safetensors"], "afile"),
    ("convert-info", ["convert", "--info", "{fx}/missing.pt"], "missing.pt"),
    ("convert-vae", ["convert", "{fx}/latent.safetensors", "pipe", "--to", "diffusers", "--vae", "{fx}/emptydir"],
     "emptydir"),
]


def bad_home(case: str, home: Path) -> None:
    """The home folders the compile cases break: DIT_HOME a file, or its package folder a file."""
    if case == "sample-compile-home-a-file":
        home.write_text("not a folder\n")
    elif case == "sample-compile-package-folder":
        home.mkdir()
        (home / "aoti").write_text("not a folder\n")


@pytest.mark.parametrize("case", PATHS, ids=[case[0] for case in PATHS])
def test_a_bad_path_option_is_one_line_and_writes_nothing(case, fx, work, tmp_path, monkeypatch):
    name, argv, mentions = case
    monkeypatch.setitem(sys.modules, "wandb", None)  # neither tracker package is installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    bad_home(name, tmp_path / "home")
    line = refused(fill(argv, fx), fx, work, tmp_path / "home")
    assert mentions.lower() in line.lower(), line
    assert not (tmp_path / "home").exists() or name.startswith("sample-compile")


# Options that name a file but are typed as text, so that the sweep below cannot find them by their type.
TEXT_PATHS = {"train": {"--data", "--out", "--resume", "--init-from", "--vae", "--eval-ref", "--eval-features",
                        "--log", "--align-encoder", "--dinov2-weights"},
              "sample": {"--vae"}, "fid": {"--make-ref", "--features", "--dinov2-weights"}, "convert": {"--vae"}}


def path_options(command: str) -> list[tuple[str, ...]]:
    """The options of `dit COMMAND` that name a file or folder, each as its spellings: those declared as paths
    (arguments, such as SRC, named in upper case), and the text ones of TEXT_PATHS."""
    function = getattr(importlib.import_module(f"ditcli.cli.{command}"), command)
    found = [(flag,) for flag in TEXT_PATHS.get(command, ())]
    for name, parameter in inspect.signature(function, eval_str=True).parameters.items():
        kind, *extras = typing.get_args(parameter.annotation) or (parameter.annotation,)
        if Path in (kind, *typing.get_args(kind)):
            # In an Annotated alias Typer reads its first flag as the OptionInfo's default.
            decls = [decl for extra in extras for decl in (getattr(extra, "default", None),
                                                           *(getattr(extra, "param_decls", None) or ()))
                     if isinstance(decl, str) and decl.startswith("-")]
            found.append(tuple(decl for option in decls for decl in option.split("/")) or (name.upper(),))
    return found


@pytest.mark.parametrize("command", ["train", "sample", "classes", "fid", "convert"])
def test_the_sweep_covers_every_option_that_names_a_file(command):
    swept = {arg for _, argv, _ in PATHS if argv[0] == command for arg in argv if arg.startswith("-")}
    swept |= {"fid": {"SAMPLES"}, "convert": {"SRC", "DST"}}.get(command, set())  # the cases' first argument
    missing = [spellings[0] for spellings in path_options(command) if not swept & set(spellings)]
    assert not missing, f"no bad-path case for dit {command} {', '.join(missing)}"


def test_read_only_homes_and_outputs_are_found_before_any_work(fx, work, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    if IS_ROOT:  # root writes through permissions: let the folder at least say it is read-only, as a mount would
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
            False if Path(path).absolute() == home and mode & os.W_OK else access(path, mode, *a, **k)))
    try:
        line = refused(fill([*S, "--compile"], fx), fx, work, home)
        assert "DIT_HOME" in line and "--no-compile" in line
    finally:
        home.chmod(0o755)


# (argv, a text the error line must contain): options the run would not use.
INAPPLICABLE = [
    ([*T, "--time-direction", "noise-to-data"], "--time-direction only applies to --objective flow or meanflow"),
    ([*T, "--objective", "ddpm", "--time-direction", "data-to-noise"], "--time-direction only applies"),
    ([*T, "--objective", "flow", "--interval-ratio", "0.25"], "--interval-ratio only applies to --objective meanflow"),
    ([*T, "--objective", "flow", "--schedule", "linear"], "--schedule only applies to --objective ddpm"),
    ([*T, "--objective", "meanflow", "--train-omega", "1"], "--train-omega only applies with --train-guidance"),
    ([*T, "--eval-features", "nothing-by-this-name"], "--eval-features only applies with --eval-every"),
    ([*T, "--eval-ref", "{fx}/ref.npz"], "--eval-ref only applies with --eval-every"),
    ([*T, "--eval-steps", "3"], "--eval-steps only applies with --eval-every"),
    ([*T, "--objective", "flow", "--eval-every", "1", "--eval-ref", "{fx}/ref.npz", "--eval-features",
      "fashion-judge", "--eval-sampler", "dopri5", "--eval-steps", "3"], "does not take --eval-steps"),
    ([*T, "--init-weights", "model"], "--init-weights only applies with --init-from"),
    ([*T, "--force"], "--force only applies with --resume"),
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--sampler", "euler", "--atol", "1e-4"],
     "--atol only applies to --sampler dopri5, and this run uses euler"),
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--sampler", "heun", "--rtol", "1e-2"],
     "--rtol only applies to --sampler dopri5"),
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--sampler", "dopri5", "--time-shift", "3"],
     "--time-shift only applies to --sampler euler, heun, sde or flow-map, and this run uses dopri5"),
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--sampler", "dopri5", "--steps", "9"],
     "--sampler dopri5 does not take --steps"),
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--sampler", "flow-map"],
     "sampler 'flow-map' samples mean-flow models, and this is a flow-matching model"),
    ([*S, "--sampler", "flow-map"], "sampler 'flow-map' samples mean-flow models, and this is a DDPM model"),
    ([*S, "--cfg", "1", "--guidance-interval", "0,500"], "--guidance-interval only applies to a guided run"),
    (["classes", "--objective", "flow"], "--objective describes a file"),
    ([*F, "--force"], "--force only applies to --make-ref"),
    ([*F, "-o", "x.npz"], "-o only applies to --make-ref"),
]


@pytest.mark.parametrize("argv, message", INAPPLICABLE, ids=[f"{a[0]}-{m.split()[0]}" for a, m in INAPPLICABLE])
def test_an_option_the_run_would_not_use_is_refused(argv, message, fx, work, tmp_path):
    line = refused(fill(argv, fx), fx, work, tmp_path / "home")
    assert message in line, line


def test_the_settings_a_sampler_reads_are_taken_and_recorded(fx, work):
    ok(*fill(["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--num", "2", "--out", "a", "--sampler", "dopri5",
              "--atol", "1e-3", "--rtol", "1e-2"], fx))
    ok(*fill(["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--num", "2", "--out", "b", "--sampler", "euler",
              "--steps", "3", "--time-shift", "2"], fx))
    flows = [json.loads((work / name / "provenance.json").read_text())["flow_sampler"] for name in ("a", "b")]
    assert (flows[0]["atol"], flows[0]["rtol"], flows[1]["shift"]) == (1e-3, 1e-2, 2.0)


def interrupted_run(fx: Path, out: Path) -> Path:
    """A one-step run whose metrics.jsonl holds a row past its checkpoint, as a run stopped between the two leaves
    it; the log's path."""
    ok(*fill(["train", "--data", "{fx}/good.npz", "--out", out, *TINY], fx))
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 2, "loss": 1.0}) + "\n")
    return log


@pytest.mark.parametrize("extra, mentions", [
    (["--log", "wandb"], "wandb"),
    (["--lr", "1"], "configuration differs"),
    (["--eval-every", "1", "--eval-ref", "missing.npz"], "missing.npz"),
    (["--eval-every", "1", "--eval-ref", "REF", "--eval-features", "nothing-by-this-name"], "nothing-by-this-name"),
    (["--init-from", "{fx}/garbage.pt"], "garbage.pt"),
], ids=["tracker", "settings", "eval-ref", "eval-features", "init-from"])
def test_a_refused_resume_leaves_the_run_and_its_metrics_as_they_were(extra, mentions, fx, work, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    log = interrupted_run(fx, work / "run")
    extra = [str(fx / "ref.npz") if arg == "REF" else arg for arg in fill(extra, fx)]
    line = refused(["train", "--resume", "auto", "--out", "run", "--steps", "2", *extra], work)
    assert mentions in line and [json.loads(row)["step"] for row in log.read_text().splitlines()] == [1, 2]


def test_a_resume_that_goes_ahead_drops_the_rows_logged_past_its_checkpoint(fx, work):
    log = interrupted_run(fx, work / "run")
    ok("train", "--resume", "auto", "--out", "run", "--steps", "2")
    rows = [json.loads(row) for row in log.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and rows[1]["loss"] != 1.0  # step 2 trained again, logged once


@pytest.mark.parametrize("source, objective", [(SIT, FLOW_SIT), ("repa.pt", FLOW_REPA),
                                               (SIT, ["--objective", "meanflow", "--time-direction",
                                                      "noise-to-data", "--decoupled-depth", "1"])],
                         ids=["sit-flow", "repa-flow", "sit-meanflow"])
def test_a_sit_or_repa_file_starts_a_fine_tune_with_the_options_dit_sample_reads_it_with(source, objective, fx,
                                                                                          work):
    ok(*fill([*T, *objective, "--init-from", f"{{fx}}/{source}"], fx))
    started = json.loads((work / "run" / "run.json").read_text())
    assert started["train"]["init_from"].endswith(source)
    assert started["train"]["objective"] == objective[1]


def test_a_sit_file_without_the_options_is_refused_naming_them(fx, work):
    line = refused(fill([*T, "--init-from", f"{{fx}}/{SIT}"], fx), fx, work)
    assert "--objective flow --time-direction noise-to-data" in line


def test_dit_classes_reads_a_sit_file_with_the_options_dit_sample_takes(fx, work):
    line = refused(fill(["classes", "--ckpt", f"{{fx}}/{SIT}", "--num-heads", "2"], fx), fx, work)
    hinted = re.search(r"pass (--objective \S+ --time-direction [a-z-]+)", line).group(1).split()
    for given in (hinted, ["--time-direction", "data-to-noise"]):  # as the error says, or a time direction alone
        rows = json.loads(ok(*fill(["classes", "--ckpt", f"{{fx}}/{SIT}", "--num-heads", "2", "--json", *given],
                                   fx)))
        assert [row["id"] for row in rows] == [0, 1]


# Found by trying every option at its edges from the outside (benchmarks/hostile_probe.py).

EDGES = [
    # A time shift past fp32's reach: S = 1e-300 is 0 (a division by zero), 1e300 infinite (a NaN loss).
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--steps", "2", "--time-shift", "1e-300"],
     "time shift must be a finite number in [0.001, 1000]"),
    ([*T, "--objective", "flow", "--time-shift", "1e300"], "--time-shift must be a finite number in [0.001, 1000]"),
    # Tolerances no fp32 state meets: every dopri5 step was rejected until its 10,000-step limit.
    (["sample", "--ckpt", "{fx}/flow/ckpt-0000001.pt", "--out", "out", "--sampler", "dopri5", "--atol", "1e-300",
      "--rtol", "1e-300"], "atol and rtol must be finite numbers in [1e-10, 1]"),
    # A trained guidance scale that --cfg would refuse, or one below 0 (it was refused as if the run were a file).
    ([*T, "--objective", "meanflow", "--train-guidance", "meanflow", "--train-omega", "100", "--train-kappa", "0.99"],
     "trains guidance scale 10000, outside [0, 100]"),
    ([*T, "--objective", "meanflow", "--train-guidance", "meanflow", "--train-omega", "-5"],
     "--train-omega -5 with --train-kappa 0 trains guidance scale -5"),
    ([*T, "--objective", "meanflow", "--train-guidance", "model", "--train-omega", "0.999"], "scale 1000"),
    # dopri5 chooses its own steps, so convert records no --steps for it (as dit sample refuses them).
    (["convert", "{fx}/flow/ckpt-0000001.pt", "out.safetensors", "--sampler", "dopri5", "--steps", "9"],
     "--sampler dopri5 does not take --steps"),
    # A device string torch cannot parse ended in its RuntimeError; an index past the visible GPUs too.
    ([*S, "--device", "cpu:abc"], "unknown device 'cpu:abc'"),
    ([*T, "--device", "cpu:"], "unknown device 'cpu:'"),
    ([*F, "--device", "cuda:-1"], "unknown device 'cuda:-1'"),
    # A wait past any use overflowed the process group's timedelta under torchrun.
    ([*S, "--dist-timeout", "1e300"], "--dist-timeout must be in (0, 604,800] seconds"),
    # A learning rate or a decay that only overflows the weights.
    ([*T, "--lr", "1e300"], "--lr must be a finite number in (0, 1]"),
    ([*T, "--weight-decay", "1e300"], "--weight-decay must be a finite number >= 0 whose product with --lr"),
    # An interval recorded for an unguided default, which dit sample refuses on its command line.
    (["convert", "{fx}/meanflow.safetensors", "out.safetensors", "--guidance-interval", "0.2,0.5"],
     "--guidance-interval only applies to a guided run, and the recorded cfg is 1"),
    # dit train names the weights it reads --init-weights, not --weights.
    ([*T, "--init-from", "{fx}/meanflow.safetensors", "--init-weights", "model"],
     "--init-weights model: {fx}/meanflow.safetensors holds only its ema weights (drop --init-weights;"),
    # convert has no --model to suggest.
    (["convert", "--info", "{fx}/missing.pt"], "checkpoint not found"),
    # A DMF file's time direction is the option that names it, its depth the run's own.
    ([*T, "--objective", "meanflow", "--time-direction", "data-to-noise", "--init-from", "{fx}/DMF-tiny.pt"],
     "--decoupled-depth K"),
]


@pytest.mark.parametrize("argv, message", EDGES, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(EDGES)])
def test_an_option_at_its_edge_is_one_line(argv, message, fx, work, tmp_path):
    line = refused(fill(argv, fx), fx, work, tmp_path / "home")
    assert fill([message], fx)[0] in line and "--model" not in line, line


def test_convert_records_flow_map_for_a_mean_flow_model(fx, work):
    ok(*fill(["convert", "{fx}/meanflow.safetensors", "a.safetensors", "--sampler", "flow-map", "--steps", "3"], fx))
    ok(*fill(["convert", "{fx}/meanflow.safetensors", "b.safetensors", "--sampler", "dopri5"], fx))
    info = json.loads(ok("convert", "--info", "a.safetensors", "--json"))
    assert (info["sampling"]["sampler"], info["sampling"]["steps"]) == ("flow-map", 3)


def test_a_dmf_file_starts_a_fine_tune_at_the_runs_decoupled_depth(fx, work):
    ok(*fill([*T, "--objective", "meanflow", "--decoupled-depth", "1", "--time-direction", "data-to-noise",
              "--init-from", "{fx}/DMF-tiny.pt"], fx))
    started = json.loads((work / "run" / "run.json").read_text())
    assert started["model"]["decoupled_depth"] == 1 and started["train"]["init_from"].endswith("DMF-tiny.pt")


def test_dopri5_stops_in_one_line_where_its_step_underflows():
    """A velocity that is pure noise meets no tolerance: the step shrinks below MIN_STEP, long before the step
    limit, and the run ends with one line instead of thousands of rejected steps."""
    from ditcli.diffusion.flow import FlowMatching
    from ditcli.diffusion.flow_samplers import sample_flow_dopri5
    from ditcli.errors import UserError

    generator, calls = torch.Generator().manual_seed(0), []

    def noise(x, t):
        calls.append(t)
        return torch.randn(x.shape, generator=generator) * 1e3

    with pytest.raises(UserError, match="step fell below"):
        sample_flow_dopri5(noise, torch.zeros(1, 1, 2, 2), FlowMatching(), atol=1e-10, rtol=1e-10)
    assert len(calls) < 1000


# A hostile checkpoint given to --resume: each of its entries is read as a file's records are, before any is used.

def hostile(run: Path, entry: tuple, value) -> None:
    """Set the entry at key path `entry` of the run's newest checkpoint to `value`."""
    path = max(run.glob("ckpt-*.pt"))
    payload = torch.load(path, weights_only=True)
    target = payload
    for key in entry[:-1]:
        target = target[key]
    target[entry[-1]] = value
    torch.save(payload, path)


RESUME_ENTRIES = [
    (("config", "train", "steps"), "2", "stored settings (config.train): its steps"),
    (("config", "train", "lr"), float("nan"), "its lr NaN is not a finite number"),
    (("config", "train", "log"), "wandb", "its log \"wandb\" is no list of tracker names"),
    (("config", "train", "global_batch"), [4], "its global_batch"),
    (("config", "model", "depth"), "2", "model config (config.model): its depth"),
    (("step",), "1", "unusable step"),
    (("step",), -1, "unusable step"),
    (("bad_steps",), float("inf"), "unusable bad_steps"),
    (("model", "pos_embed"), torch.zeros(3), "model weights"),
    (("ema", "pos_embed"), torch.zeros(1, 16, 32, dtype=torch.int64), "int64"),
    (("rng",), [5], "unusable rng record"),
    (("rng",), [{"torch": torch.zeros(3, dtype=torch.uint8)}], "unusable rng record"),
    (("optimizer", "param_groups"), "x", "unusable optimizer record"),
    (("optimizer", "param_groups"), [], "unusable optimizer"),
    # The records only readers use: a resume rewrites them, but continues no checkpoint dit sample refuses.
    (("sampling", "cfg"), float("nan"), "sampling record: its cfg NaN"),
    (("objective", "objective"), "sideways", "unusable objective"),
]


@pytest.mark.parametrize("entry, value, mentions", RESUME_ENTRIES,
                         ids=[f"{'.'.join(e)}-{i}" for i, (e, _, _) in enumerate(RESUME_ENTRIES)])
def test_a_hostile_checkpoint_given_to_resume_is_one_line(entry, value, mentions, fx, work):
    import shutil

    shutil.copytree(fx / "ddpm", work / "run")
    (work / "run" / "run.json").unlink()  # the checkpoint's own settings, not run.json's
    hostile(work / "run", entry, value)
    line = refused(["train", "--resume", "auto", "--out", "run", "--steps", "2"], work)
    assert mentions in line and "ckpt-0000001.pt" in line, line


def test_a_hostile_run_file_given_to_resume_is_one_line(fx, work):
    import shutil

    shutil.copytree(fx / "ddpm", work / "run")
    record = json.loads((work / "run" / "run.json").read_text())
    for key, value in (("lr", "1e-4"), ("seed", 0.5), ("precision", None)):
        (work / "run" / "run.json").write_text(json.dumps({**record, "train": {**record["train"], key: value}}))
        line = refused(["train", "--resume", "auto", "--out", "run", "--steps", "2"], work)
        assert f"run.json records an unusable stored settings (config.train): its {key}" in line, line


def test_objective_options_that_agree_with_a_files_record_are_taken(fx, work, tmp_path):
    """A lone --time-direction (a flow objective to a file without a record) agrees with a mean-flow record of the
    same time, and a trained guidance scale, which no option gives, is not compared; another time is refused."""
    guided = tmp_path / "guided.safetensors"
    config = tiny_config(in_channels=1, num_classes=2, mean_flow_form="decoupled", decoupled_depth=1)
    save_safetensors(Checkpoint(DiT(config).state_dict(), config, "safetensors", "ema",
                                codec={"kind": "pixel", "channels": 1}, objective=MeanFlowObjective(trained_cfg=2.5)),
                     guided)
    for path, given in ((fx / "meanflow.safetensors", ["--time-direction", "noise-to-data"]),
                        (guided, ["--objective", "meanflow", "--time-direction", "noise-to-data"])):
        ok("sample", "--ckpt", path, "--num", "2", "--out", f"out-{path.stem}", *given)
    line = refused(["sample", "--ckpt", fx / "meanflow.safetensors", "--num", "2", "--out", "out",
                    "--time-direction", "data-to-noise"], fx, work)
    assert "records the objective meanflow, time noise-to-data" in line
