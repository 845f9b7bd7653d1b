"""The shipped Fashion-MNIST DiT and its judge: they load, sample offline and classify real images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ditcli.checkpoint import load_checkpoint
from ditcli.cli import app
from ditcli.codec import PixelCodec
from ditcli.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from ditcli.generate import GenerateConfig, generate_images
from ditcli.judge import JUDGE_FILE, load_judge
from ditcli.samplers import Guidance

WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "fashion-mnist.safetensors"


def test_shipped_weights_carry_their_config_codec_and_names():
    assert WEIGHTS.stat().st_size <= 10 * 2**20
    checkpoint = load_checkpoint(WEIGHTS)
    assert checkpoint.codec == {"kind": "pixel", "channels": 1}
    assert checkpoint.class_names == FASHION_MNIST_CLASSES
    assert checkpoint.config.input_size == 28 and checkpoint.config.in_channels == 1
    assert checkpoint.weights == "ema"


def test_shipped_model_makes_images_of_the_right_shape_and_range():
    model = load_checkpoint(WEIGHTS).build("cpu")
    config = GenerateConfig(labels=(7, 9), sampler="dpm++2m", steps=5, guidance=Guidance(2.0, "all"), batch_size=4)
    (batch,) = list(generate_images(model, PixelCodec(1), config, range(2), torch.device("cpu")))
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


def test_the_shipped_flow_model_samples_offline_by_its_name_and_the_judge_knows_its_classes(tmp_path, monkeypatch):
    flow = WEIGHTS.with_name("fashion-mnist-flow.safetensors")
    assert flow.stat().st_size <= 10 * 2**20
    checkpoint = load_checkpoint(flow)
    assert (checkpoint.objective.objective, checkpoint.config.out_channels) == ("flow", 1)
    assert checkpoint.sampling.sampler == "euler" and checkpoint.sampling.interval == (0.156, 0.781)
    monkeypatch.setenv("DIT_OFFLINE", "1")
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["sample", "--model", "fashion-mnist-flow", "--class", "trouser", "--class",
                                      "bag", "--num-per-class", 5, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    images = [np.asarray(Image.open(path).convert("L")) for path in sorted((tmp_path / "out").glob("0*.png"))]
    x = torch.from_numpy(np.stack(images)).unsqueeze(1).float() / 127.5 - 1  # (10, 1, 28, 28)
    with torch.no_grad():
        judged = load_judge(JUDGE_FILE)(x).argmax(1).tolist()
    assert judged[:5].count(1) >= 4 and judged[5:].count(8) >= 4  # trousers, then bags
