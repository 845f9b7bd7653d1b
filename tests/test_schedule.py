"""Issue 13: the beta schedule a model was trained with is honoured by every sampling path, `dit train` sets the
diffusion options, and a normal run is quiet: no third-party warnings, cheap checks before any VAE loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit, perturbed, tiny_config

import ditcli.diffusion.objectives
import ditcli.sampling.generate
import ditcli.sampling.request
import ditcli.training.preview
from ditcli.diffusion import samplers
from ditcli.diffusion.ddpm import named_betas
from ditcli.diffusion.guidance import Guidance
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.model.codec import PixelCodec, VaeCodec
from ditcli.model.dit import DiT
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import generate_images
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.ema import EmaRecord
from ditcli.weights.record import Checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=4, lr=1e-3, ema_decay=0.5, log_every=1, ckpt_every=100, seed=3)


@pytest.fixture(autouse=True)
def no_downloads(offline):
    """Every test here runs offline with a private cache home."""


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, size=(8, 8, 8, 1), dtype=np.uint8), labels=np.arange(8) % 2,
             class_names=np.array(["a", "b"]))
    return path


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        norm_num_groups=4, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=16)  # 8x down, as the SD VAEs
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def plan_spy(monkeypatch) -> list:
    """Record every SamplerPlan built by the sampling paths: `dit sample`, generate_images and the training preview."""
    plans = []

    def spy_on(real):
        def spy(*args, **kwargs):
            plans.append(real(*args, **kwargs))
            return plans[-1]
        return spy

    for module in (ditcli.diffusion.objectives,):  # every sampling path plans through its objective
        for name in ("plan_sampler", "plan_for"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy_on(getattr(samplers, name)))
    return plans


def uses_betas(plan, schedule: str) -> bool:
    """The plan's (respaced) process keeps the alpha-bar of `schedule` at its timesteps."""
    full = np.cumprod(1.0 - named_betas(schedule))
    return np.allclose(plan.process.alphas_cumprod, full[plan.process.timesteps], rtol=1e-12, atol=0)


# The bug: the schedule.

def test_a_cosine_model_is_sampled_with_cosine_betas_everywhere(tmp_path, npz_data, monkeypatch):
    plans = plan_spy(monkeypatch)
    config = TrainConfig(data=str(npz_data), out=str(tmp_path / "run"), steps=2, sample_every=2, schedule="cosine",
                         **TINY)
    trainer = Trainer(config)
    trainer.run()
    assert len(plans) == 1 and uses_betas(plans[0], "cosine")  # the preview grid
    ckpt = tmp_path / "run" / "ckpt-0000002.pt"
    assert load_checkpoint(ckpt).schedule == "cosine"

    # dit sample from the training checkpoint, and from its conversion to .safetensors.
    assert dit("convert", ckpt, tmp_path / "m.safetensors").exit_code == 0
    for name, source in (("a", ckpt), ("b", tmp_path / "m.safetensors")):
        plans.clear()
        result = dit("sample", "--ckpt", source, "--num", 2, "--steps", 3, "--sampler", "ddim", "--cfg", 1, "--npz",
                     tmp_path / f"{name}.npz")
        assert result.exit_code == 0, result.output
        assert plans and all(uses_betas(plan, "cosine") for plan in plans)
        assert json.loads((tmp_path / f"{name}.provenance.json").read_text())["schedule"] == "cosine"

    # The same model and noise under linear betas gives other images.
    model = load_checkpoint(ckpt).build()

    def images(schedule: str) -> torch.Tensor:
        run = GenerateConfig((0, 1), sampler="ddim", steps=3, guidance=Guidance(1.0), schedule=schedule)
        return torch.cat([batch.images for batch in generate_images(model, PixelCodec(1), run, [0, 1],
                                                                    torch.device("cpu"))])

    cosine = images("cosine")
    assert np.array_equal(cosine.numpy(), np.load(tmp_path / "a.npz")["arr_0"])
    assert not torch.equal(cosine, images("linear"))


def test_every_file_format_records_the_schedule(tmp_path):
    config = tiny_config(in_channels=1)
    checkpoint = Checkpoint(perturbed(DiT(config)).state_dict(), config, "safetensors",
                            codec={"kind": "pixel", "channels": 1}, schedule="cosine",
                            sampling=SamplingDefaults("unipc", 7, 2.5), ema=EmaRecord(0.99, True, 40))
    save_safetensors(checkpoint, tmp_path / "m.safetensors")
    assert load_checkpoint(tmp_path / "m.safetensors").schedule == "cosine"
    converted = dit("convert", tmp_path / "m.safetensors", tmp_path / "pipe", "--to", "diffusers", "--vae", "none")
    assert converted.exit_code == 0
    back = load_checkpoint(tmp_path / "pipe")
    assert (back.schedule, back.sampling, back.ema) == ("cosine", checkpoint.sampling, checkpoint.ema)

    # A folder another tool wrote has no _ditcli entry: its scheduler config says which betas.
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    del index["_ditcli"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    assert load_checkpoint(tmp_path / "pipe").schedule == "cosine"  # from trained_betas
    scheduler = tmp_path / "pipe" / "scheduler" / "scheduler_config.json"
    for fields, schedule in (({"beta_schedule": "squaredcos_cap_v2"}, "cosine"),
                             ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, "linear")):
        scheduler.write_text(json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, **fields}))
        loaded = load_checkpoint(tmp_path / "pipe")
        assert loaded.schedule == schedule and not loaded.warnings
    scheduler.write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear"}))
    loaded = load_checkpoint(tmp_path / "pipe")
    assert loaded.schedule == "linear" and "neither the linear nor the cosine" in loaded.warnings[0]
    checkpoint.schedule = "quadratic"
    save_safetensors(checkpoint, tmp_path / "bad.safetensors")
    assert "unknown beta schedule 'quadratic'" in one_error(dit("sample", "--ckpt", tmp_path / "bad.safetensors"))


def test_train_sets_schedule_learn_sigma_and_label_dropout(tmp_path, npz_data):
    common = ["train", "--data", npz_data, "--model", "DiT-S/2", "--hidden-size", 32, "--depth", 2, "--num-heads", 2,
              "--image-size", 8, "--vae", "none", "--channels", 1, "--global-batch", 4, "--steps", 1, "--json"]
    result = dit(*common, "--out", tmp_path / "a", "--schedule", "cosine", "--no-learn-sigma",
                 "--class-dropout-prob", 0)
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(tmp_path / "a" / "ckpt-0000001.pt")
    assert checkpoint.schedule == "cosine"
    assert not checkpoint.config.learn_sigma and checkpoint.config.class_dropout_prob == 0
    assert checkpoint.sampling.cfg == 1.0  # nothing to guide without a null class
    assert "unknown --schedule 'quad'" in one_error(dit(*common, "--out", tmp_path / "b", "--schedule", "quad"))
    assert "--class-dropout-prob must be in [0, 1)" in one_error(dit(*common, "--out", tmp_path / "c",
                                                                     "--class-dropout-prob", 1.5))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# Noise a user sees.

def test_cheap_checks_come_before_the_vae(tmp_path, monkeypatch):
    def no_vae(*args, **kwargs):
        raise AssertionError("the VAE was loaded before the cheap checks")

    monkeypatch.setattr(VaeCodec, "load", no_vae)
    torch.manual_seed(0)
    config = tiny_config(num_classes=7)
    path = tmp_path / "latent.safetensors"
    save_safetensors(Checkpoint(perturbed(DiT(config)).state_dict(), config, "safetensors",
                                codec={"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"}), path)
    (tmp_path / "file").write_text("")
    base = ["sample", "--ckpt", path, "--steps", 1]
    assert "class 7 is out of range" in one_error(dit(*base, "--class", 7, "--npz", tmp_path / "a.npz"))
    assert "--image-size 128 does not match" in one_error(dit(*base, "--image-size", 128, "--npz", tmp_path / "a.npz"))
    assert "--out" in one_error(dit(*base, "--out", tmp_path / "file"))
    assert "--npz" in one_error(dit(*base, "--npz", tmp_path / "file" / "s.npz"))
    assert "unknown sampler" in one_error(dit(*base, "--sampler", "plms", "--npz", tmp_path / "a.npz"))
    assert not (tmp_path / "a.npz").exists() and not list(tmp_path.glob("*.parts"))


def run_dit(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIT_HOME": str(cwd / "home"), "PYTHONWARNINGS": "",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ditcli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_normal_latent_run_prints_no_third_party_warning(tmp_path, tiny_vae):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    trained = run_dit("train", "--data", folder, "--out", tmp_path / "run", "--model", "DiT-S/2", "--hidden-size", 32,
                      "--depth", 2, "--num-heads", 2, "--image-size", 16, "--vae", tiny_vae, "--global-batch", 2,
                      "--steps", 1, "--ema-warmup", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    sampled = run_dit("sample", "--ckpt", tmp_path / "run" / "ckpt-0000001.pt", "--num", 2, "--steps", 2,
                      "--npz", tmp_path / "s.npz", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    for result in (trained, sampled):
        text = result.stdout + result.stderr
        assert "accelerate" not in text and "low_cpu_mem_usage" not in text, text
        assert "Warning" not in text and "warn(" not in text, text
