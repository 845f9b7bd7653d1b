"""dit train: resume bit-exactness, data-parallel equivalence, the NaN guard, data sources and the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.data.sources import load_folder
from ditcli.errors import UserError
from ditcli.io import safe_torch_load
from ditcli.training.config import TrainConfig
from ditcli.training.draws import TrainingData
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import load_checkpoint

TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=100, seed=3)


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(24, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(24) % 3
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=images, labels=labels, class_names=np.array(["a", "b", "c"]))
    return path


def run(out: Path, data: Path, steps: int, resume=None, **overrides) -> Trainer:
    trainer = Trainer(TrainConfig(data=str(data), out=str(out), steps=steps, **{**TINY, **overrides}), resume=resume)
    trainer.run()
    return trainer


def test_resume_is_bit_exact(tmp_path, npz_data):
    straight = run(tmp_path / "a", npz_data, steps=6)
    run(tmp_path / "b", npz_data, steps=3)
    resumed = run(tmp_path / "b", npz_data, steps=6, resume="auto")
    assert resumed.state.step == 6
    for (name, a), b in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), name
    # The interrupted run left its own checkpoint at step 3 next to the final one.
    assert (tmp_path / "b" / "ckpt-0000003.pt").exists() and (tmp_path / "b" / "ckpt-0000006.pt").exists()


def test_resume_drops_the_metrics_logged_after_the_checkpoint(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=5, ckpt_every=2)  # checkpoints at 2 and 4 (and 5, removed below)
    (tmp_path / "ckpt-0000005.pt").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.')  # a write torn by the interruption
    run(tmp_path, npz_data, steps=6, ckpt_every=2, resume="auto")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_micro_batches_accumulate_to_the_same_weights(tmp_path, npz_data):
    whole = run(tmp_path / "a", npz_data, steps=2)
    split = run(tmp_path / "b", npz_data, steps=2, micro_batch=3)
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_checkpoint_is_plain_data_and_loads_as_a_model(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=2)
    data = safe_torch_load(tmp_path / "ckpt-0000002.pt")
    assert data["step"] == 2 and data["config"]["train"]["global_batch"] == 8
    assert data["class_names"] == ["a", "b", "c"] and data["codec"] == {"kind": "pixel", "channels": 1}
    assert "torch" in data["versions"] and len(data["rng"]) == 1
    checkpoint = load_checkpoint(tmp_path / "ckpt-0000002.pt")
    assert checkpoint.config.num_classes == 3 and checkpoint.config.in_channels == 1
    assert torch.equal(checkpoint.state_dict["blocks.0.attn.qkv.weight"], data["ema"]["blocks.0.attn.qkv.weight"])


def test_keeps_only_the_last_checkpoints(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=5, ckpt_every=1, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000004.pt", "ckpt-0000005.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_incompatible_resume_is_refused_unless_forced(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=2)
    with pytest.raises(UserError, match="lr: 0.001 -> 0.002"):
        run(tmp_path, npz_data, steps=3, resume="auto", lr=2e-3)
    forced = Trainer(TrainConfig(data=str(npz_data), out=str(tmp_path), steps=3, **{**TINY, "lr": 2e-3}),
                     resume="auto", force=True)
    forced.run()
    assert forced.state.step == 3


def test_cosine_schedule_warms_up_then_anneals_to_zero_at_the_last_step():
    config = TrainConfig(data="x", lr=1e-3, lr_schedule="cosine", lr_warmup=10, steps=110)
    assert [config.lr_at(s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert config.lr_at(60) == pytest.approx(5e-4) and config.lr_at(110) == 0.0
    assert all(a >= b for a, b in zip(map(config.lr_at, range(9, 110)), map(config.lr_at, range(10, 111))))
    assert {TrainConfig(data="x", lr=1e-3, steps=110).lr_at(s) for s in (0, 50, 109)} == {1e-3}


def test_the_optimizer_follows_the_schedule_across_a_resume(tmp_path, npz_data):
    schedule = dict(lr_schedule="cosine", lr_warmup=2, ckpt_every=3)
    run(tmp_path / "a", npz_data, steps=6, **schedule)
    asked = iter(range(100))
    stopped = Trainer(TrainConfig(data=str(npz_data), out=str(tmp_path / "b"), steps=6, **{**TINY, **schedule}),
                      should_stop=lambda: next(asked) >= 2)  # a 6-step cosine run stopped after its third step
    assert stopped.run()["step"] == 3
    resumed = run(tmp_path / "b", npz_data, steps=6, resume="auto", **schedule)
    config = resumed.config
    for name in ("a", "b"):
        logged = [json.loads(line)["lr"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert logged == pytest.approx([config.lr_at(step) for step in range(6)]), name
    with pytest.raises(UserError, match="lr_schedule: 'cosine' -> 'constant'"):
        run(tmp_path / "b", npz_data, steps=7, resume="auto", ckpt_every=3)


def test_a_checkpoint_from_before_the_schedule_resumes_as_constant(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=2)
    path = tmp_path / "ckpt-0000002.pt"
    payload = torch.load(path, weights_only=False)
    for key in ("lr_schedule", "lr_warmup"):
        del payload["config"]["train"][key]
    torch.save(payload, path)
    assert run(tmp_path, npz_data, steps=3, resume="auto").state.step == 3


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path, npz_data, monkeypatch):
    original = TrainingData.x_start
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        x = original(self, *args)
        return x * float("nan") if calls["n"] == 2 else x

    monkeypatch.setattr(TrainingData, "x_start", poisoned)
    trainer = run(tmp_path / "one", npz_data, steps=3)
    assert trainer.state.bad_steps == 1 and trainer.state.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    monkeypatch.setattr(TrainingData, "x_start", lambda self, *args: original(self, *args) * float("nan"))
    with pytest.raises(UserError, match="3 consecutive steps with a non-finite"):
        run(tmp_path / "two", npz_data, steps=10, max_bad_steps=3)


def _write(path: Path, mode: str, size: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {"L": 128, "RGB": (10, 20, 30), "RGBA": (10, 20, 30, 128), "CMYK": (0, 50, 100, 0)}[mode]
    Image.new(mode, (size, size + 3), color).save(path)


def test_folder_classes_conversions_and_skips(tmp_path):
    _write(tmp_path / "cats" / "a.png", "RGBA", 12)
    _write(tmp_path / "cats" / "b.jpg", "CMYK", 12)
    _write(tmp_path / "dogs" / "c.png", "L", 16)
    _write(tmp_path / "dogs" / "tiny.png", "RGB", 4)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    images = load_folder(tmp_path, image_size=8, channels=3)
    assert images.class_names == ["cats", "dogs"]
    assert images.images.shape == (3, 8, 8, 3) and list(images.labels) == [0, 0, 1]
    assert len(images.skipped) == 2 and any("broken.png" in s for s in images.skipped)
    gray = load_folder(tmp_path, image_size=8, channels=1)
    assert gray.images.shape == (3, 8, 8, 1)


def test_flat_folder_trains_an_unconditional_model(tmp_path):
    for i in range(4):
        _write(tmp_path / "flat" / f"{i}.png", "RGB", 10)
    images = load_folder(tmp_path / "flat", image_size=8, channels=3)
    assert images.class_names is None and images.num_classes == 0
    trainer = run(tmp_path / "run", tmp_path / "flat", steps=1, channels=3, global_batch=4)
    assert trainer.model.config.num_classes == 0 and trainer.model.y_embedder.embedding_table.weight.shape[0] == 1


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.mkdir(), "no images found"),
    (lambda p: _write(p / "x.png", "RGB", 4), "no usable images"),
])
def test_bad_folders_give_clear_errors(tmp_path, setup, message):
    setup(tmp_path / "data")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "data"), "--vae", "none",
                                      "--image-size", "8", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_image_size_must_fit_the_patch_and_vae(tmp_path, npz_data):
    result = CliRunner().invoke(app, ["train", "--data", str(npz_data), "--image-size", "20", "--model", "DiT-S/2",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not a multiple of 8 x patch = 16" in result.output


def test_cli_end_to_end_then_sample_from_the_checkpoint(tmp_path, npz_data):
    args = ["train", "--data", str(npz_data), "--out", str(tmp_path), "--model", "DiT-S/2", "--hidden-size", "32",
            "--depth", "2", "--num-heads", "2", "--image-size", "8", "--vae", "none", "--channels", "1",
            "--global-batch", "4", "--steps", "3", "--sample-every", "3", "--log-every", "1", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["step"] == 3 and not summary["interrupted"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"loss", "grad_norm", "img_per_s", "lr", "peak_mem_mb"} <= set(records[0])
    assert (tmp_path / "samples" / "step-0000003.png").exists()


def test_latent_cache_is_built_once_with_flips(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i}.png")
    config = dict(TINY, vae=str(tmp_path / "vae"), image_size=16, channels=3, global_batch=2)
    first = run(tmp_path / "run", tmp_path / "imgs", steps=1, **config)
    meta = json.loads((tmp_path / "run" / "latents" / "meta.json").read_text())
    assert meta["vae"] == str(tmp_path / "vae") and meta["scale"] == pytest.approx(vae.config.scaling_factor)
    mean = np.load(tmp_path / "run" / "latents" / "shard-00000-mean.npy")
    assert mean.shape == (3, 2, 4, 2, 2) and not np.allclose(mean[:, 0], mean[:, 1])
    stamp = (tmp_path / "run" / "latents" / "shard-00000-mean.npy").stat().st_mtime_ns
    second = run(tmp_path / "run", tmp_path / "imgs", steps=2, resume="auto", **config)
    assert (tmp_path / "run" / "latents" / "shard-00000-mean.npy").stat().st_mtime_ns == stamp
    assert first.model.config.in_channels == 4 and second.state.step == 2


def test_two_gloo_processes_match_one(tmp_path, npz_data):
    common = ["--data", str(npz_data), "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads",
              "2", "--image-size", "8", "--vae", "none", "--channels", "1", "--global-batch", "8", "--steps", "3",
              "--lr", "1e-3", "--device", "cpu", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ditcli", "train", "--out", str(tmp_path / "one"), *common],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "ditcli", "train", "--out", str(tmp_path / "two"), *common],
                            capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    one = safe_torch_load(tmp_path / "one" / "ckpt-0000003.pt")
    two = safe_torch_load(tmp_path / "two" / "ckpt-0000003.pt")
    assert len(two["rng"]) == 2
    for key in ("model", "ema"):
        for name, tensor in one[key].items():
            torch.testing.assert_close(two[key][name], tensor, rtol=0, atol=1e-5, msg=f"{key}.{name}")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_resume_restores_the_cuda_generator_only_on_cuda(tmp_path, npz_data, monkeypatch, device):
    trainer = run(tmp_path, npz_data, steps=2)
    data = safe_torch_load(tmp_path / "ckpt-0000002.pt")
    saved_cpu = data["rng"][0]["torch"]
    data["rng"][0]["cuda"] = torch.arange(16, dtype=torch.uint8)  # what a CUDA run stores beside the CPU state
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev="cuda": restored.append((state, dev)))
    torch.manual_seed(12345)  # the CPU state must come back from the checkpoint, not stay as this
    trainer.device = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    trainer.load_checkpoint(data, tmp_path / "ckpt-0000002.pt")
    assert torch.equal(torch.get_rng_state(), saved_cpu)
    if device == "cpu":
        assert restored == []
    else:
        [(state, dev)] = restored
        assert torch.equal(state, data["rng"][0]["cuda"]) and torch.device(dev) == torch.device("cuda", 0)


def test_resume_without_a_saved_cuda_state_leaves_the_cuda_generator(tmp_path, npz_data, monkeypatch):
    trainer = run(tmp_path, npz_data, steps=2)
    data = safe_torch_load(tmp_path / "ckpt-0000002.pt")  # a CPU run's checkpoint: no "cuda" entry
    assert "cuda" not in data["rng"][0]
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, dev="cuda": restored.append((state, dev)))
    trainer.device = torch.device("cuda", 0)
    trainer.load_checkpoint(data, tmp_path / "ckpt-0000002.pt")
    assert restored == []


def test_missing_data_is_reported_before_any_vae_lookup(tmp_path, monkeypatch):
    def vae_lookup(*args, **kwargs):
        raise AssertionError("the VAE was looked up before --data was checked")

    monkeypatch.setattr("ditcli.training.trainer.locate_vae", vae_lookup)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nothere"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "error: data not found" in result.output and "VAE" not in result.output
    assert not (tmp_path / "run").exists()
