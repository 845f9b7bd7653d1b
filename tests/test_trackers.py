"""`dit train --log tensorboard|wandb`: every scalar at its step, read back with TensorBoard's own event reader, also
across an interrupted run and its resume; W&B through a stand-in module; one-line errors for a missing package."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import dit, ok

TRAIN = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size",
         "8", "--vae", "none", "--channels", "1", "--global-batch", "8", "--lr", "1e-3", "--device", "cpu",
         "--log-every", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), labels=np.arange(16) % 2)
    return path


def event_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}, purge_orphaned_data=True)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def jsonl(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_tensorboard_holds_every_scalar_at_its_step_and_the_preview(tmp_path, data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ok(*TRAIN, "--data", data, "--steps", 4, "--sample-every", 2, "--log", "tensorboard", "--out", tmp_path)
    for key in ("loss", "mse", "vb", "grad_norm", "lr", "img_per_s", "bad_steps"):
        logged = event_scalars(tmp_path / "tensorboard", f"train/{key}")
        assert [s for s, _ in logged] == [1, 2, 3, 4], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in jsonl(tmp_path, key)], rel=1e-6), key
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("ema_preview")] == [2, 4]
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]


def test_a_resumed_run_continues_the_same_curves_without_duplicates(tmp_path, data):
    pytest.importorskip("tensorboard")
    args = [*TRAIN, "--data", data, "--ckpt-every", 4, "--log", "tensorboard", "--out", tmp_path]
    straight = tmp_path / "straight"
    ok(*TRAIN, "--data", data, "--steps", 8, "--log", "tensorboard", "--out", straight)
    # An interrupted run: steps 5 and 6 were logged, but it died before their checkpoint.
    ok(*args, "--steps", 6)
    (tmp_path / "ckpt-0000006.pt").unlink()
    ok(*args, "--steps", 8, "--resume", "auto")
    resumed = event_scalars(tmp_path / "tensorboard", "train/loss")
    assert [s for s, _ in resumed] == list(range(1, 9))  # 5 and 6 once each, not twice
    assert [v for _, v in resumed] == pytest.approx([v for _, v in event_scalars(straight / "tensorboard",
                                                                                  "train/loss")], rel=1e-6)
    assert [s for s, _ in jsonl(tmp_path, "loss")] == list(range(1, 9))


class FakeWandb(types.ModuleType):
    """Records what a run would send to W&B."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        outer = self

        class Run:
            def log(self, values, step):
                outer.logged.append((step, values))

            def finish(self):
                outer.finished += 1

        self.Run = Run
        self.Image = lambda pixels: ("image", pixels.shape)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()


def test_wandb_gets_every_step_and_resumes_the_same_run(tmp_path, data, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = [*TRAIN, "--data", data, "--sample-every", 2, "--ckpt-every", 2, "--log", "wandb", "--out", tmp_path]
    ok(*args, "--steps", 2)
    ok(*args, "--steps", 4, "--resume", "auto")
    assert len(fake.inits) == 2 and fake.inits[0]["id"] == fake.inits[1]["id"]
    assert fake.inits[1]["resume"] == "allow" and fake.inits[0]["config"]["steps"] == 2
    scalar_steps = [step for step, values in fake.logged if "train/loss" in values]
    assert scalar_steps == [1, 2, 3, 4] and fake.finished == 2
    assert [step for step, values in fake.logged if "ema_preview" in values] == [2, 4]
    losses = [values["train/loss"] for _, values in fake.logged if "train/loss" in values]
    assert losses == pytest.approx([v for _, v in jsonl(tmp_path, "loss")], rel=1e-6)


@pytest.mark.parametrize("module, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_naming_the_install(tmp_path, data, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    result = dit(*TRAIN, "--data", data, "--steps", 1, "--log", extra, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert f"pip install 'ditcli[{extra}]'" in result.output and len(result.output.strip().splitlines()) == 1


def test_an_unknown_tracker_is_one_line(tmp_path, data):
    result = dit(*TRAIN, "--data", data, "--steps", 1, "--log", "mlflow", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "unknown --log 'mlflow'" in result.output
    assert not (tmp_path / "run").exists()
