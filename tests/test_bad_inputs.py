"""A corpus of bad inputs across the five commands, through the real front door.

Each one must end with exit code 2 and exactly one line, `error: <what> (<how to fix>)`, with no traceback, and leave
no file or folder behind: not in the working directory, not beside the inputs, not in the temporary directory.
Everything that would load something big fails before loading it, so the corpus runs in seconds on tiny files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.model.dit import DiT, DiTConfig
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

ONE_LINE = re.compile(r"^error: \S.*\S \(\S.*\)$")  # error: <what> (<how to fix>)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# A tiny pixel-space recipe: 8x8 grayscale, a 2-block 32-wide DiT, one step.
TINY = ["--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size", "8",
        "--channels", "1", "--vae", "none", "--global-batch", "4", "--steps", "1", "--log-every", "1"]


def make_fixtures(fx: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    np.savez(fx / "good.npz", images=gray, labels=np.arange(8) % 2, class_names=np.array(["a", "b"]))
    np.savez(fx / "rgb.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    np.savez(fx / "badlabels.npz", images=gray, labels=np.arange(5))
    np.savez(fx / "neglabels.npz", images=gray, labels=-np.ones(8, np.int64))
    np.savez(fx / "floatlabels.npz", images=gray, labels=np.linspace(0, 1, 8))
    np.savez(fx / "labels2d.npz", images=gray, labels=np.zeros((8, 2), np.int64))
    np.savez(fx / "fewnames.npz", images=gray, labels=np.arange(8) % 4, class_names=np.array(["a", "b"]))
    np.savez(fx / "zero.npz", images=np.zeros((0, 8, 8, 1), np.uint8))
    np.savez(fx / "zerorgb.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(fx / "nothing.npz")
    np.savez(fx / "float.npz", images=gray.astype(np.float32), arr_0=gray.astype(np.float32))
    np.savez(fx / "twochan.npz", images=rng.integers(0, 256, (8, 8, 8, 2), dtype=np.uint8))
    np.savez(fx / "flat.npz", images=np.zeros((8, 0, 8, 1), np.uint8))
    np.savez(fx / "fivedim.npz", images=np.zeros((2, 8, 8, 1, 1), np.uint8))
    np.savez(fx / "objects.npz", images=np.array([{"a": 1}] * 8, dtype=object))
    np.savez(fx / "oneimage.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(fx / "objectstats.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.array([None], dtype=object))
    (fx / "truncated.npz").write_bytes((fx / "good.npz").read_bytes()[:300])
    (fx / "truncrgb.npz").write_bytes((fx / "rgb.npz").read_bytes()[:500])
    (fx / "zerobytes.npz").write_bytes(b"")
    (fx / "text.npz").write_text("not a zip\n")
    np.save(fx / "lone.npy", np.zeros((2, 8, 8, 3), np.uint8))
    (fx / "lone.npy").rename(fx / "lone.npz")  # np.save's single array under an .npz name
    np.savez(fx / "nanref.npz", mu=np.full(4, np.nan), sigma=np.eye(4))
    np.savez(fx / "infref.npz", mu=np.zeros(4), sigma=np.full((4, 4), np.inf))
    np.savez(fx / "shaperef.npz", mu=np.zeros(4), sigma=np.eye(3))
    np.savez(fx / "existing.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    (fx / "afile").write_text("a file, not a folder\n")
    os.mkfifo(fx / "fifo")  # a path that exists but is neither a file nor a folder
    os.mkfifo(fx / "fifo.npz")  # ... under the name of what a reader opens
    (fx / "emptydir").mkdir()
    (fx / "imgs").mkdir()
    from PIL import Image
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(fx / "imgs" / f"{i}.png")
    (fx / "junkimgs").mkdir()
    for i in range(2):
        (fx / "junkimgs" / f"{i}.png").write_bytes(b"\x89PNG not really")

    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=2)
    state = DiT(config).state_dict()
    save_safetensors(Checkpoint(state, config, "safetensors", "ema", ["a", "b"], {"kind": "pixel", "channels": 1}),
                     fx / "tiny.safetensors")
    torch.save(state, fx / "official.pt")  # a bare state dict, as the released .pt files
    train_state = {"format": "ditcli-train", "step": 1, "config": {"model": config.to_dict(), "train": {}},
                   "ema": state, "class_names": ["a", "b"], "codec": {"kind": "pixel", "channels": 1}}
    torch.save(train_state, fx / "ema-only-train.pt")  # a training checkpoint stripped to its EMA
    torch.save({"x": torch.zeros(2)}, fx / "notdit.pt")
    torch.save(torch.nn.Linear(2, 2), fx / "pickled.pt")  # a whole module: pickled code
    (fx / "garbage.pt").write_bytes(bytes(range(256)) * 8)
    (fx / "empty.pt").write_bytes(b"")
    (fx / "text.safetensors").write_text("hello")
    (fx / "torch.safetensors").write_bytes((fx / "official.pt").read_bytes())


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    import diffusers  # noqa: F401  its import makes torch's compile cache folder in $TMPDIR, once: not our doing
    root = tmp_path_factory.mktemp("fixtures")
    make_fixtures(root)
    return root


def snapshot(*roots: Path) -> dict[str, tuple]:
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()  # a folder's own times change as entries come and go: its entries are compared
            found[str(path)] = (stat.st_mode, None if path.is_dir() else (stat.st_size, stat.st_mtime_ns))
    return found


def invoke(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str]:
    tmp = cwd / ".tmp"
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    for name in ("DIT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("DIT_HOME", str(cwd / ".dithome-unused"))
    result = CliRunner().invoke(app, args)
    assert not (cwd / ".dithome-unused").exists() or not any((cwd / ".dithome-unused").iterdir())
    assert list(tmp.iterdir()) == [], f"left in the temporary directory: {list(tmp.iterdir())}"
    tmp.rmdir()
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, mentions: str | None) -> None:
    assert "Traceback" not in output, output
    lines = output.strip().splitlines()
    assert code == 2, f"exit code {code}: {output}"
    assert len(lines) == 1, f"{len(lines)} lines:\n{output}"
    assert ONE_LINE.match(lines[0]), f"not `error: <what> (<how to fix>)`: {lines[0]}"
    if mentions is not None:
        assert mentions.lower() in lines[0].lower(), f"{mentions!r} not named in: {lines[0]}"


BIG = "1000000000000"
S = ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out", "out"]
T = ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY]

# (id, argv, a text the message must contain)
CORPUS: list[tuple[str, list[str], str | None]] = [
    # Typer's own parsing errors, rendered as our one line.
    ("usage-unknown-command", ["trian"], "trian"),
    ("usage-unknown-root-option", ["--bogus"], "--bogus"),
    ("usage-misspelt-option", ["train", "--lerning-rate", "1"], "--lerning-rate"),
    ("usage-not-an-int", ["train", "--steps", "abc"], "--steps"),
    ("usage-missing-value", ["train", "--steps"], "--steps"),
    ("usage-float-for-int", ["sample", "--num", "1.5"], "--num"),
    ("usage-word-for-float", ["sample", "--cfg", "high"], "--cfg"),
    ("usage-empty-int", ["sample", "--num", ""], "--num"),
    ("usage-extra-fid-args", ["fid", "a", "b", "c"], "c"),
    ("usage-extra-convert-args", ["convert", "a", "b", "c"], "c"),
    ("usage-flag-with-value", ["classes", "--json=yes"], "--json"),
    ("usage-flag-extra-word", ["train", "--flip", "x"], "x"),
    ("usage-unknown-sample-option", ["sample", "--clas", "3"], "--clas"),
    # dit train: data sources.
    ("train-no-data", ["train", "--out", "run"], "--data"),
    ("train-empty-data", ["train", "--data", "", "--out", "run", *TINY], "--data"),
    ("train-missing-data", ["train", "--data", "{fx}/missing.npz", "--out", "run", *TINY], "missing.npz"),
    ("train-unicode-missing", ["train", "--data", "{fx}/données/ñ✓.npz", "--out", "run", *TINY], "ñ✓.npz"),
    ("train-data-not-npz", ["train", "--data", "{fx}/afile", "--out", "run", *TINY], "afile"),
    ("train-data-empty-dir", ["train", "--data", "{fx}/emptydir", "--out", "run", *TINY], "emptydir"),
    ("train-data-junk-images", ["train", "--data", "{fx}/junkimgs", "--out", "run", *TINY], "junkimgs"),
    ("train-npz-zero-bytes", ["train", "--data", "{fx}/zerobytes.npz", "--out", "run", *TINY], "zerobytes.npz"),
    ("train-npz-text", ["train", "--data", "{fx}/text.npz", "--out", "run", *TINY], "text.npz"),
    ("train-npz-truncated", ["train", "--data", "{fx}/truncated.npz", "--out", "run", *TINY], "truncated.npz"),
    ("train-npz-zero-images", ["train", "--data", "{fx}/zero.npz", "--out", "run", *TINY], "zero.npz"),
    ("train-npz-no-arrays", ["train", "--data", "{fx}/nothing.npz", "--out", "run", *TINY], "nothing.npz"),
    ("train-npz-label-count", ["train", "--data", "{fx}/badlabels.npz", "--out", "run", *TINY], "labels"),
    ("train-npz-negative-labels", ["train", "--data", "{fx}/neglabels.npz", "--out", "run", *TINY], "labels"),
    ("train-npz-float-labels", ["train", "--data", "{fx}/floatlabels.npz", "--out", "run", *TINY], "labels"),
    ("train-npz-2d-labels", ["train", "--data", "{fx}/labels2d.npz", "--out", "run", *TINY], "labels"),
    ("train-npz-too-few-names", ["train", "--data", "{fx}/fewnames.npz", "--out", "run", *TINY], "class_names"),
    ("train-npz-float-images", ["train", "--data", "{fx}/float.npz", "--out", "run", *TINY], "uint8"),
    ("train-npz-two-channels", ["train", "--data", "{fx}/twochan.npz", "--out", "run", *TINY], "channels"),
    ("train-npz-zero-height", ["train", "--data", "{fx}/flat.npz", "--out", "run", *TINY], "flat.npz"),
    ("train-npz-five-dims", ["train", "--data", "{fx}/fivedim.npz", "--out", "run", *TINY], "fivedim.npz"),
    ("train-npz-objects", ["train", "--data", "{fx}/objects.npz", "--out", "run", *TINY], "objects.npz"),
    ("train-fashion-bad-split", ["train", "--data", "fashion-mnist:validation", "--out", "run", *TINY], "validation"),
    ("train-fashion-typo", ["train", "--data", "fashion-mnistt", "--out", "run", *TINY], "fashion-mnistt"),
    # dit train: numbers.
    ("train-hidden-zero", [*T, "--hidden-size", "0"], "--hidden-size"),
    ("train-hidden-negative", [*T, "--hidden-size", "-32"], "--hidden-size"),
    ("train-hidden-not-div-4", [*T, "--hidden-size", "30"], "--hidden-size"),
    ("train-hidden-huge", [*T, "--hidden-size", BIG], "--hidden-size"),
    ("train-heads-zero", [*T, "--num-heads", "0"], "--num-heads"),
    ("train-heads-not-dividing", [*T, "--num-heads", "3"], "--num-heads"),
    ("train-depth-zero", [*T, "--depth", "0"], "--depth"),
    ("train-depth-huge", [*T, "--depth", BIG], "--depth"),
    ("train-channels-2", [*T, "--channels", "2"], "--channels"),
    ("train-channels-0", [*T, "--channels", "0"], "--channels"),
    ("train-channels-1-with-vae", ["train", "--data", "{fx}/good.npz", "--out", "run", "--channels", "1",
                                   "--vae", "ema"], "--channels"),
    ("train-image-size-0", [*T, "--image-size", "0"], "--image-size"),
    ("train-image-size-odd", [*T, "--image-size", "7"], "--image-size"),
    ("train-image-size-huge", [*T, "--image-size", BIG], "--image-size"),
    ("train-steps-0", [*T, "--steps", "0"], "--steps"),
    ("train-global-batch-0", [*T, "--global-batch", "0"], "--global-batch"),
    ("train-global-batch-huge", [*T, "--global-batch", BIG], "--global-batch"),
    ("train-micro-batch-0", [*T, "--micro-batch", "0"], "--micro-batch"),
    ("train-lr-0", [*T, "--lr", "0"], "--lr"),
    ("train-lr-schedule-unknown", [*T, "--lr-schedule", "linear"], "--lr-schedule"),
    ("train-lr-warmup-negative", [*T, "--lr-warmup", "-5"], "--lr-warmup"),
    ("train-lr-warmup-huge", [*T, "--lr-warmup", BIG], "--lr-warmup"),
    ("train-lr-negative-zero", [*T, "--lr", "-0.0"], "--lr"),
    ("train-lr-negative", [*T, "--lr", "-1e-4"], "--lr"),
    ("train-lr-nan", [*T, "--lr", "nan"], "--lr"),
    ("train-lr-inf", [*T, "--lr", "inf"], "--lr"),
    ("train-weight-decay-negative", [*T, "--weight-decay", "-1"], "--weight-decay"),
    ("train-weight-decay-nan", [*T, "--weight-decay", "nan"], "--weight-decay"),
    ("train-weight-decay-inf", [*T, "--weight-decay", "inf"], "--weight-decay"),
    ("train-ema-decay-1", [*T, "--ema-decay", "1"], "--ema-decay"),
    ("train-ema-decay-negative", [*T, "--ema-decay", "-0.5"], "--ema-decay"),
    ("train-ema-decay-nan", [*T, "--ema-decay", "nan"], "--ema-decay"),
    ("train-ema-decay-inf", [*T, "--ema-decay", "-inf"], "--ema-decay"),
    ("train-grad-clip-negative", [*T, "--grad-clip", "-1"], "--grad-clip"),
    ("train-grad-clip-nan", [*T, "--grad-clip", "nan"], "--grad-clip"),
    ("train-grad-clip-inf", [*T, "--grad-clip", "inf"], "--grad-clip"),
    ("train-ckpt-every-0", [*T, "--ckpt-every", "0"], "--ckpt-every"),
    ("train-keep-last-0", [*T, "--keep-last", "0"], "--keep-last"),
    ("train-sample-every-negative", [*T, "--sample-every", "-1"], "--sample-every"),
    ("train-log-every-0", [*T, "--log-every", "0"], "--log-every"),
    ("train-max-bad-steps-0", [*T, "--max-bad-steps", "0"], "--max-bad-steps"),
    ("train-seed-negative", [*T, "--seed", "-1"], "--seed"),
    ("train-seed-huge", [*T, "--seed", str(2 ** 70)], "--seed"),
    ("train-precision-fp16", [*T, "--precision", "fp16"], "fp16"),
    ("train-precision-unknown", [*T, "--precision", "fp7"], "fp7"),
    ("train-device-unknown", [*T, "--device", "tpu"], "tpu"),
    ("train-model-unknown", [*T, "--model", "DiT-Q/2"], "DiT-Q/2"),
    ("train-model-empty", [*T, "--model", ""], "--model"),
    ("train-preset-unknown", ["train", "--preset", "imagenet-9000", "--out", "run"], "imagenet-9000"),
    ("train-resume-missing", [*T, "--resume", "{fx}/missing.pt"], "missing.pt"),
    ("train-resume-garbage", [*T, "--resume", "{fx}/garbage.pt"], "garbage.pt"),
    ("train-resume-dir", [*T, "--resume", "{fx}/emptydir"], "emptydir"),
    ("train-out-is-a-file", ["train", "--data", "{fx}/good.npz", "--out", "{fx}/afile", *TINY], "afile"),
    ("train-out-under-a-file", ["train", "--data", "{fx}/good.npz", "--out", "{fx}/afile/run", *TINY], "afile"),
    # dit sample.
    ("sample-num-0", [*S, "--num", "0"], "--num"),
    ("sample-num-negative", [*S, "--num", "-5"], "--num"),
    ("sample-num-huge", [*S, "--num", BIG], "--num"),
    ("sample-num-per-class-0", [*S, "--class", "a", "--num-per-class", "0"], "--num-per-class"),
    ("sample-num-per-class-huge", [*S, "--class", "a", "--class", "b", "--num-per-class", BIG], "--num-per-class"),
    ("sample-num-and-per-class", [*S, "--class", "a", "--num", "2", "--num-per-class", "2"], "--num"),
    ("sample-per-class-all-classes-huge", [*S, "--num-per-class", "9000000"], "--num-per-class"),
    ("sample-batch-size-0", [*S, "--batch-size", "0"], "--batch-size"),
    ("sample-steps-0", [*S, "--steps", "0"], "--steps"),
    ("sample-steps-huge", [*S, "--steps", BIG], "--steps"),
    ("sample-cfg-negative", [*S, "--cfg", "-1"], "--cfg"),
    ("sample-cfg-nan", [*S, "--cfg", "nan"], "--cfg"),
    ("sample-cfg-inf", [*S, "--cfg", "inf"], "--cfg"),
    ("sample-cfg-1e308", [*S, "--cfg", "1e308"], "--cfg"),
    ("sample-eta-nan", [*S, "--sampler", "ddim", "--eta", "nan"], "--eta"),
    ("sample-eta-negative", [*S, "--sampler", "ddim", "--eta", "-1"], "--eta"),
    ("sample-eta-inf", [*S, "--sampler", "ddim", "--eta", "inf"], "--eta"),
    ("sample-eta-above-1", [*S, "--sampler", "ddim", "--eta", "2"], "--eta"),
    ("sample-eta-without-ddim", [*S, "--sampler", "ddpm", "--eta", "0.5"], "--eta"),
    ("sample-sampler-unknown", [*S, "--sampler", "euler-magic"], "euler-magic"),
    ("sample-guidance-channels", [*S, "--guidance-channels", "some"], "--guidance-channels"),
    ("sample-interval-words", [*S, "--guidance-interval", "a,b"], "--guidance-interval"),
    ("sample-interval-reversed", [*S, "--guidance-interval", "700,0"], "--guidance-interval"),
    ("sample-interval-nan", [*S, "--guidance-interval", "nan,1"], "--guidance-interval"),
    ("sample-interval-one-number", [*S, "--guidance-interval", "0"], "--guidance-interval"),
    ("sample-class-unknown", [*S, "--class", "zebra"], "zebra"),
    ("sample-class-empty", [*S, "--class", ""], "--class"),
    ("sample-class-out-of-range", [*S, "--class", "99"], "99"),
    ("sample-class-negative", [*S, "--class", "-1"], "-1"),
    ("sample-seed-negative", [*S, "--seed", "-1"], "--seed"),
    ("sample-seed-huge", [*S, "--seed", str(2 ** 70)], "--seed"),
    ("sample-precision-unknown", [*S, "--precision", "fp8"], "fp8"),
    ("sample-cache-negative", [*S, "--cache", "-0.1"], "--cache"),
    ("sample-cache-nan", [*S, "--cache", "nan"], "--cache"),
    ("sample-cache-inf", [*S, "--cache", "inf"], "--cache"),
    ("sample-cache-word", [*S, "--cache", "fast"], "--cache"),
    ("sample-cache-compiled", [*S, "--cache", "0.1", "--compile"], "--compile"),
    ("sample-compile-with-value", [*S, "--compile=auto"], "--compile"),
    ("sample-device-unknown", [*S, "--device", "tpu"], "tpu"),
    ("sample-ckpt-missing", ["sample", "--ckpt", "{fx}/missing.safetensors", "--out", "out"], "missing.safetensors"),
    ("sample-ckpt-empty-dir", ["sample", "--ckpt", "{fx}/emptydir", "--out", "out"], "emptydir"),
    ("sample-ckpt-garbage", ["sample", "--ckpt", "{fx}/garbage.pt", "--out", "out"], "garbage.pt"),
    ("sample-ckpt-empty-file", ["sample", "--ckpt", "{fx}/empty.pt", "--out", "out"], "empty.pt"),
    ("sample-ckpt-text", ["sample", "--ckpt", "{fx}/text.safetensors", "--out", "out"], "text.safetensors"),
    ("sample-ckpt-torch-named-safetensors", ["sample", "--ckpt", "{fx}/torch.safetensors", "--out", "out"],
     "torch.safetensors"),
    ("sample-ckpt-pickled-code", ["sample", "--ckpt", "{fx}/pickled.pt", "--out", "out"], "pickled.pt"),
    ("sample-ckpt-not-dit", ["sample", "--ckpt", "{fx}/notdit.pt", "--out", "out"], "notdit.pt"),
    ("sample-ckpt-empty-path", ["sample", "--ckpt", "", "--out", "out"], "--ckpt is empty"),  # not "." as Typer reads it
    # An empty value (an unset shell variable) read as the option's default, or a path as the working folder.
    ("sample-out-empty", ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out", ""], "--out is empty"),
    ("sample-out-equals-empty", ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out="], "--out is empty"),
    ("sample-sampler-empty", [*S, "--sampler", ""], "--sampler is empty"),
    ("convert-dtype-empty", ["convert", "{fx}/tiny.safetensors", "o.safetensors", "--dtype", ""], "--dtype is empty"),
    ("fid-output-empty", ["fid", "--make-ref", "{fx}/imgs", "-o", ""], "-o is empty"),
    # With --ckpt, --model names a preset: an unknown one was ignored; so was --num-heads 0.
    ("sample-model-unknown-with-ckpt", [*S, "--model", "DiT-Q/3"], "unknown --model 'DiT-Q/3'"),
    ("sample-num-heads-zero", [*S, "--num-heads", "0"], "--num-heads must be >= 1"),
    ("sample-model-unknown", ["sample", "--model", "DiT-Q/2", "--out", "out"], "DiT-Q/2"),
    ("sample-model-with-ckpt", [*S, "--model", "fashion-mnist"], "--model"),
    ("sample-image-size-one-size-model", ["sample", "--model", "fashion-mnist", "--image-size", "256", "--out", "out"],
     "--image-size"),
    ("sample-image-size-mismatch", [*S, "--image-size", "64"], "--image-size"),
    ("sample-image-size-unreleased", ["sample", "--model", "DiT-XL/2", "--image-size", "1024", "--out", "out"],
     "1024"),
    ("sample-preset-mismatch", [*S, "--model", "DiT-XL/2"], "--model"),
    ("sample-vae-with-pixel-model", [*S, "--vae", "ema"], "--vae"),
    ("sample-out-is-a-file", ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out", "{fx}/afile"], "afile"),
    ("sample-out-under-a-file", ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out", "{fx}/afile/x"], "afile"),
    ("sample-npz-is-a-dir", [*S, "--npz", "{fx}/emptydir"], "emptydir"),
    ("sample-npz-exists", [*S, "--npz", "{fx}/existing.npz"], "existing.npz"),
    ("sample-npz-under-a-file", [*S, "--npz", "{fx}/afile/s.npz"], "afile"),
    ("sample-npz-is-a-pipe", [*S, "--npz", "{fx}/fifo", "--force"], "fifo"),
    ("sample-ckpt-is-a-pipe", ["sample", "--ckpt", "{fx}/fifo", "--out", "out"], "fifo"),
    ("sample-offline-no-weights", ["sample", "--model", "DiT-XL/2", "--offline", "--out", "out"], "DiT-XL-2"),
    # dit classes.
    ("classes-image-size-imagenet", ["classes", "--image-size", "512"], "--image-size"),
    ("classes-image-size-with-ckpt", ["classes", "--ckpt", "{fx}/tiny.safetensors", "--image-size", "256"],
     "--image-size"),
    ("classes-image-size-one-size-model", ["classes", "--model", "fashion-mnist", "--image-size", "28"],
     "--image-size"),
    ("classes-no-match", ["classes", "--search", "zzzzqq"], "zzzzqq"),
    ("classes-no-match-unicode", ["classes", "--search", "ñandú✓"], "ñandú✓"),
    ("classes-ckpt-missing", ["classes", "--ckpt", "{fx}/missing.pt"], "missing.pt"),
    ("classes-ckpt-garbage", ["classes", "--ckpt", "{fx}/garbage.pt"], "garbage.pt"),
    ("classes-ckpt-dir", ["classes", "--ckpt", "{fx}/emptydir"], "emptydir"),
    ("classes-model-unknown", ["classes", "--model", "DiT-Q/2"], "DiT-Q/2"),
    ("classes-model-with-ckpt", ["classes", "--ckpt", "{fx}/tiny.safetensors", "--model", "fashion-mnist"],
     "--model"),
    # dit fid.
    ("fid-nothing", ["fid"], "fid"),
    ("fid-no-ref", ["fid", "{fx}/rgb.npz"], "--ref"),
    ("fid-samples-missing", ["fid", "{fx}/missing.npz", "--ref", "{fx}/rgb.npz"], "missing.npz"),
    ("fid-ref-missing", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/missing.npz"], "missing.npz"),
    ("fid-samples-empty-dir", ["fid", "{fx}/emptydir", "--ref", "{fx}/rgb.npz"], "emptydir"),
    ("fid-samples-junk-images", ["fid", "{fx}/junkimgs", "--ref", "{fx}/rgb.npz"], "junkimgs"),
    ("fid-samples-zero-bytes", ["fid", "{fx}/zerobytes.npz", "--ref", "{fx}/rgb.npz"], "zerobytes.npz"),
    ("fid-samples-text", ["fid", "{fx}/text.npz", "--ref", "{fx}/rgb.npz"], "text.npz"),
    ("fid-samples-truncated", ["fid", "{fx}/truncrgb.npz", "--ref", "{fx}/rgb.npz"], "truncrgb.npz"),
    ("fid-samples-zero-images", ["fid", "{fx}/zerorgb.npz", "--ref", "{fx}/rgb.npz"], "zerorgb.npz"),
    ("fid-samples-no-arr0", ["fid", "{fx}/nothing.npz", "--ref", "{fx}/rgb.npz"], "nothing.npz"),
    ("fid-samples-float", ["fid", "{fx}/float.npz", "--ref", "{fx}/rgb.npz"], "float.npz"),
    ("fid-samples-a-file", ["fid", "{fx}/afile", "--ref", "{fx}/rgb.npz"], "afile"),
    ("fid-ref-nan-stats", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/nanref.npz"], "nanref.npz"),
    ("fid-ref-inf-stats", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/infref.npz"], "infref.npz"),
    ("fid-ref-stat-shapes", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/shaperef.npz"], "shaperef.npz"),
    ("fid-ref-zero-bytes", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/zerobytes.npz"], "zerobytes.npz"),
    ("fid-ref-text", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/text.npz"], "text.npz"),
    ("fid-ref-truncated", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/truncated.npz"], "truncated.npz"),
    ("fid-batch-size-0", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--batch-size", "0"], "--batch-size"),
    ("fid-num-workers-negative", ["fid", "{fx}/imgs", "--ref", "{fx}/rgb.npz", "--num-workers", "-1"],
     "--num-workers"),
    ("fid-resize-0", ["fid", "{fx}/imgs", "--ref", "{fx}/rgb.npz", "--resize", "0"], "--resize"),
    ("fid-resize-huge", ["fid", "{fx}/imgs", "--ref", "{fx}/rgb.npz", "--resize", BIG], "--resize"),
    ("fid-features-unknown", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--features", "clip-xxl"], "clip-xxl"),
    ("fid-features-garbage-file", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--features", "{fx}/garbage.pt"],
     "garbage.pt"),
    ("fid-inception-weights-other-features", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--features",
                                              "{fx}/garbage.pt", "--inception-weights", "{fx}/garbage.pt"],
     "--inception-weights"),
    ("fid-inception-weights-missing", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--inception-weights",
                                       "{fx}/missing.pth"], "missing.pth"),
    ("fid-inception-weights-garbage", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--inception-weights",
                                       "{fx}/garbage.pt"], "garbage.pt"),
    ("fid-inception-weights-pickled", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--inception-weights",
                                       "{fx}/pickled.pt"], "pickled.pt"),
    ("fid-device-unknown", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--device", "tpu"], "tpu"),
    ("fid-make-ref-with-samples", ["fid", "{fx}/rgb.npz", "--make-ref", "{fx}/imgs", "-o", "ref.npz"], "--make-ref"),
    ("fid-make-ref-no-output", ["fid", "--make-ref", "{fx}/imgs"], "-o"),
    ("fid-make-ref-overwrite", ["fid", "--make-ref", "{fx}/imgs", "-o", "{fx}/existing.npz"], "existing.npz"),
    ("fid-make-ref-output-dir", ["fid", "--make-ref", "{fx}/imgs", "-o", "{fx}/emptydir"], "emptydir"),
    ("fid-make-ref-missing", ["fid", "--make-ref", "{fx}/nowhere", "-o", "ref.npz"], "nowhere"),
    ("fid-make-ref-empty-dir", ["fid", "--make-ref", "{fx}/emptydir", "-o", "ref.npz"], "emptydir"),
    ("fid-make-ref-output-pipe", ["fid", "--make-ref", "{fx}/imgs", "-o", "{fx}/fifo", "--force"], "fifo"),
    ("fid-make-ref-under-a-file", ["fid", "--make-ref", "{fx}/imgs", "-o", "{fx}/afile/ref.npz"], "afile"),
    # dit convert.
    ("convert-nothing", ["convert"], "SRC"),
    ("convert-no-dst", ["convert", "{fx}/tiny.safetensors"], "DST"),
    ("convert-src-missing", ["convert", "{fx}/missing.pt", "o.safetensors"], "missing.pt"),
    ("convert-src-empty-dir", ["convert", "{fx}/emptydir", "o.safetensors"], "emptydir"),
    ("convert-src-garbage", ["convert", "{fx}/garbage.pt", "o.safetensors"], "garbage.pt"),
    ("convert-src-empty", ["convert", "{fx}/empty.pt", "o.safetensors"], "empty.pt"),
    ("convert-src-pickled", ["convert", "{fx}/pickled.pt", "o.safetensors"], "pickled.pt"),
    ("convert-src-not-dit", ["convert", "{fx}/notdit.pt", "o.safetensors"], "notdit.pt"),
    ("convert-src-npz", ["convert", "{fx}/good.npz", "o.safetensors"], "NumPy .npz archive"),
    ("sample-ckpt-npz", ["sample", "--ckpt", "{fx}/rgb.npz"], "NumPy .npz archive"),
    ("convert-dst-exists", ["convert", "{fx}/tiny.safetensors", "{fx}/existing.npz", "--to", "safetensors"],
     "existing.npz"),
    ("convert-dst-unknown-format", ["convert", "{fx}/tiny.safetensors", "o.bin"], "o.bin"),
    ("convert-to-unknown", ["convert", "{fx}/tiny.safetensors", "o.safetensors", "--to", "onnx"], "onnx"),
    ("convert-dtype-unknown", ["convert", "{fx}/tiny.safetensors", "o.safetensors", "--dtype", "fp8"], "fp8"),
    ("convert-heads-zero", ["convert", "{fx}/official.pt", "o.safetensors", "--num-heads", "0"], "--num-heads"),
    ("convert-heads-negative", ["convert", "{fx}/official.pt", "o.safetensors", "--num-heads", "-2"], "--num-heads"),
    ("convert-heads-not-dividing", ["convert", "{fx}/official.pt", "o.safetensors", "--num-heads", "3"],
     "--num-heads"),
    ("convert-weights-unknown", ["convert", "{fx}/tiny.safetensors", "o.safetensors", "--weights", "best"], "best"),
    ("convert-weights-model-of-ema-file", ["convert", "{fx}/tiny.safetensors", "o.safetensors", "--weights",
                                           "model"], "--weights"),
    ("convert-weights-model-of-official", ["convert", "{fx}/official.pt", "o.safetensors", "--num-heads", "2",
                                           "--weights", "model"], "--weights"),
    ("convert-weights-model-of-ema-only-ckpt", ["convert", "{fx}/ema-only-train.pt", "o.safetensors", "--weights",
                                                "model"], "model"),
    ("convert-vae-with-safetensors", ["convert", "{fx}/tiny.safetensors", "o.safetensors", "--vae", "ema"], "--vae"),
    ("convert-dst-under-a-file", ["convert", "{fx}/tiny.safetensors", "{fx}/afile/o.safetensors"], "afile"),
    ("convert-dst-pipe", ["convert", "{fx}/tiny.safetensors", "{fx}/fifo", "--to", "safetensors", "--force"], "fifo"),
    ("convert-dst-empty", ["convert", "{fx}/tiny.safetensors", ""], "output format"),
    ("convert-info-missing", ["convert", "--info", "{fx}/missing.pt"], "missing.pt"),
    ("convert-info-with-src", ["convert", "{fx}/tiny.safetensors", "--info", "{fx}/tiny.safetensors"], "--info"),
    ("convert-info-dir", ["convert", "--info", "{fx}/emptydir"], "emptydir"),
    ("convert-info-text", ["convert", "--info", "{fx}/text.safetensors"], "text.safetensors"),
    ("convert-info-weights-model-of-ema-file", ["convert", "--info", "{fx}/tiny.safetensors", "--weights", "model"],
     "--weights"),
    # A file that is no zip says so, not "pickled (object) data" (numpy's fallback for what is no .npz or .npy).
    ("fid-ref-text-is-no-npz", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/text.npz"], "is not an .npz"),
    ("fid-ref-lone-npy", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/lone.npz"], "is not an .npz"),
    ("train-data-text-is-no-npz", ["train", "--data", "{fx}/text.npz", "--out", "run", *TINY], "is not an .npz"),
    ("train-data-lone-npy", ["train", "--data", "{fx}/lone.npz", "--out", "run", *TINY], "is not an .npz"),
    # A name longer than the file system takes: the system's one line, not its traceback.
    ("convert-dst-name-too-long", ["convert", "{fx}/tiny.safetensors", "x" * 300 + ".safetensors"], "too long"),
    ("sample-ckpt-name-too-long", ["sample", "--ckpt", "x" * 300 + ".pt", "--out", "out"], "too long"),
    # A named pipe to read from: its read waited for a writer forever.
    ("train-resume-fifo", ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY, "--resume", "{fx}/fifo"],
     "fifo"),
    # Statistics stored as Python objects: numpy's "Object arrays cannot be loaded" ended in a traceback.
    ("fid-ref-object-statistics", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/objectstats.npz"], "Python objects"),
    ("train-eval-ref-object-statistics", ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY, "--eval-every",
                                          "1", "--eval-ref", "{fx}/objectstats.npz", "--eval-features",
                                          "fashion-judge"], "Python objects"),
    # One image has no covariance: found only after extracting the other side's features, or a training step.
    ("fid-samples-one-image", ["fid", "{fx}/oneimage.npz", "--ref", "{fx}/rgb.npz"], "at least 2"),
    ("fid-ref-one-image", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/oneimage.npz"], "at least 2"),
    ("train-eval-ref-one-image", ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY, "--eval-every", "1",
                                  "--eval-ref", "{fx}/oneimage.npz", "--eval-features", "fashion-judge"], "at least 2"),
    ("fid-samples-fifo-npz", ["fid", "{fx}/fifo.npz", "--ref", "{fx}/rgb.npz"], "pipe"),
    ("fid-ref-fifo-npz", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/fifo.npz"], "pipe"),
    ("train-data-fifo-npz", ["train", "--data", "{fx}/fifo.npz", "--out", "run", *TINY], "pipe"),
    ("train-eval-ref-fifo-npz", ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY, "--eval-every", "1",
                                 "--eval-ref", "{fx}/fifo.npz", "--eval-features", "fashion-judge"], "pipe"),
    # torch.load reads a *.safetensors name as safetensors, and raised safetensors' own error, not torch's.
    ("train-resume-text-safetensors", ["train", "--data", "{fx}/good.npz", "--out", "run", *TINY, "--resume",
                                       "{fx}/text.safetensors"], "text.safetensors"),
    ("fid-inception-weights-text-safetensors", ["fid", "{fx}/rgb.npz", "--ref", "{fx}/rgb.npz", "--inception-weights",
                                                "{fx}/text.safetensors"], "text.safetensors"),
]


@pytest.mark.parametrize("case", CORPUS, ids=[case[0] for case in CORPUS])
def test_bad_input_gets_one_line_and_leaves_nothing(case, fx, tmp_path, monkeypatch):
    _, argv, mentions = case
    args = [arg.replace("{fx}", str(fx)) for arg in argv]
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(fx, work)
    code, output = invoke(args, work, monkeypatch)
    assert_one_line_error(code, output, mentions)
    assert snapshot(fx, work) == before, "files were created or changed"


def test_a_home_or_output_behind_a_symlink_loop_is_one_line(fx, tmp_path, monkeypatch):
    """A link to itself exists to nothing: it was passed as writable, and --compile then failed with ELOOP."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "loop").symlink_to("loop")
    monkeypatch.chdir(work)
    monkeypatch.setenv("DIT_OFFLINE", "1")
    for args in (["sample", "--ckpt", f"{fx}/tiny.safetensors", "--num", "2", "--compile", "--out", "out"],
                 ["sample", "--ckpt", f"{fx}/tiny.safetensors", "--num", "2", "--out", "loop/out"]):
        monkeypatch.setenv("DIT_HOME", str(work / "loop"))
        before = snapshot(fx, work)
        result = CliRunner().invoke(app, args)
        assert_one_line_error(result.exit_code, result.output, "symbolic link that leads nowhere")
        assert snapshot(fx, work) == before


def test_corpus_is_large_and_covers_every_command():
    assert len(CORPUS) >= 100
    commands = {argv[0] for _, argv, _ in CORPUS}
    assert {"train", "sample", "fid", "convert", "classes"} <= commands


@pytest.mark.parametrize("command", [
    ["train", "--data", "{fx}/good.npz", "--out", "{ro}/run", *TINY],
    ["train", "--data", "{fx}/good.npz", "--out", "{ro}", *TINY],
    ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out", "{ro}/out"],
    ["sample", "--ckpt", "{fx}/tiny.safetensors", "--npz", "{ro}/s.npz"],
    ["convert", "{fx}/tiny.safetensors", "{ro}/o.safetensors"],
    ["convert", "{fx}/tiny.safetensors", "{ro}/pipe", "--to", "diffusers", "--vae", "none"],
    ["fid", "--make-ref", "{fx}/imgs", "-o", "{ro}/ref.npz"],
    pytest.param(["train", "--data", "{unreadable}", "--out", "run", *TINY], marks=pytest.mark.skipif(
        IS_ROOT, reason="root reads through file permissions")),
    pytest.param(["convert", "--info", "{unreadable}"], marks=pytest.mark.skipif(
        IS_ROOT, reason="root reads through file permissions")),
], ids=["train-out", "train-out-itself", "sample-out", "sample-npz", "convert-dst", "convert-diffusers", "make-ref-o",
        "train-data", "convert-info"])
def test_read_only_and_unreadable_paths(command, fx, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    unreadable = tmp_path / "unreadable.npz"
    unreadable.write_bytes((fx / "good.npz").read_bytes())
    unreadable.chmod(0)
    ro.chmod(0o555)
    if IS_ROOT:  # root writes through permissions: let the folder at least say it is read-only, as a mount would
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
            False if Path(path).absolute() == ro and mode & os.W_OK else access(path, mode, *a, **k)))
    work = tmp_path / "work"
    work.mkdir()
    try:
        args = [a.replace("{fx}", str(fx)).replace("{ro}", str(ro)).replace("{unreadable}", str(unreadable))
                for a in command]
        before = snapshot(ro, work)
        code, output = invoke(args, work, monkeypatch)
        assert_one_line_error(code, output, None)
        assert snapshot(ro, work) == before
    finally:
        ro.chmod(0o755)
        unreadable.chmod(0o644)


@pytest.mark.parametrize("argv", [
    ["train", "--lerning-rate", "1"],
    ["sample", "--ckpt", "{fx}/tiny.safetensors", "--out", "out", "--eta", "nan", "--sampler", "ddim"],
    ["train", "--data", "{fx}/nothing.npz", "--out", "run", *TINY],
    ["fid", "{fx}/rgb.npz", "--ref", "{fx}/nanref.npz"],
    ["classes", "--image-size", "512"],
], ids=["typer-usage", "sample-eta", "train-npz", "fid-nan-ref", "classes-size"])
def test_real_process_prints_one_line_on_stderr(argv, fx, tmp_path):
    args = [a.replace("{fx}", str(fx)) for a in argv]
    env = {**os.environ, "DIT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path), "COLUMNS": "60"}
    run = subprocess.run([sys.executable, "-m", "ditcli", *args], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE.match(lines[0]), run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# The small things of issue 16, and the noisy messages the corpus cannot see.

def test_huge_image_is_one_line_not_a_pil_warning(fx, tmp_path, monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # the 8x8 images (64 px) now pass the bomb warning threshold
    work = tmp_path / "work"
    work.mkdir()
    code, output = invoke(["fid", str(fx / "imgs"), "--ref", str(fx / "rgb.npz")], work, monkeypatch)
    assert_one_line_error(code, output, "0.png")
    assert "DecompressionBomb" not in output


def test_huge_training_images_are_skipped_by_name(fx, tmp_path, monkeypatch):
    from PIL import Image

    from ditcli.data.sources import load_folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with warnings_as_errors():
        with pytest.raises(Exception, match="no usable images"):
            load_folder(fx / "imgs", 8, 3)


def warnings_as_errors():
    import warnings
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error")
    return _Exit(context)


class _Exit:
    def __init__(self, context):
        self.context = context

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.context.__exit__(*exc)


def test_skipped_files_are_named(fx, tmp_path):
    from PIL import Image

    from ditcli.training.config import TrainConfig
    from ditcli.training.trainer import Trainer
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG no")
    events = []
    config = TrainConfig(data=str(folder), out=str(tmp_path / "run"), model="DiT-S/2", hidden_size=32, depth=2,
                         num_heads=2, image_size=8, channels=1, vae=None, global_batch=4, steps=1)
    Trainer(config, lambda kind, data: events.append((kind, data))).run()
    skipped = [data["message"] for kind, data in events if kind == "warning" and "skipped" in data["message"]]
    assert len(skipped) == 1 and "broken.png" in skipped[0] and "skipped 1 " in skipped[0]


def test_training_ends_with_a_summary_line(fx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", str(fx / "good.npz"), "--out", "run", *TINY])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("done: DiT-S/2 trained to step 1/1") and "ckpt-0000001.pt" in last


def test_a_finished_rerun_shows_no_empty_bar(fx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--ckpt", str(fx / "tiny.safetensors"), "--out", "out", "--num", "2", "--steps", "2"]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "0/0" not in again.output
    lines = again.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote 2 images to out (2 already done), NFE 2 per image")


def test_no_bar_is_left_above_an_error_found_in_the_data(fx, tmp_path, monkeypatch):
    from ditcli.evaluation import features
    features.register_feature_extractor("test-mean-rgb", lambda path: lambda x: x.float().mean(dim=(2, 3)))
    work = tmp_path / "work"
    work.mkdir()
    # The reference scores fine; the samples turn out truncated only once they are read.
    code, output = invoke(["fid", str(fx / "truncrgb.npz"), "--ref", str(fx / "rgb.npz"), "--features",
                           "test-mean-rgb"], work, monkeypatch)
    assert_one_line_error(code, output, "truncrgb.npz")


def test_empty_npz_is_a_message_even_with_debug(fx, tmp_path, monkeypatch):
    from ditcli.errors import UserError
    for argv in (["train", "--data", str(fx / "zerobytes.npz"), "--out", "run", *TINY],
                 ["fid", str(fx / "rgb.npz"), "--ref", str(fx / "zerobytes.npz")]):
        monkeypatch.chdir(tmp_path)
        result = CliRunner().invoke(app, ["--debug", *argv])
        assert isinstance(result.exception, UserError) and "zerobytes.npz" in str(result.exception)
        assert "Aborted" not in result.output


def test_every_train_option_has_help_and_shows_its_default():
    import typer

    command = typer.main.get_command(app).commands["train"]
    for param in command.params:
        if param.name == "help":
            continue
        assert param.help, f"{param.opts} has no help"
        flag = getattr(param, "is_flag", False) and not param.secondary_opts
        assert flag or "Default:" in param.help or param.show_default, f"{param.opts} shows no default"


def test_docs_state_the_shipped_defaults():
    docs = Path(__file__).resolve().parents[1] / "docs"
    sampling = (docs / "sampling.md").read_text()
    assert "2.0 (fashion-mnist)" not in sampling and "fashion-mnist" in sampling
    fashion = (docs / "fashion-mnist.md").read_text()
    assert "linear schedule, 1000 steps" not in fashion and "40,000 optimizer steps" in fashion


@pytest.mark.parametrize("args, line", [
    (["sample", "--compile", "auto"], "--compile is a switch and takes no value, got 'auto' (pass --compile or "
                                      "--no-compile, or leave both out for the default)"),
    (["sample", "--json", "yes"], "--json is a switch and takes no value, got 'yes' (pass --json alone, or leave it "
                                  "out for the default)"),
])
def test_a_value_given_to_a_switch_says_how_to_write_it(tmp_path, monkeypatch, args, line):
    code, output = invoke(args, tmp_path, monkeypatch)
    assert_one_line_error(code, output, "is a switch")
    assert " ".join(output.split()) == f"error: {line}"


def test_typer_errors_keep_their_suggestions(tmp_path, monkeypatch):
    code, output = invoke(["train", "--ema-deca", "0.9"], tmp_path, monkeypatch)
    assert_one_line_error(code, output, "--ema-deca")
    assert "did you mean --ema-decay" in output and "train --help`" in output
