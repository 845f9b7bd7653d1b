"""The guarded FID protocol: `dit sample --preset paper-fid` and `dit fid` reading the samples' provenance."""

import json

import numpy as np
import pytest
import torch.nn.functional as F
from conftest import perturbed, tiny_config
from typer.testing import CliRunner

from ditcli.cli import sample as sample_command
from ditcli.cli.app import app
from ditcli.evaluation import features
from ditcli.model.codec import PixelCodec
from ditcli.model.dit import DiT
from ditcli.sampling import request as sampling_run
from ditcli.sampling.generate import RunSummary
from ditcli.sampling.writers import NpzWriter
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

runner = CliRunner()
features.register_feature_extractor(
    "pooled-test", lambda path, device: lambda images: F.adaptive_avg_pool2d(images.float(), 2).flatten(1))


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def save_model(path, **overrides):
    config = tiny_config(**overrides)
    codec = {"kind": "pixel", "channels": 1} if config.in_channels == 1 else {"kind": "vae",
                                                                              "vae": "stabilityai/sd-vae-ft-ema"}
    save_safetensors(Checkpoint(perturbed(DiT(config)).state_dict(), config, "x", codec=codec), path)
    return path


@pytest.fixture
def captured(monkeypatch):
    """The sampling core and the VAE replaced by recorders: what the command asked for, without the work."""
    seen = {}

    class NamedVae(PixelCodec):  # stands in for the VAE the command asked for
        def to_dict(self):
            return {"kind": "vae", "vae": {"ema": "stabilityai/sd-vae-ft-ema"}.get(seen["vae"], seen["vae"])}

    def fake_codec(spec, device, in_channels, vae, offline):
        seen["vae"] = vae
        return NamedVae(in_channels)

    def fake_run(net, codec, config, device, writers, ranks, provenance, **callbacks):
        seen.update(config=config, writers=writers, provenance=provenance)
        return RunSummary(config.num_images, 0, 0, None, 0.0)

    monkeypatch.setattr(sampling_run, "codec_from_dict", fake_codec)
    monkeypatch.setattr(sample_command, "sample_run", fake_run)
    return seen


def test_paper_fid_preset_expands_to_the_published_protocol(tmp_path, captured):
    model = save_model(tmp_path / "latent.safetensors")
    result = runner.invoke(app, ["sample", "--ckpt", str(model), "--preset", "paper-fid"])
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert (config.sampler, config.steps, config.guidance.scale, config.guidance.channels, config.precision) == (
        "ddpm", 250, 1.5, "paper", "fp32")
    assert config.num_images == 50_000 and len(set(config.labels)) == 10  # uniform random classes
    assert captured["vae"] == "ema"
    npz = [w for w in captured["writers"] if isinstance(w, NpzWriter)]
    assert len(npz) == 1 and npz[0].path.name.endswith("-paper-fid.npz") and len(captured["writers"]) == 1
    assert captured["provenance"]["preset"] == "paper-fid"
    assert "--preset paper-fid: --sampler ddpm --steps 250 --cfg 1.5 --guidance-channels paper --vae " \
           "stabilityai/sd-vae-ft-ema --precision fp32 --num-images 50000" in result.output
    assert "note:" not in result.output


def test_explicit_options_override_the_preset_with_a_note(tmp_path, captured):
    model = save_model(tmp_path / "latent.safetensors")
    result = runner.invoke(app, ["sample", "--ckpt", str(model), "--preset", "paper-fid", "--cfg", "4",
                                 "--precision", "bf16", "--num-images", "100", "--vae", "mse",
                                 "--npz", str(tmp_path / "mine.npz")])
    assert result.exit_code == 0, result.output
    config = captured["config"]
    assert (config.guidance.scale, config.precision, config.num_images, config.steps) == (4.0, "bf16", 100, 250)
    assert captured["vae"] == "mse" and captured["writers"][0].path == tmp_path / "mine.npz"
    for note in ("note: --cfg 4 overrides the preset's 1.5", "note: --precision bf16 overrides the preset's fp32",
                 "note: --num-images 100 overrides the preset's 50,000", "note: --vae mse overrides the preset's ema"):
        assert note in result.output, result.output
    result = runner.invoke(app, ["sample", "--ckpt", str(model), "--preset", "fid"])
    assert result.exit_code == 2 and "unknown --preset 'fid' (choose from paper-fid)" in result.output


def test_the_preset_really_samples_a_pixel_model_into_an_npz_with_provenance(tmp_path):
    model = save_model(tmp_path / "pixel.safetensors", in_channels=1)
    result = runner.invoke(app, ["sample", "--ckpt", str(model), "--preset", "paper-fid", "--num-images", "4",
                                 "--steps", "2", "--npz", str(tmp_path / "s.npz")])
    assert result.exit_code == 0, result.output
    assert "the model is pixel-space, so the preset's ema VAE does not apply" in result.output
    provenance = json.loads((tmp_path / "s.provenance.json").read_text())
    assert (provenance["preset"], provenance["cfg"], provenance["sampler"], provenance["num_images"]) == (
        "paper-fid", 1.5, "ddpm", 4)


def images(count, size, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def provenance(**changes):
    record = {"model": "DiT-XL/2", "model_config": {"num_classes": 1000, "in_channels": 4}, "sampler": "ddpm",
              "steps": 250, "cfg": 1.5, "guidance_channels": "paper", "guidance_interval": None,
              "codec": {"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema", "scale": 0.18215}, "precision": "fp32",
              "num_images": 6, "preset": "paper-fid"}
    return {**record, **changes}


def fid(samples, ref, *extra):
    return runner.invoke(app, ["fid", str(samples), "--ref", str(ref), "--features", "pooled-test", *extra])


def test_fid_names_every_setting_off_the_paper_protocol(tmp_path):
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=images(6, 256, 1))
    np.savez(tmp_path / "s.npz", arr_0=images(6, 256, 2))
    record = provenance(cfg=4.0, codec={"kind": "vae", "vae": "stabilityai/sd-vae-ft-mse"}, precision="bf16",
                        sampler="ddim", steps=50, preset=None)
    (tmp_path / "s.provenance.json").write_text(json.dumps(record))
    result = fid(tmp_path / "s.npz", tmp_path / "VIRTUAL_imagenet256_labeled.npz", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    protocol = scores["protocol"]
    assert (protocol["cfg"], protocol["vae"], protocol["precision"], protocol["steps"]) == (4.0, "mse", "bf16", 50)
    assert protocol["paper"] == "DiT-XL/2 at 256x256: FID 2.27"
    assert protocol["deviations"] == ["cfg 4 is not the paper's 1.5", "50 ddim steps, not the paper's 250 DDPM steps",
                                      "6 images, fewer than the paper's 50,000", "VAE mse, not the paper's ema",
                                      "sampled in bf16, not the paper's fp32"]
    assert all(any(w.startswith(line) for w in scores["warnings"]) for line in protocol["deviations"])

    result = fid(tmp_path / "s.npz", tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    assert result.exit_code == 0, result.output
    assert "protocol: 50 ddim steps, cfg 4 on paper channels, VAE mse, bf16, 6 images; differs in 5 settings from " \
           "the paper's" in result.output
    assert "warning: cfg 4 is not the paper's 1.5: not comparable with the published DiT-XL/2 at 256x256: FID 2.27" \
        in result.output


def test_fid_on_protocol_samples_warns_only_about_what_differs(tmp_path):
    np.savez(tmp_path / "VIRTUAL_imagenet256_labeled.npz", arr_0=images(6, 256, 1))
    folder = tmp_path / "samples"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(images(6, 256, 3)):
        Image.fromarray(image).save(folder / f"{i:06d}_x_seed0.png")
    (folder / "provenance.json").write_text(json.dumps({**provenance(), "complete": True}))
    scores = json.loads(fid(folder, tmp_path / "VIRTUAL_imagenet256_labeled.npz", "--json").output)
    assert scores["protocol"]["deviations"] == ["6 images, fewer than the paper's 50,000"]


def test_fid_without_provenance_or_published_protocol(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=images(6, 28, 1))
    np.savez(tmp_path / "s.npz", arr_0=images(6, 28, 2))
    result = fid(tmp_path / "s.npz", tmp_path / "ref.npz")
    assert result.exit_code == 0 and "protocol: unknown (no `dit sample` provenance" in result.output
    assert json.loads(fid(tmp_path / "s.npz", tmp_path / "ref.npz", "--json").output)["protocol"] is None
    # A Fashion-MNIST-like run: the protocol is shown, but no published one applies, so nothing is flagged.
    record = provenance(model="fashion-mnist", model_config={"num_classes": 10, "in_channels": 1}, cfg=4.0,
                        codec={"kind": "pixel", "channels": 1})
    (tmp_path / "s.provenance.json").write_text(json.dumps(record))
    scores = json.loads(fid(tmp_path / "s.npz", tmp_path / "ref.npz", "--json").output)
    assert scores["protocol"]["paper"] is None and scores["protocol"]["deviations"] == []
    assert not any("paper" in w for w in scores["warnings"])
