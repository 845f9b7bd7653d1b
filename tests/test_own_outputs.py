"""The tool reads its own outputs and the data it names (issue 16, section 2): grayscale `.npz` in `dit fid`, every
`dit train` data source in `--make-ref`, a checkpoint's own sampling defaults and EMA record, resume by data, and
conversion reports that call expected rounding expected."""

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit, ok, perturbed, tiny_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ditcli.data.sources
from ditcli.cli.app import app
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.errors import UserError
from ditcli.evaluation import features
from ditcli.model.dit import DiT
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.ema import EmaRecord, ema_decay_at, start_share
from ditcli.weights.record import Checkpoint
from ditcli.weights.registry import known_weights

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=4, lr=1e-3, log_every=1, ckpt_every=100, seed=3)


@pytest.fixture(autouse=True)
def no_downloads(offline):
    """Every test here runs offline with a private cache home."""


def last_json(result) -> dict:
    """The --json result: the whole output (dit fid indents it) or its last line (after any progress text)."""
    text = result.stdout.strip()
    return json.loads(text[text.index("{"):] if text.startswith("{") else text.splitlines()[-1])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def save_pixel_model(path: Path, sampling: SamplingDefaults | None = None, ema: EmaRecord | None = None,
                     dtype=None, **overrides) -> Path:
    torch.manual_seed(0)
    config = tiny_config(in_channels=1, **overrides)
    model = perturbed(DiT(config), std=0.02)
    checkpoint = Checkpoint(model.state_dict(), config, "safetensors", codec={"kind": "pixel", "channels": 1},
                            class_names=[str(i) for i in range(config.num_classes)], sampling=sampling, ema=ema)
    save_safetensors(checkpoint, path, dtype=dtype)
    return path


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, size=(12, 8, 8, 1), dtype=np.uint8), labels=np.arange(12) % 3,
             class_names=np.array(["a", "b", "c"]))
    return path


def train(out: Path, data, steps: int, resume=None, **overrides) -> Trainer:
    events = []
    trainer = Trainer(TrainConfig(data=str(data), out=str(out), steps=steps, **{**TINY, **overrides}),
                      on_event=lambda kind, info: events.append((kind, info)), resume=resume)
    trainer.run()
    trainer.events = events
    return trainer


# dit fid reads what dit sample writes.

def test_fid_scores_the_grayscale_npz_dit_sample_writes_like_its_pngs(tmp_path):
    model = save_pixel_model(tmp_path / "m.safetensors")
    ok("sample", "--ckpt", model, "--num", 6, "--steps", 2, "--sampler", "ddim", "--cfg", 1,
       "--out", tmp_path / "pngs", "--npz", tmp_path / "s.npz")
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (6, 8, 8, 1)
    flat = tmp_path / "flat.npz"
    np.savez(flat, arr_0=np.load(tmp_path / "s.npz")["arr_0"][..., 0])  # (N, H, W)
    scores = [last_json(ok("fid", samples, "--ref", tmp_path / "pngs", "--features", "fashion-judge", "--json"))
              for samples in (tmp_path / "s.npz", flat, tmp_path / "pngs")]
    assert scores[0]["fid"] == pytest.approx(scores[2]["fid"], abs=1e-6)  # the same images, as npz or PNGs
    assert scores[1]["fid"] == pytest.approx(scores[2]["fid"], abs=1e-6)


def test_grayscale_reaches_a_3_channel_extractor_as_three_equal_channels(tmp_path):
    seen = []

    def factory(path, device):
        def extract(images):
            seen.append(images.shape[1])
            assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 1], images[:, 2])
            return images.float().mean(dim=(2, 3))  # (N, 3)
        return extract

    features.register_feature_extractor("test-rgb-only", factory)
    images = np.random.default_rng(1).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images)
    np.savez(tmp_path / "r.npz", arr_0=images[::-1].copy())
    ok("fid", tmp_path / "s.npz", "--ref", tmp_path / "r.npz", "--features", "test-rgb-only")
    assert seen and set(seen) == {3}


# --make-ref reads every dit train data source.

def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{prefix}-images-idx3-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", *images.shape) + images.tobytes())
    with open(folder / f"{prefix}-labels-idx1-ubyte", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", len(labels)) + labels.astype(np.uint8).tobytes())


@pytest.fixture
def idx_folder(tmp_path, monkeypatch) -> Path:
    rng = np.random.default_rng(2)
    folder = tmp_path / "idx"
    write_idx(folder, "train", rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), np.arange(7) % 10)
    write_idx(folder, "t10k", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.arange(5) % 10)
    monkeypatch.setattr(ditcli.data.sources, "FASHION_MNIST_DIR", folder)
    return folder


def make_ref(*args):
    return last_json(ok("fid", "--make-ref", *args, "--features", "fashion-judge", "--json"))


@pytest.mark.parametrize("source, split, count", [
    ("fashion-mnist", None, 7), ("fashion-mnist", "test", 5), ("fashion-mnist:test", None, 5),
    ("IDX", None, 7), ("IDX", "test", 5),
])
def test_make_ref_reads_idx_data_and_picks_the_split(tmp_path, idx_folder, source, split, count):
    source = str(idx_folder) if source == "IDX" else source
    result = make_ref(source, "-o", tmp_path / "ref.npz", *(["--split", split] if split else []))
    assert result["num_images"] == count and result["resolution"] == 28
    arr = np.load(tmp_path / "ref.npz")["arr_0"]
    expected = ditcli.data.sources.load_fashion_mnist(idx_folder, split or ("test" if ":test" in source else "train"))
    assert arr.shape == (count, 28, 28, 3) and np.array_equal(arr[..., 0], expected.images[..., 0])


def test_make_ref_reads_an_npz_and_an_image_folder(tmp_path, npz_data):
    assert make_ref(npz_data, "-o", tmp_path / "a.npz")["num_images"] == 12
    assert np.load(tmp_path / "a.npz")["arr_0"].shape == (12, 8, 8, 3)  # its own size without --resize
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(folder / f"{i}.png")
    assert make_ref(folder, "-o", tmp_path / "b.npz", "--resize", 8)["num_images"] == 3


def test_make_ref_split_errors(tmp_path, npz_data, idx_folder):
    assert "--split applies to idx data" in one_error(dit("fid", "--make-ref", npz_data, "-o", tmp_path / "r.npz",
                                                          "--split", "test"))
    assert "unknown split 'dev'" in one_error(dit("fid", "--make-ref", "fashion-mnist", "-o", tmp_path / "r.npz",
                                                  "--split", "dev"))
    assert "give the split once" in one_error(dit("fid", "--make-ref", "fashion-mnist:test", "-o",
                                                  tmp_path / "r.npz", "--split", "train"))
    assert "--split only applies to --make-ref" in one_error(dit("fid", npz_data, "--ref", npz_data, "--split",
                                                                 "test"))
    assert not (tmp_path / "r.npz").exists()


# --npz alone.

def test_npz_alone_writes_what_its_help_says(tmp_path, monkeypatch):
    import typer.main

    command = typer.main.get_command(app).commands["sample"]
    help_text = next(p.help for p in command.params if "--npz" in p.opts)
    assert "Also write" not in help_text and "written only if --out is given too" in help_text
    monkeypatch.chdir(tmp_path)
    model = save_pixel_model(tmp_path / "m.safetensors")
    ok("sample", "--ckpt", model, "--num", 2, "--steps", 1, "--sampler", "ddim", "--npz", "s.npz")
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "home")  # home: the cache, remembered hashes
    assert written == ["m.safetensors", "s.npz", "s.provenance.json"]


# A checkpoint's own sampling defaults.

@pytest.mark.parametrize("name, expected, ema, objective", [  # every EMA is a later stage's, started from the last one's
    ("fashion-mnist", SamplingDefaults("flow-map", 2, 1.0), EmaRecord(0.999, True, 3443, True), "meanflow"),
    ("fashion-mnist-flow", SamplingDefaults("euler", 9, 3.0, (0.156, 0.781)), EmaRecord(0.999, True, 6517, True),
     "flow"),
    ("fashion-mnist-ddpm", SamplingDefaults("dpm++2m", 10, 4.0, (82.0, 578.0)), EmaRecord(0.999, True, 5000), "ddpm"),
])  # docs/meanflow.md (2 forwards per image), docs/flow.md (15) and docs/fashion-mnist.md
def test_the_shipped_files_record_the_defaults_their_registry_entries_give(name, expected, ema, objective):
    entry = known_weights(name)
    checkpoint = load_checkpoint(WEIGHTS / entry.filename)
    assert checkpoint.sampling == expected == entry.sampling
    assert (checkpoint.objective.name, checkpoint.objective_recorded) == (objective, True)
    assert entry.objective is None or entry.objective == checkpoint.objective
    assert checkpoint.ema == ema


def test_sample_ckpt_uses_the_files_own_defaults(tmp_path):
    model = save_pixel_model(tmp_path / "m.safetensors", sampling=SamplingDefaults("ddim", 3, 2.0))
    ok("sample", "--ckpt", model, "--num", 2, "--out", tmp_path / "a")
    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert (provenance["sampler"], provenance["steps"], provenance["nfe"], provenance["cfg"]) == ("ddim", 3, 3, 2.0)
    ok("sample", "--ckpt", model, "--num", 2, "--out", tmp_path / "b", "--steps", 2, "--cfg", 1)  # options win
    provenance = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert (provenance["sampler"], provenance["steps"], provenance["cfg"]) == ("ddim", 2, 1.0)


def test_a_recorded_guidance_interval_is_the_default_and_none_turns_it_off(tmp_path):
    model = save_pixel_model(tmp_path / "m.safetensors", sampling=SamplingDefaults("ddim", 3, 2.0, (100.0, 600.0)))
    assert load_checkpoint(model).sampling.interval == (100.0, 600.0)
    for name, options, expected in (("a", (), [100.0, 600.0]), ("b", ("--guidance-interval", "none"), None),
                                    ("c", ("--guidance-interval", "0,300"), [0.0, 300.0])):
        ok("sample", "--ckpt", model, "--num", 2, "--out", tmp_path / name, *options)
        assert json.loads((tmp_path / name / "provenance.json").read_text())["guidance_interval"] == expected


@pytest.mark.parametrize("record", ['{"sampler": "ddim", "steps": 3, "cfg": 2, "interval": [5]}',
                                    '{"sampler": "ddim", "steps": 3, "cfg": 2, "interval": [600, 100]}'])
def test_an_unusable_recorded_interval_is_one_error_line(tmp_path, record):
    model = save_pixel_model(tmp_path / "m.safetensors")
    tensors = load_file(str(model))
    with safe_open(str(model), "pt") as f:
        metadata = {**f.metadata(), "sampling": record}
    save_file(tensors, str(model), metadata=metadata)
    with pytest.raises(UserError, match="unusable sampling record: its interval"):
        load_checkpoint(model)


def test_train_and_convert_write_the_defaults(tmp_path, npz_data):
    train(tmp_path / "run", npz_data, steps=2)
    ckpt = tmp_path / "run" / "ckpt-0000002.pt"
    assert load_checkpoint(ckpt).sampling == SamplingDefaults("dpm++2m", 25, 4.0)
    ok("convert", ckpt, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["sampling"]) == {"sampler": "dpm++2m", "steps": 25, "cfg": 4.0}
    nodrop = train(tmp_path / "nodrop", npz_data, steps=1, class_dropout_prob=0.0)
    assert load_checkpoint(tmp_path / "nodrop" / "ckpt-0000001.pt").sampling.cfg == 1.0  # no null class to guide
    assert nodrop.model_config.class_dropout_prob == 0.0


# EMA too fresh.

def test_start_share_of_the_ema():
    for decay, warmup, updates in [(0.5, True, 3), (0.9, True, 50), (0.999, True, 5000), (0.05, True, 4),
                                   (0.999, False, 700), (0.9999, True, 20_000)]:
        product = math.prod(ema_decay_at(decay, warmup, n) for n in range(updates))
        assert start_share(decay, warmup, updates) == pytest.approx(product, rel=1e-9, abs=1e-300)
    assert start_share(0.9999, False, 5000) == pytest.approx(0.9999 ** 5000)
    assert start_share(0.999, True, 7017) < 1e-6
    assert start_share(0.5, True, 0) == 1.0
    assert EmaRecord(0.9999, False, 50_000).staleness() is None
    assert "61% of them are still the initial weights" in EmaRecord(0.9999, False, 5000).staleness()


def test_a_fresh_ema_warns_in_train_and_sample_and_the_weights_are_named(tmp_path, npz_data):
    trainer = train(tmp_path / "run", npz_data, steps=3, ema_decay=0.9999)
    assert any(kind == "warning" and "still the initial weights" in info["message"]
               for kind, info in trainer.events)
    ckpt = tmp_path / "run" / "ckpt-0000003.pt"
    ema = last_json(ok("sample", "--ckpt", ckpt, "--num", 1, "--steps", 1, "--npz", tmp_path / "a.npz", "--json"))
    assert ema["weights"] == "ema" and "still the initial weights" in ema["warnings"][0]
    shown = ok("sample", "--ckpt", ckpt, "--num", 1, "--steps", 1, "--npz", tmp_path / "c.npz")
    assert "warning: the EMA weights have followed only 3 steps" in shown.output
    assert "from the EMA weights" in shown.output
    ok("sample", "--ckpt", ckpt, "--num", 1, "--steps", 1, "--out", tmp_path / "pngs", "--weights", "model")
    assert Image.open(next((tmp_path / "pngs").glob("000000_*.png"))).text["weights"] == "model"
    raw = last_json(ok("sample", "--ckpt", ckpt, "--num", 1, "--steps", 1, "--npz", tmp_path / "b.npz", "--json",
                       "--weights", "model"))
    assert raw["weights"] == "model" and raw["warnings"] == []
    assert json.loads((tmp_path / "b.provenance.json").read_text())["weights"] == "model"
    # The record survives a conversion, so the .safetensors warns too.
    ok("convert", ckpt, tmp_path / "m.safetensors")
    converted = last_json(ok("sample", "--ckpt", tmp_path / "m.safetensors", "--num", 1, "--steps", 1, "--npz",
                             tmp_path / "d.npz", "--json"))
    assert "still the initial weights" in converted["warnings"][0]
    assert "holds only its ema weights" in one_error(dit("sample", "--ckpt", tmp_path / "m.safetensors", "--weights",
                                                         "model", "--npz", tmp_path / "e.npz"))
    warmed = train(tmp_path / "warm", npz_data, steps=3, ema_decay=0.9999, ema_warmup=True)
    assert not any(kind == "warning" for kind, _ in warmed.events)


# --resume compares the data, not its spelling.

def test_resume_accepts_the_same_data_spelled_differently(tmp_path, npz_data, monkeypatch):
    monkeypatch.chdir(npz_data.parent)
    train(tmp_path / "run", npz_data, steps=2)
    resumed = train(tmp_path / "run", f"./{npz_data.name}", steps=3, resume="auto")
    assert resumed.state.step == 3
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((12, 8, 8, 1), np.uint8), labels=np.arange(12) % 3,
             class_names=np.array(["a", "b", "c"]))
    with pytest.raises(Exception, match="the configuration differs.*data:"):
        train(tmp_path / "run", other, steps=4, resume="auto")


# Conversion reports.

def test_fp16_pixel_model_to_diffusers_reports_expected_rounding_and_no_vae(tmp_path):
    source = save_pixel_model(tmp_path / "m.safetensors", dtype=torch.float16)
    result = ok("convert", source, tmp_path / "pipe", "--to", "diffusers", "--vae", "none")  # a pixel model's folder
    text = " ".join(result.output.split())
    assert "NOT equal" not in text and "(expected)" in text and not (tmp_path / "pipe" / "vae").exists(), text
    assert "pos_embed differs" not in text


@pytest.mark.parametrize("name, sha256", [
    ("fashion-mnist.safetensors", "f99aa70cf10118dac7b07914ded543eafabb1894081a0fd0291a3a0b3cb59eaf"),  # 2026-12-02
    ("fashion-mnist-ddpm.safetensors", "919948918ca946ddf77e4a832c86f13b05fccd84d3bf0b43aa4412bb49123d65"),  # 11-27
])
def test_the_shipped_files_keep_their_tensors(name, sha256):
    """The weights that were scored (docs/flow.md, docs/fashion-mnist.md); a metadata rewrite must leave them."""
    state = load_file(str(WEIGHTS / name))
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + str(state[key].dtype).encode() + state[key].numpy().tobytes())
    assert digest.hexdigest() == sha256


# dit train checks the codec before anything slow.

def test_train_without_a_reachable_vae_fails_before_reading_data_and_names_vae_none(tmp_path, monkeypatch):
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the VAE was found")

    monkeypatch.setattr("ditcli.training.trainer.load_images", no_data)
    error = one_error(dit("train", "--data", folder, "--image-size", 32, "--out", tmp_path / "run",
                          "--vae", "stabilityai/no-such-vae-in-any-cache"))
    assert "not in the Hugging Face cache" in error and "--vae none" in error
    assert "--vae none" in one_error(dit("train", "--data", folder, "--image-size", 32, "--out", tmp_path / "run",
                                         "--vae", tmp_path / "missing-vae"))


def test_an_unreachable_hub_is_reported_at_once(monkeypatch):
    from ditcli import hub
    from ditcli.model import codec

    def refuse(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    with pytest.raises(Exception, match="hub cannot be reached .*Name or service not known.*--vae none"):
        codec.locate_vae("stabilityai/no-such-vae-in-any-cache", alternative="pass --vae none")
    assert os.environ.get("HF_HUB_OFFLINE") is None
