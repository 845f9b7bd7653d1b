"""Options that change how the work runs, not what it is: each reaches the core config it should.

The heavy calls are patched; each test asserts the config (or backend flags) the command handed over.
"""

import json

import pytest
import torch
from conftest import perturbed, tiny_config
from typer.testing import CliRunner

from ditcli.cli import sample as sample_command
from ditcli.cli import train as train_command
from ditcli.cli.app import app
from ditcli.model.codec import PixelCodec
from ditcli.model.dit import DiT
from ditcli.sampling import request as sampling_run
from ditcli.sampling.generate import RunSummary
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def pixel_model(tmp_path):
    config = tiny_config(in_channels=1)
    path = tmp_path / "pixel.safetensors"
    save_safetensors(Checkpoint(perturbed(DiT(config)).state_dict(), config, "x",
                                codec={"kind": "pixel", "channels": 1}), path)
    return path


@pytest.fixture
def sampled(monkeypatch):
    """`dit sample` with its core run and backend flags recorded instead of done."""
    seen = {}

    def fake_run(net, codec, config, device, writers, ranks, provenance, **callbacks):
        seen.update(config=config, provenance=provenance)
        return RunSummary(config.num_images, 0, 0, None, 0.0)

    monkeypatch.setattr(sample_command, "sample_run", fake_run)
    monkeypatch.setattr(sampling_run, "codec_from_dict", lambda spec, device, channels, vae, offline: PixelCodec(1))
    monkeypatch.setattr(sample_command, "set_backend_flags", lambda **flags: seen.update(flags=flags))
    return seen


def sample(model, *options):
    result = runner.invoke(app, ["sample", "--ckpt", str(model), "--num-images", "2", *options])
    assert result.exit_code == 0, result.output
    return result


def test_sample_eta_reaches_the_ddim_config(pixel_model, sampled):
    sample(pixel_model, "--sampler", "ddim", "--steps", "3", "--eta", "0.5")
    assert (sampled["config"].sampler, sampled["config"].eta) == ("ddim", 0.5)
    sample(pixel_model, "--sampler", "ddim", "--steps", "3")
    assert sampled["config"].eta == 0.0


def test_sample_compile_and_precision_reach_the_config(pixel_model, sampled):
    sample(pixel_model, "--steps", "2", "--compile", "--precision", "bf16")
    assert (sampled["config"].compile, sampled["config"].precision) == (True, "bf16")
    sample(pixel_model, "--steps", "2")
    assert (sampled["config"].compile, sampled["config"].precision) == (False, "fp32")


def test_sample_deterministic_sets_the_backend_flags_and_is_recorded(pixel_model, sampled):
    sample(pixel_model, "--steps", "2", "--deterministic")
    assert sampled["flags"] == {"deterministic": True}
    assert sampled["provenance"]["deterministic"] is True
    sample(pixel_model, "--steps", "2")
    assert sampled["flags"] == {"deterministic": False}


def test_sample_preset_fills_the_config_under_explicit_options(pixel_model, sampled, tmp_path):
    sample(pixel_model, "--preset", "paper-fid", "--steps", "3", "--npz", str(tmp_path / "s.npz"))
    config = sampled["config"]
    assert (config.sampler, config.steps, config.guidance.scale) == ("ddpm", 3, 1.5)


@pytest.fixture
def trained(monkeypatch):
    """`dit train` with the Trainer replaced by a recorder of the config it was given."""
    seen = {}

    class FakeTrainer:
        def __init__(self, config, *args, **kwargs):
            seen["config"] = config

        def run(self):
            return {"interrupted": False, "step": 0}

    monkeypatch.setattr(train_command, "Trainer", FakeTrainer)
    return seen


def train(*options):
    result = runner.invoke(app, ["train", "--json", *options])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"interrupted": False, "step": 0}


def test_train_precision_and_compile_reach_the_config(trained):
    train("--data", "fashion-mnist", "--vae", "none", "--precision", "bf16", "--compile")
    assert (trained["config"].precision, trained["config"].compile) == ("bf16", True)
    train("--data", "fashion-mnist", "--vae", "none")
    assert trained["config"].compile is False


def test_train_preset_is_filled_in_under_explicit_options(trained):
    train("--preset", "fashion-mnist", "--steps", "7", "--precision", "bf16")
    config = trained["config"]
    assert (config.data, config.model, config.hidden_size, config.steps, config.precision) == (
        "fashion-mnist", "DiT-S/4", 192, 7, "bf16")
    assert config.vae is None and config.channels == 1


def test_the_fashion_presets_are_the_recipes_of_the_shipped_models(trained):
    train("--preset", "fashion-mnist")  # the flow model's first stage (docs/flow.md)
    config = trained["config"]
    assert (config.objective, config.learn_sigma, config.time_sampling, config.steps, config.lr_schedule,
            config.lr_warmup) == ("flow", False, "logit-normal", 5500, "cosine", 200)
    train("--preset", "fashion-mnist-ddpm")
    config = trained["config"]
    assert (config.objective, config.learn_sigma, config.lr_schedule, config.lr_warmup) == ("ddpm", True, "constant", 0)
    train("--preset", "fashion-mnist", "--steps", "30")  # a trial run: the recipe's warm-up shrinks with it
    assert (trained["config"].steps, trained["config"].lr_warmup) == (30, 3)
    train("--preset", "fashion-mnist", "--steps", "30", "--lr-warmup", "20")
    assert trained["config"].lr_warmup == 20
    train("--preset", "fashion-mnist", "--objective", "ddpm")  # the recipe's flow-only options go with its objective
    assert (trained["config"].objective, trained["config"].time_sampling) == ("ddpm", "uniform")


def test_backend_flags_turn_deterministic_algorithms_on_and_back_off():
    from ditcli.runtime import set_backend_flags

    try:
        set_backend_flags(deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
        set_backend_flags()
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
