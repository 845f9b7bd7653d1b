"""`dit fid --features dinov2`: FD-DINOv2 with the tiny golden DINOv2 (tests/golden-dinov2/dinov2-A.pt, 48 wide, 3
heads, given to the loader by the sidecar `dinov2-A.pt.json`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.evaluation.dinov2 import RELEASED_WEIGHTS

GOLDEN = Path(__file__).parent / "golden-dinov2" / "dinov2-A.pt"


def run(*args):
    return CliRunner().invoke(app, ["fid", *map(str, args)])


def save_npz(path: Path, n: int, seed: int, size: int = 32) -> Path:
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2")
    weights = shutil.copy(GOLDEN, folder / "tiny-dinov2.pt")  # another name than the released file: used as it is
    (folder / "tiny-dinov2.pt.json").write_text(json.dumps({"num_heads": 3}))
    return Path(weights)


@pytest.fixture(scope="module")
def dinov2_ref(tmp_path_factory, tiny_weights) -> Path:
    folder = tmp_path_factory.mktemp("ref")
    data = save_npz(folder / "data.npz", 12, seed=1)
    ref = folder / "ref.npz"
    result = run("--make-ref", data, "-o", ref, "--features", "dinov2", "--dinov2-weights", tiny_weights,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert str(np.load(ref)["feature_extractor"]) == "dinov2"
    return ref


def score(samples: Path, ref: Path, weights: Path, *extra) -> dict:
    result = run(samples, "--ref", ref, "--features", "dinov2", "--dinov2-weights", weights, "--device", "cpu",
                 "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_fd_dinov2_is_printed_and_batch_independent(tmp_path, dinov2_ref, tiny_weights):
    samples = save_npz(tmp_path / "s.npz", 10, seed=2)
    one, four = (score(samples, dinov2_ref, tiny_weights, "--batch-size", bs)["fid"] for bs in (1, 4))
    assert np.isfinite(one) and one > 0
    assert four == pytest.approx(one, rel=1e-5)
    table = run(samples, "--ref", dinov2_ref, "--dinov2-weights", tiny_weights, "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert "FID" in table.stdout and "dinov2 features" in table.stdout


def test_reference_of_other_features_is_refused(tmp_path, tiny_weights):
    samples = save_npz(tmp_path / "s.npz", 4, seed=3)
    other = tmp_path / "other.npz"
    np.savez(other, arr_0=np.load(samples)["arr_0"], feature_extractor=np.array("fashion-judge"))
    result = run(samples, "--ref", other, "--features", "dinov2", "--dinov2-weights", tiny_weights)
    assert_user_error(result, "other.npz", "'fashion-judge'", "not dinov2")


def test_offline_without_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DIT_OFFLINE", "1")
    data = save_npz(tmp_path / "data.npz", 4, seed=4)
    out = tmp_path / "ref.npz"
    result = run("--make-ref", data, "-o", out, "--features", "dinov2", "--device", "cpu")
    name = RELEASED_WEIGHTS["dinov2_vitl14"].url.rsplit("/", 1)[-1]
    assert_user_error(result, "downloads are off", "--dinov2-weights PATH", name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz"]  # no reference, no home folder


def test_dinov2_weights_need_dinov2_features(tmp_path, tiny_weights):
    samples = save_npz(tmp_path / "s.npz", 4, seed=5)
    assert_user_error(run(samples, "--ref", samples, "--features", "inception", "--dinov2-weights", tiny_weights),
                      "--dinov2-weights only applies to --features dinov2")
