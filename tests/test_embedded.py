"""The shipped Fashion-MNIST DiTs (the mean-flow model `fashion-mnist` or `fashion-mnist-meanflow`, the flow model
`fashion-mnist-flow`, the DDPM model `fashion-mnist-ddpm`) and their judge: they load, sample offline by name and
classify real images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
)
from ditcli.diffusion.guidance import Guidance
from ditcli.evaluation.judge import JUDGE_FILE, load_judge
from ditcli.model.codec import PixelCodec
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import generate_images
from ditcli.weights.checkpoint import load_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
FLOW, DDPM = WEIGHTS / "fashion-mnist.safetensors", WEIGHTS / "fashion-mnist-ddpm.safetensors"
MEANFLOW = WEIGHTS / "fashion-mnist-meanflow.safetensors"


@pytest.mark.parametrize("path, objective, out_channels", [(FLOW, "flow", 1), (DDPM, "ddpm", 2),
                                                            (MEANFLOW, "meanflow", 1)])
def test_shipped_weights_carry_their_config_codec_names_and_objective(path, objective, out_channels):
    assert path.stat().st_size <= 10 * 2**20
    checkpoint = load_checkpoint(path)
    assert checkpoint.codec == {"kind": "pixel", "channels": 1}
    assert checkpoint.class_names == FASHION_MNIST_CLASSES
    assert checkpoint.config.input_size == 28 and checkpoint.config.in_channels == 1
    assert (checkpoint.objective.name, checkpoint.config.out_channels) == (objective, out_channels)
    assert checkpoint.weights == "ema"


@pytest.mark.parametrize("path, sampler", [(FLOW, "euler"), (DDPM, "dpm++2m"), (MEANFLOW, "flow-map")])
def test_shipped_models_make_images_of_the_right_shape_and_range(path, sampler):
    checkpoint = load_checkpoint(path)
    config = GenerateConfig(labels=(7, 9), sampler=sampler, steps=5, guidance=Guidance(2.0, "all"), batch_size=4,
                            objective=checkpoint.objective)
    (batch,) = list(generate_images(checkpoint.build("cpu"), PixelCodec(1), config, range(2), torch.device("cpu")))
    assert batch.images.shape == (2, 28, 28, 1) and batch.images.dtype == torch.uint8
    assert batch.images.float().std() > 10  # not a blank image
    assert batch.nfe == 5


def test_readme_command_works_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OFFLINE", "1")
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "empty-home"))
    out = tmp_path / "sneakers"
    result = CliRunner().invoke(app, ["sample", "--model", "fashion-mnist", "--class", "sneaker",
                                      "--num-per-class", "4", "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("0000*_7-*.png"))) == 4
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 4 * 28 + 2  # one class: a square 2 x 2 grid of 4x-upscaled cells, not a row of 4


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs the dataset-fashion-mnist package")
def test_judge_classifies_real_test_images():
    judge = load_judge(JUDGE_FILE)
    test = load_fashion_mnist(split="test")
    x = torch.from_numpy(test.images[:500]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        accuracy = (judge(x).argmax(1).numpy() == test.labels[:500]).mean()
    assert accuracy > 0.88


@pytest.mark.parametrize("name, sampler", [("fashion-mnist", "flow-map"), ("fashion-mnist-flow", "euler"),
                                           ("fashion-mnist-ddpm", "dpm++2m"), ("fashion-mnist-meanflow", "flow-map")])
def test_each_shipped_model_samples_offline_by_its_name_as_the_judge_expects(name, sampler, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_OFFLINE", "1")
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["sample", "--model", name, "--class", "trouser", "--class", "bag",
                                      "--num-per-class", 5, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert (provenance["model"], provenance["sampler"]) == (name, sampler)  # the file's own defaults
    images = [np.asarray(Image.open(path).convert("L")) for path in sorted((tmp_path / "out").glob("0*.png"))]
    x = torch.from_numpy(np.stack(images)).unsqueeze(1).float() / 127.5 - 1  # (10, 1, 28, 28)
    with torch.no_grad():
        judged = load_judge(JUDGE_FILE)(x).argmax(1).tolist()
    assert judged[:5].count(1) >= 4 and judged[5:].count(8) >= 4  # trousers, then bags
