"""FID while training: the number logged is `dit fid`'s on the same file, evaluating leaves the trained weights
bit-identical, the ranks split the images, and bad settings are one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit, ok

from ditcli.io import safe_torch_load

TRAIN = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size",
         "8", "--vae", "none", "--channels", "1", "--global-batch", "8", "--lr", "1e-3", "--device", "cpu",
         "--log-every", "1", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", images=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8),
             labels=np.arange(16) % 2)
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8))
    return root


def evaluating(files: Path, every: int = 2, num: int = 12) -> list:
    return ["--eval-every", every, "--eval-ref", files / "ref.npz", "--eval-num", num, "--eval-features",
            "fashion-judge"]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_logged_fd_is_dit_fids_on_the_same_samples(tmp_path, files):
    ok(*TRAIN, "--data", files / "data.npz", "--steps", 4, *evaluating(files), "--out", tmp_path)
    evals = [r for r in records(tmp_path) if "fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        npz = Path(record["eval_npz"])
        assert np.load(npz)["arr_0"].shape == (12, 8, 8, 1)  # grayscale, as the model draws it
        scored = json.loads(ok("fid", npz, "--ref", files / "ref.npz", "--features", "fashion-judge",
                               "--json").stdout)
        assert scored["fid"] == record["fd"] and scored["kid"] == record["kid"]
    # The EMA moved between the two evaluations, so their images differ.
    first, second = (np.load(Path(r["eval_npz"]))["arr_0"] for r in evals)
    assert not np.array_equal(first, second)


def test_evaluating_leaves_the_trained_weights_bit_identical(tmp_path, files):
    ok(*TRAIN, "--data", files / "data.npz", "--steps", 4, "--out", tmp_path / "plain")
    ok(*TRAIN, "--data", files / "data.npz", "--steps", 4, *evaluating(files, every=1), "--out", tmp_path / "eval")
    plain, evaluated = (safe_torch_load(tmp_path / name / "ckpt-0000004.pt") for name in ("plain", "eval"))
    for key in ("model", "ema"):
        for name, tensor in plain[key].items():
            assert torch.equal(evaluated[key][name], tensor), f"{key}.{name}"
    for index, state in plain["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(evaluated["optimizer"]["state"][index][name], tensor)
    assert [r["loss"] for r in records(tmp_path / "plain")] == \
        [r["loss"] for r in records(tmp_path / "eval") if "loss" in r]


def test_evaluation_is_logged_to_tensorboard_and_resumes_with_the_run(tmp_path, files):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [*TRAIN, "--data", files / "data.npz", *evaluating(files), "--log", "tensorboard", "--ckpt-every", 2,
            "--out", tmp_path]
    ok(*args, "--steps", 2)
    ok(*args, "--steps", 4, "--resume", "auto")
    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    assert [e.step for e in events.Scalars("eval/fd")] == [2, 4]
    assert [r["step"] for r in records(tmp_path) if "fd" in r] == [2, 4]


@pytest.mark.parametrize("args, message", [
    (["--eval-every", "2"], "--eval-every needs --eval-ref"),
    (["--eval-every", "2", "--eval-ref", "missing.npz"], "--eval-ref missing.npz not found"),
    (["--eval-every", "2", "--eval-ref", "REF", "--eval-num", "1"], "--eval-num must be between 2"),
    (["--eval-every", "-1"], "--eval-every must be between 0"),
])
def test_bad_evaluation_settings_are_one_line(tmp_path, files, args, message):
    args = [str(files / "ref.npz") if a == "REF" else a for a in args]
    result = dit(*TRAIN, "--data", files / "data.npz", "--steps", 2, *args, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_ranks_split_the_evaluation_and_log_what_one_process_logs(tmp_path, files):
    common = [*TRAIN, "--data", str(files / "data.npz"), "--steps", "2",
              *map(str, evaluating(files, every=2, num=10)), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ditcli", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "ditcli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    (a,), (b,) = ([r for r in records(tmp_path / name) if "fd" in r] for name in ("one", "two"))
    assert np.array_equal(np.load(a["eval_npz"])["arr_0"], np.load(b["eval_npz"])["arr_0"])
    assert b["fd"] == pytest.approx(a["fd"], rel=1e-6)
