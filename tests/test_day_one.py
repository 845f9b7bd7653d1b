"""Issue 32, "day-one trust": what a first session with `dit sample`, `dit fid`, `dit convert` and the Python API ran
into, each through the front door: fid's silent steps and its features, pixel models in diffusers, foreign files
`dit sample` could not be told about, run folders, sampler steps, preset errors, Ctrl-C, switches, the NFE line, and
`ditcli.generate` / `ditcli.load_model`."""

import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import dit, ok, perturbed, tiny_config
from PIL import Image

import ditcli
from ditcli.cli import sample as sample_command
from ditcli.diffusion.objectives import FlowObjective
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.evaluation import features
from ditcli.evaluation.fid import FidConfig, evaluate
from ditcli.evaluation.references import make_ref
from ditcli.model.dit import DiT, DiTConfig
from ditcli.sampling.generate import RunSummary
from ditcli.sampling.request import SAMPLER_STEPS
from ditcli.weights.checkpoint import TRAIN_FORMAT, save_safetensors
from ditcli.weights.record import Checkpoint
from ditcli.weights.registry import known_weights

CPU = torch.device("cpu")
DOCS = Path(__file__).resolve().parents[1] / "docs"
PIXEL = {"kind": "pixel", "channels": 1}
FLOW_DEFAULTS = SamplingDefaults("euler", 9, 3.0, (0.156, 0.781))  # the embedded model's record


@pytest.fixture(autouse=True)
def no_downloads(offline, monkeypatch, tmp_path):
    """Offline, a private cache home, and DIT_OFFLINE too: nothing reaches out, and Inception is never there."""
    monkeypatch.setenv("DIT_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def pixel_file(path: Path, seed: int = 0, objective=None, sampling=None, **overrides) -> Path:
    config = tiny_config(in_channels=1, num_classes=3, **overrides)
    model = perturbed(DiT(config), seed=seed, std=0.02)
    extra = {} if objective is None else {"objective": objective, "objective_recorded": True}
    save_safetensors(Checkpoint(model.state_dict(), config, "safetensors", class_names=["a", "b", "c"], codec=PIXEL,
                                sampling=sampling, **extra), path)
    return path


def one_error(result) -> str:
    """The command's single `error:` line (exit code 2)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def sampled(monkeypatch):
    """`dit sample` with the sampling core recorded instead of run: the config it was handed."""
    seen = {}

    def fake_run(net, codec, config, device, writers, ranks, provenance, **callbacks):
        seen.update(config=config, provenance=provenance)
        return RunSummary(config.num_images, 0, 0, None, 0.0)

    monkeypatch.setattr(sample_command, "sample_run", fake_run)
    return seen


# 5. dit fid: progress for every slow step, --no-pr, and the reference's own features.

def mean_colour(path, device):
    """A registered extractor: each image's mean colour and its two halves, as 9 features."""
    def extract(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        return torch.cat([x.mean(dim=(2, 3)), x[..., :4].mean(dim=(2, 3)), x[..., 4:, :].mean(dim=(2, 3))], dim=1)

    return extract


def npz(path: Path, seed: int, count: int = 12, size: int = 8) -> Path:
    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


def test_fid_reports_every_stage_and_no_pr_skips_only_precision_and_recall(tmp_path):
    features.register_feature_extractor("day-one-colour", mean_colour)
    samples, ref = npz(tmp_path / "s.npz", 0), npz(tmp_path / "r.npz", 1)
    heard = []
    config = FidConfig(samples, ref, batch_size=4, features="day-one-colour")
    full = evaluate(config, CPU, lambda stage, done, total: heard.append((stage, done, total)))
    stages = list(dict.fromkeys(stage for stage, _, _ in heard))
    assert stages == ["reference", "samples", "Frechet distance", "precision/recall", "KID"]
    for stage in stages:  # each stage opens at 0 and ends at its total
        seen = [(done, total) for name, done, total in heard if name == stage]
        assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0, (stage, seen)

    heard.clear()
    quick = evaluate(FidConfig(samples, ref, batch_size=4, features="day-one-colour", precision_recall=False), CPU,
                     lambda stage, done, total: heard.append(stage))
    assert "precision/recall" not in heard and quick.precision is None and quick.recall is None
    assert (quick.fid, quick.kid) == (full.fid, full.kid) and full.precision is not None

    result = ok("fid", samples, "--ref", ref, "--features", "day-one-colour", "--no-pr", "--json")
    scores = json.loads(result.stdout)
    assert scores["precision"] is None and scores["recall"] is None and scores["fid"] == pytest.approx(full.fid)
    assert "--no-pr" in dit("fid", "--help").output


def test_fid_without_features_takes_the_ones_the_reference_was_made_with(tmp_path):
    """A fashion-judge reference scored without --features: the judge, not an Inception download (we are offline)."""
    source = tmp_path / "data.npz"
    np.savez(source, images=np.random.default_rng(0).integers(0, 256, (12, 28, 28, 1), dtype=np.uint8))
    make_ref(source, tmp_path / "ref.npz", features="fashion-judge")
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.random.default_rng(1).integers(0, 256, (12, 28, 28, 1), dtype=np.uint8))
    scores = json.loads(ok("fid", samples, "--ref", tmp_path / "ref.npz", "--json").stdout)
    assert scores["features"] == "fashion-judge" and scores["fid"] > 0
    assert scores["ref_stats"] == "stored mu/sigma of ref.npz"
    error = one_error(dit("fid", samples, "--ref", tmp_path / "ref.npz", "--inception-weights", tmp_path / "w.pth"))
    assert "--inception-weights only applies to --features inception" in error and "fashion-judge" in error


# 6. A pixel model in diffusers.

def test_a_pixel_model_to_diffusers_is_refused_in_one_line_and_vae_none_writes_the_transformer(tmp_path):
    source = pixel_file(tmp_path / "m.safetensors")
    error = one_error(dit("convert", source, tmp_path / "pipe", "--to", "diffusers"))
    assert "pixel-space model" in error and "DiTPipeline" in error and "--vae none" in error and ".safetensors" in error
    assert not (tmp_path / "pipe").exists()
    error = one_error(dit("convert", source, tmp_path / "pipe", "--to", "diffusers", "--vae", "mse"))
    assert "--vae mse does not apply" in error and not (tmp_path / "pipe").exists()

    result = ok("convert", source, tmp_path / "pipe", "--to", "diffusers", "--vae", "none")
    assert "DiTPipeline cannot sample this folder" in " ".join(result.output.split())
    from diffusers import DiTPipeline, DiTTransformer2DModel

    DiTTransformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer", local_files_only=True)
    with pytest.raises(ValueError, match="expected .*'vae'"):  # the folder holds no VAE
        DiTPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe", vae=None, local_files_only=True)
    with pytest.raises(AttributeError):  # why it is refused: the pipeline decodes through `self.vae`, here None
        pipe(class_labels=[0], num_inference_steps=1, guidance_scale=1.0, output_type="np")


# 7. Files from elsewhere that only the user can describe.

def sit_pixel_file(path: Path) -> Path:
    """A SiT-layout state dict (DiT's keys, a `SiT-*.pt` name) of width 48, 3 heads and 3 pixel channels: its heads,
    objective and codec are not in the file."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=48, depth=2, num_heads=3,
                       num_classes=4)
    torch.save(perturbed(DiT(config), std=0.02).state_dict(), path)
    return path


def test_sample_takes_what_convert_takes_for_a_foreign_pixel_file(tmp_path):
    source = sit_pixel_file(tmp_path / "SiT-tiny.pt")
    flow = ["--objective", "flow", "--time-direction", "noise-to-data"]
    error = one_error(dit("sample", "--ckpt", source, *flow, "--vae", "none"))
    assert "heads for hidden size 48" in error and "pass --num-heads" in error
    error = one_error(dit("sample", "--ckpt", source, "--num-heads", 3, *flow, "--num", 2))
    assert "3 input channels" in error and "--vae none" in error

    out = tmp_path / "out"
    ok("sample", "--ckpt", source, "--num-heads", 3, *flow, "--vae", "none", "--num", 2, "--out", out)  # dopri5
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["codec"] == {"kind": "pixel", "channels": 3} and provenance["model_config"]["num_heads"] == 3
    assert provenance["objective"] == {"objective": "flow", "time_direction": "noise-to-data"}
    assert len(list(out.glob("0*.png"))) == 2
    ok("convert", source, tmp_path / "m.safetensors", "--num-heads", 3, *flow)  # what convert already took


def test_vae_none_is_refused_for_a_file_that_records_a_vae(tmp_path):
    config = tiny_config()
    save_safetensors(Checkpoint(perturbed(DiT(config)).state_dict(), config, "safetensors",
                                codec={"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"}), tmp_path / "m.safetensors")
    error = one_error(dit("sample", "--ckpt", tmp_path / "m.safetensors", "--vae", "none", "--out", tmp_path / "o"))
    assert "records the VAE stabilityai/sd-vae-ft-ema" in error and not (tmp_path / "o").exists()


# 8. Smaller friction.

def run_checkpoint(path: Path, seed: int) -> Path:
    config = tiny_config(in_channels=1, num_classes=3)
    state = perturbed(DiT(config), seed=seed, std=0.02).state_dict()
    torch.save({"format": TRAIN_FORMAT, "step": int(path.stem[5:]), "config": {"model": config.to_dict(), "train": {}},
                "model": state, "ema": state, "class_names": None, "codec": PIXEL}, path)
    return path


def test_a_run_folder_samples_its_newest_checkpoint_and_says_which(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    newest = run_checkpoint(run / "ckpt-0000010.pt", seed=1)
    run_checkpoint(run / "ckpt-0000002.pt", seed=2)  # written last: the step decides, not the time
    out = tmp_path / "out"
    result = ok("sample", "--ckpt", run, "--num", 2, "--steps", 2, "--out", out)
    assert f"note: --ckpt {run} is a dit train run folder: sampling its newest checkpoint, ckpt-0000010.pt" \
        in " ".join(result.output.split())
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["checkpoint_sha256"] == hashlib.sha256(newest.read_bytes()).hexdigest()
    assert ditcli.load_model(run).config.depth == 2  # the Python API and convert take it too
    result = ok("convert", run, tmp_path / "m.safetensors")
    assert "converted its newest checkpoint, ckpt-0000010.pt" in result.output


def test_a_named_sampler_without_steps_takes_its_own_steps_not_the_files(tmp_path, sampled):
    model = pixel_file(tmp_path / "flow.safetensors", objective=FlowObjective("noise-to-data"),
                       sampling=FLOW_DEFAULTS)
    ok("sample", "--ckpt", model, "--sampler", "sde", "--num", 2)
    assert (sampled["config"].sampler, sampled["config"].steps) == ("sde", SAMPLER_STEPS["sde"]) != ("sde", 9)
    ok("sample", "--ckpt", model, "--sampler", "euler", "--num", 2)  # the file's own sampler keeps its steps
    assert sampled["config"].steps == 9
    ok("sample", "--ckpt", model, "--sampler", "sde", "--steps", 7, "--num", 2)
    assert sampled["config"].steps == 7
    ok("sample", "--model", "fashion-mnist", "--sampler", "heun", "--num", 2)
    assert (sampled["config"].sampler, sampled["config"].steps) == ("heun", SAMPLER_STEPS["heun"])


def test_a_preset_for_ddpm_models_names_itself_on_a_flow_model(tmp_path):
    model = pixel_file(tmp_path / "flow.safetensors", objective=FlowObjective("noise-to-data"),
                       sampling=FLOW_DEFAULTS)
    error = one_error(dit("sample", "--ckpt", model, "--preset", "paper-fid", "--num-images", 2,
                          "--npz", tmp_path / "s.npz"))
    assert error.startswith("error: --preset paper-fid is DiT's FID protocol for DDPM models") and "flow" in error
    assert "sampler 'ddpm'" not in error and not (tmp_path / "s.npz").exists()


def test_ctrl_c_says_what_is_written_and_that_the_same_command_resumes(tmp_path, monkeypatch):
    def interrupted(net, codec, config, device, writers, ranks, provenance, on_batch, on_plan, **callbacks):
        on_plan(3)
        on_batch(SimpleNamespace(indices=[1, 2], nfe=2))
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_command, "sample_run", interrupted)
    out = tmp_path / "out"
    result = dit("sample", "--ckpt", pixel_file(tmp_path / "m.safetensors"), "--num", 4, "--steps", 2, "--out", out)
    assert result.exit_code == 130
    assert f"interrupted: 3 of 4 images are written to {out}; run the same command again to resume" in \
        " ".join(result.output.split())


@pytest.mark.parametrize("command", [[], ["sample"], ["fid"], ["convert"], ["classes"], ["train"]])
def test_switches_show_as_flags_and_defaults_are_written_one_way(command):
    text = dit(*command, "--help").output
    assert "--json" in text or "--debug" in text
    assert "<bool>" not in text and "[default" not in text


def test_the_nfe_line_says_how_guided_steps_count(tmp_path):
    """The embedded model's setting: Euler 9 guided for flow time in [0.156, 0.781], so 6 of the 9 evaluations run a
    doubled batch: NFE 9, 15 forward passes."""
    model = pixel_file(tmp_path / "flow.safetensors", objective=FlowObjective("noise-to-data"),
                       sampling=FLOW_DEFAULTS)
    result = ok("sample", "--ckpt", model, "--num", 2, "--out", tmp_path / "out")
    assert "NFE 9 per image (15 forward passes: 6 of the 9 evaluations guided, each a doubled batch)" in \
        " ".join(result.output.split())
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert (provenance["nfe"], provenance["passes"]) == (9, 15)
    unguided = ok("sample", "--ckpt", model, "--num", 2, "--cfg", 1, "--out", tmp_path / "out1").output
    assert "NFE 9 per image," in " ".join(unguided.split()) and "forward passes" not in unguided


# 9. Docs in step with the tool.

@pytest.mark.parametrize("name", ["fashion-mnist", "fashion-mnist-flow", "fashion-mnist-ddpm"])
def test_the_sampling_docs_give_the_embedded_models_own_defaults(name):
    entry = known_weights(name)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(--steps|--cfg)` \| ([^|]*)\|", (
        DOCS / "sampling.md").read_text(), re.MULTILINE)}
    for flag, value in (("--steps", entry.steps), ("--cfg", entry.cfg)):
        assert re.search(rf"\b{value:g} \([^)]*\b{re.escape(name)}\b(?!-)", rows[flag]), (flag, rows[flag])


# 10. The Python API.

def test_generate_returns_the_images_dit_sample_writes(tmp_path):
    model = pixel_file(tmp_path / "m.safetensors")
    images = ditcli.generate(model, classes=["b", 2], num_per_class=2, steps=3, seed=5)
    assert len(images) == 4 and all(isinstance(image, Image.Image) for image in images)
    ok("sample", "--ckpt", model, "--class", "b", "--class", 2, "--num-per-class", 2, "--steps", 3, "--seed", 5,
       "--out", tmp_path / "out")
    written = sorted((tmp_path / "out").glob("0*.png"))
    assert [np.asarray(Image.open(p)).tolist() for p in written] == [np.asarray(i).tolist() for i in images]
    with pytest.raises(ditcli.errors.UserError, match="--steps must be between 1"):  # the command's checks
        ditcli.generate(model, steps=0)
    with pytest.raises(ditcli.errors.UserError, match="writes no files"):
        ditcli.generate(model, out=tmp_path / "x")


def test_the_api_takes_registry_names_as_model_does():
    model = ditcli.load_model("fashion-mnist")
    assert model.config.in_channels == 1 and not model.training
    images = ditcli.generate("fashion-mnist", classes=["sneaker"], num_per_class=1, steps=2)
    assert len(images) == 1 and images[0].size == (28, 28)


def test_load_model_takes_a_hub_id_and_generate_samples_it(tmp_path, monkeypatch):
    import huggingface_hub
    from test_hub import cache_repo, pipeline

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder, source = pipeline(tmp_path / "pipe", seed=1)
    cache_repo(cache, "org/tiny-dit", folder)
    model = ditcli.load_model("org/tiny-dit")
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in source.state_dict.items())
    assert len(ditcli.generate("org/tiny-dit", classes=["a"], num_per_class=2, steps=2, cfg=1)) == 2


def test_a_compiled_run_says_so_before_its_build():
    """The build takes tens of seconds before the first batch; the user is told, not left with a still bar."""
    import io

    from rich.console import Console

    from ditcli.cli.sample import show_ready
    from ditcli.sampling.config import GenerateConfig

    for compile_model, expected in ((True, True), (False, False)):
        buffer = io.StringIO()
        show_ready(Console(file=buffer, width=200), None, GenerateConfig((0,), compile=compile_model), None, None,
                   None, [])
        assert ("compiling the forward" in buffer.getvalue()) is expected


def test_a_mistyped_run_folder_is_named_as_a_path_too(tmp_path, monkeypatch):
    """`--ckpt runs/typo` looks like a hub id; the error must not read as if the user had meant the hub."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIT_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from typer.testing import CliRunner

    from ditcli.cli.app import app

    result = CliRunner().invoke(app, ["sample", "--ckpt", "runs/typo", "--num", "1", "--out", "x"])
    assert result.exit_code == 2 and "runs/typo is no file or folder here" in result.output
    assert not (tmp_path / "x").exists()
