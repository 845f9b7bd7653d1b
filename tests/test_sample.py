"""`dit sample` and `dit classes` through the front door, with tiny random DiTs, a tiny random VAE and pixel models."""

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit, ok, perturbed, tiny_config
from PIL import Image

import ditcli.sampling.generate
import ditcli.weights.registry
from ditcli.data.sources import FASHION_MNIST_CLASSES
from ditcli.model.dit import DiT
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

FASHION = FASHION_MNIST_CLASSES


def save_tiny(path: Path, codec: dict | None, class_names=None, seed=0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    model = perturbed(DiT(config), seed=seed, std=0.02)
    save_safetensors(Checkpoint(model.state_dict(), config, "safetensors", class_names=class_names, codec=codec), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                        norm_num_groups=8, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    vae.save_pretrained(root / "vae")
    return {
        "pixel": save_tiny(root / "pixel.safetensors", {"kind": "pixel", "channels": 1}, FASHION, in_channels=1),
        "latent": save_tiny(root / "latent.safetensors", {"kind": "vae", "vae": str(root / "vae")}),
        "ema": save_tiny(root / "ema.safetensors", {"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"}),
        "uncond": save_tiny(root / "uncond.safetensors", {"kind": "pixel", "channels": 1}, in_channels=1,
                            num_classes=0),
        "mismatch": save_tiny(root / "mismatch.safetensors", {"kind": "pixel", "channels": 1}),
        "nodrop": save_tiny(root / "nodrop.safetensors", {"kind": "pixel", "channels": 1}, in_channels=1,
                            class_dropout_prob=0.0),
        "vae": root / "vae",
    }


@pytest.fixture(autouse=True)
def no_downloads(offline):
    """Every test here runs offline with a private cache home."""


def summary(*args):
    return json.loads(ok(*args, "--json").stdout.strip().splitlines()[-1])


def test_pixel_model_writes_pngs_grid_provenance_and_npz(files, tmp_path):
    out, npz = tmp_path / "out", tmp_path / "s.npz"
    result = summary("sample", "--ckpt", files["pixel"], "--class", "sneaker", "--class", "BAG", "--num-per-class", 2,
                     "--steps", 5, "--sampler", "ddim", "--cfg", 3, "--out", out, "--npz", npz)
    assert result["nfe"] == 5 and result["generated"] == 4
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == ["000000_7-sneaker_seed0.png", "000001_7-sneaker_seed0.png", "000002_8-bag_seed0.png",
                     "000003_8-bag_seed0.png"]
    png = Image.open(out / names[2])
    assert png.size == (8, 8) and png.mode == "L"
    assert png.text["class"] == "8" and png.text["sampler"] == "ddim" and png.text["cfg"] == "3.0"
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 96 + 2 and grid.size[1] > 2 * 96  # two columns (per class), rows with captions

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["checkpoint_sha256"] == hashlib.sha256(files["pixel"].read_bytes()).hexdigest()
    assert provenance["nfe"] == 5 and provenance["cfg"] == 3.0 and provenance["guidance_channels"] == "paper"
    assert provenance["codec"] == {"kind": "pixel", "channels": 1} and provenance["precision"] == "float32"
    assert provenance["labels"] == [7, 7, 8, 8] and provenance["complete"] is True

    with zipfile.ZipFile(npz) as archive:
        assert archive.namelist() == ["arr_0.npy"]
    images = np.load(npz)["arr_0"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert np.array_equal(images[2, ..., 0], np.asarray(png))
    assert not (tmp_path / "s.npz.parts").exists()
    assert json.loads((tmp_path / "s.provenance.json").read_text())["run_key"] == result["run_key"]


def test_latent_model_decodes_through_the_vae(files, tmp_path):
    result = summary("sample", "--ckpt", files["latent"], "--num", 3, "--steps", 3, "--sampler", "dpm++2m",
                     "--cfg", 1.5, "--guidance-channels", "all", "--npz", tmp_path / "s.npz")
    assert result["nfe"] == 3
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0


def test_vae_option_overrides_the_recorded_codec(files, tmp_path):
    result = dit("sample", "--ckpt", files["ema"], "--num", 1, "--steps", 2, "--npz", tmp_path / "a.npz")
    assert result.exit_code == 2 and "cannot load the VAE 'stabilityai/sd-vae-ft-ema'" in result.output
    assert not (tmp_path / "a.npz").exists()
    ok("sample", "--ckpt", files["ema"], "--vae", files["vae"], "--num", 1, "--steps", 2, "--npz", tmp_path / "a.npz")
    assert np.load(tmp_path / "a.npz")["arr_0"].shape == (1, 16, 16, 3)


def test_batch_size_does_not_change_any_image(files, tmp_path):
    common = ["sample", "--ckpt", files["pixel"], "--num", 6, "--steps", 4, "--sampler", "ddpm", "--cfg", 2]
    ok(*common, "--batch-size", 1, "--npz", tmp_path / "one.npz")
    ok(*common, "--batch-size", 4, "--npz", tmp_path / "four.npz")
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "four.npz").read_bytes()
    assert np.load(tmp_path / "one.npz")["arr_0"].std() > 0


def test_rerun_skips_finished_images_and_rebuilds_the_same_files(files, tmp_path):
    common = ["sample", "--ckpt", files["pixel"], "--num", 5, "--steps", 3, "--sampler", "euler", "--out",
              tmp_path / "out"]
    ok(*common)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("0*.png")}
    for name in sorted(first)[:2]:
        (tmp_path / "out" / name).unlink()
    result = summary(*common)
    assert (result["skipped"], result["generated"]) == (3, 2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("0*.png")} == first


def test_interrupted_npz_run_leaves_no_file_and_resumes(files, tmp_path, monkeypatch):
    common = ["sample", "--ckpt", files["pixel"], "--num", 10, "--steps", 3, "--batch-size", 4]
    ok(*common, "--npz", tmp_path / "clean.npz")

    real = ditcli.sampling.generate.generate_images

    def dies_after_one_batch(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(ditcli.sampling.generate, "generate_images", dies_after_one_batch)
    result = dit(*common, "--npz", tmp_path / "s.npz")
    assert result.exit_code != 0
    assert not (tmp_path / "s.npz").exists() and len(list((tmp_path / "s.npz.parts").glob("shard-*.json"))) == 1
    monkeypatch.setattr(ditcli.sampling.generate, "generate_images", real)
    result = summary(*common, "--npz", tmp_path / "s.npz")
    assert (result["skipped"], result["generated"]) == (4, 6)
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "clean.npz").read_bytes()


def test_another_run_in_the_same_out_is_refused_unless_forced(files, tmp_path):
    common = ["sample", "--ckpt", files["pixel"], "--num", 2, "--steps", 2, "--out", tmp_path / "out"]
    ok(*common, "--seed", 1)
    result = dit(*common, "--seed", 2)
    assert result.exit_code == 2 and "holds samples of a different run" in result.output
    ok(*common, "--seed", 2, "--force")
    assert sorted(p.name[-10:] for p in (tmp_path / "out").glob("0*.png")) == ["_seed2.png", "_seed2.png"]


def test_unconditional_model_samples_with_cfg_ignored(files, tmp_path):
    ok("sample", "--ckpt", files["uncond"], "--num", 2, "--steps", 2, "--cfg", 4, "--out", tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["cfg"] is None and provenance["cfg_ignored"] is True and provenance["nfe"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("0*.png")) == ["000000_uncond_seed0.png",
                                                                         "000001_uncond_seed0.png"]
    result = dit("sample", "--ckpt", files["uncond"], "--class", 1, "--out", tmp_path / "o2")
    assert result.exit_code == 2 and "unconditional" in result.output
    result = dit("sample", "--ckpt", files["uncond"], "--num-per-class", 2, "--out", tmp_path / "o3")
    assert result.exit_code == 2 and "unconditional" in result.output and not (tmp_path / "o3").exists()


def test_num_per_class_without_class_draws_every_class(files, tmp_path):
    result = summary("sample", "--ckpt", files["pixel"], "--num-per-class", 2, "--steps", 2, "--out", tmp_path / "o")
    assert result["generated"] == 2 * len(FASHION)
    classes = [int(p.name.split("_")[1].split("-")[0]) for p in sorted((tmp_path / "o").glob("0*.png"))]
    assert classes == [c for c in range(len(FASHION)) for _ in range(2)]


def test_known_model_is_found_in_a_weights_folder_with_its_defaults(files, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    payload = files["pixel"].read_bytes()
    (folder / "fashion-mnist-ddpm.safetensors").write_bytes(payload)
    monkeypatch.setattr(ditcli.weights.registry, "weights_dirs", lambda: [folder])
    key = ("fashion-mnist-ddpm", None)  # the tiny file stands in for the release: the registry names its size and hash
    monkeypatch.setitem(ditcli.weights.registry.REGISTRY, key, dataclasses.replace(
        ditcli.weights.registry.REGISTRY[key], size=len(payload), sha256=hashlib.sha256(payload).hexdigest()))
    ok("sample", "--model", "fashion-mnist-ddpm", "--class", "sneaker", "--num-per-class", 1, "--steps", 2,
       "--out", tmp_path / "out")
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    # dpm++2m is the registry's default for this model (the generic default is ddpm).
    assert (provenance["model"], provenance["sampler"], provenance["cfg"]) == ("fashion-mnist-ddpm", "dpm++2m", 4.0)
    result = ok("classes", "--model", "fashion-mnist-ddpm")
    assert "Sneaker" in result.stdout and "Ankle boot" in result.stdout


def test_missing_released_weights_offline_say_what_to_do(tmp_path):
    result = dit("sample", "--model", "DiT-XL/2", "--image-size", 512, "--class", 207, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt" in result.output
    assert str(tmp_path / "home") in result.output and not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun_match_one(files, tmp_path):
    # torchrun would take --num for an abbreviation of its own --numa-binding, hence --num-images.
    common = ["sample", "--ckpt", files["pixel"], "--num-images", 6, "--steps", 3, "--batch-size", 2, "--sampler",
              "ddpm"]
    ok(*common, "--npz", tmp_path / "one.npz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "ditcli",
                          *map(str, common), "--npz", str(tmp_path / "two.npz"), "--json"],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    reported = json.loads(run.stdout.strip().splitlines()[-1])
    assert reported["generated"] == 3  # rank 0's share
    assert (tmp_path / "two.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--class", "10"], "class 10 is out of range (this model has 10 classes, ids 0 to 9)"),
    (["--class", "snekaer"], "unknown class 'snekaer' (close matches: Sneaker (7)"),
    (["--cfg", "-1"], "--cfg -1 is out of range"),
    (["--steps", "0"], "--steps must be between 1 and"),
    (["--batch-size", "0"], "--batch-size must be between 1 and"),
    (["--num", "0"], "--num must be between 1 and"),
    (["--sampler", "plms"], "unknown sampler 'plms' (choose from ddpm, ddim, dpm++2m, unipc, euler, heun)"),
    (["--guidance-interval", "700"], "--guidance-interval '700' is not LOW,HIGH"),
])
def test_bad_input_is_one_line_with_no_file_written(files, tmp_path, args, message):
    result = dit("sample", "--ckpt", files["pixel"], "--out", tmp_path / "out", "--npz", tmp_path / "s.npz", *args)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {result.output.strip()[7:]}"]
    assert message in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.npz").exists()


def test_unwritable_out_is_one_line(files, tmp_path):
    (tmp_path / "file").write_text("")
    result = dit("sample", "--ckpt", files["pixel"], "--num", 1, "--out", tmp_path / "file" / "out")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--out" in result.output and "is not writable" in result.output


def test_missing_checkpoint_is_one_line(tmp_path):
    result = dit("sample", "--ckpt", tmp_path / "nope.safetensors", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "checkpoint not found" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_codec_channel_mismatch_is_one_line(files, tmp_path):
    result = dit("sample", "--ckpt", files["mismatch"], "--out", tmp_path / "out")
    assert result.exit_code == 2 and "takes 4 input channels but its codec" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_classes_lists_imagenet_with_search():
    result = ok("classes", "--search", "retriever")
    assert "golden retriever" in result.stdout and "n02099601" in result.stdout and "tench" not in result.stdout
    everything = json.loads(ok("classes", "--json").stdout)
    assert len(everything) == 1000 and everything[207]["wnid"] == "n02099601"


def test_classes_of_a_checkpoint_show_its_own_names(files):
    names = json.loads(ok("classes", "--ckpt", files["pixel"], "--json").stdout)
    assert [c["names"][0] for c in names] == FASHION
    result = dit("classes", "--ckpt", files["pixel"], "--search", "retriever")
    assert result.exit_code == 2 and "no class matches 'retriever'" in result.output


def test_guidance_needs_a_null_class(files, tmp_path):
    result = dit("sample", "--ckpt", files["nodrop"], "--cfg", 4, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "trained without label dropout" in result.output and "--cfg 1" in result.output
    assert not (tmp_path / "out").exists()
    ok("sample", "--ckpt", files["nodrop"], "--cfg", 1, "--num", 1, "--steps", 2, "--out", tmp_path / "out")


VAE_BF16_BOUND = 16  # uint8 levels, max over pixels, bf16 against fp32 decode (measured 11 on random VAE weights)


def test_a_bf16_run_decodes_with_a_bf16_copy_of_the_vae_within_the_stated_bound(files, tmp_path):
    from ditcli.model.codec import VaeCodec, to_uint8

    codec = VaeCodec.load(str(files["vae"]))
    assert codec.decoding_in(torch.float16) is codec  # fp16 runs decode in fp32
    bf16 = codec.decoding_in(torch.bfloat16)
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16 and next(codec.vae.parameters()).dtype == torch.float32
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    error = (to_uint8(bf16.decode(latents)).int() - to_uint8(codec.decode(latents)).int()).abs().max()
    assert 0 < int(error) <= VAE_BF16_BOUND
    ok("sample", "--ckpt", files["latent"], "--class", 1, "--steps", 2, "--precision", "bf16", "--out", tmp_path / "o")
    record = json.loads((tmp_path / "o" / "provenance.json").read_text())
    assert (record["precision"], record["vae_dtype"]) == ("bfloat16", "bfloat16")
