"""Day-one trust in `dit train` (issue 32): a run folder is never started over, keep-last deletes only the run's own
older checkpoints, data of another size is refused with options that work, the fine-tuning hint is complete,
evaluation shows its progress and warnings and takes its own sampler, a bare --resume continues with the stored
settings, and the start-up table and preview grid are legible."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import dit, ok
from PIL import Image
from rich.console import Console

from ditcli.cli.progress import TrainProgress
from ditcli.errors import UserError
from ditcli.io import safe_torch_load
from ditcli.model.dit import DiT, DiTConfig
from ditcli.ranks import Ranks
from ditcli.training import preview
from ditcli.training.checkpoints import Checkpoints, Slot
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=100, seed=3, device="cpu")
TINY_ARGS = ["--model", "DiT-S/2", "--hidden-size", 32, "--depth", 2, "--num-heads", 2, "--global-batch", 8,
             "--device", "cpu", "--log-every", 1]


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, size=(24, 8, 8, 1), dtype=np.uint8), labels=np.arange(24) % 3,
             class_names=np.array(["shirt", "shoe", "bag"]))
    return path


def run(out: Path, data: Path, steps: int, resume=None, **overrides) -> Trainer:
    trainer = Trainer(TrainConfig(data=str(data), out=str(out), steps=steps, **{**TINY, **overrides}), resume=resume)
    trainer.run()
    return trainer


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(result) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def hinted_options(line: str, before: str) -> list[str]:
    """The options a one-line error suggests: what follows `before` up to the closing parenthesis."""
    found = re.search(re.escape(before) + r"(.*)\)$", line)
    assert found, line
    return found.group(1).split()


# 1. A new run never destroys a run folder.

def test_a_new_run_into_a_folder_that_holds_a_run_is_refused_and_changes_nothing(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=3, ckpt_every=1)
    before = snapshot(tmp_path)
    for other in (dict(), dict(hidden_size=64, num_heads=4)):  # the same run again, and another model
        with pytest.raises(UserError, match=r"already holds a run \(ckpt-0000003.pt, metrics.jsonl, run.json\)") as e:
            run(tmp_path, npz_data, steps=2, **other)
        assert "--resume auto" in e.value.hint and "new --out" in e.value.hint
    assert snapshot(tmp_path) == before
    line = error_line(dit("train", "--data", npz_data, *TINY_ARGS, "--image-size", 8, "--channels", 1, "--vae", "none",
                          "--steps", 2, "--out", tmp_path))
    assert "--resume auto" in line and "new --out" in line
    assert snapshot(tmp_path) == before


def test_keep_last_deletes_only_this_runs_older_checkpoints(tmp_path):
    strangers = [tmp_path / f"ckpt-{step:07d}.pt" for step in (200, 250, 300)]  # not written by this run
    for path in strangers:
        path.write_bytes(b"a user's file")
    state = {"step": 0}
    checkpoints = Checkpoints(tmp_path, 1, 2, Ranks(), [Slot("step", lambda: state["step"])])
    for step in (1, 2, 3):
        state["step"] = step
        checkpoints.save(step)
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == [
        "ckpt-0000002.pt", "ckpt-0000003.pt", *(p.name for p in strangers)]
    assert all(path.read_bytes() == b"a user's file" for path in strangers)


def test_keep_last_spans_resumes_of_the_same_run(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=3, ckpt_every=1, keep_last=2)
    run(tmp_path, npz_data, steps=5, ckpt_every=1, keep_last=2, resume="auto")
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt")) == ["ckpt-0000004.pt", "ckpt-0000005.pt"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resuming_an_older_checkpoint_or_another_folders_into_a_run_is_refused(tmp_path, npz_data):
    run(tmp_path / "a", npz_data, steps=4, ckpt_every=2)
    run(tmp_path / "b", npz_data, steps=2)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="is older than ckpt-0000004.pt"):
        run(tmp_path / "a", npz_data, steps=6, resume=str(tmp_path / "a" / "ckpt-0000002.pt"))
    with pytest.raises(UserError, match="continues the run of another folder"):
        run(tmp_path / "b", npz_data, steps=6, resume=str(tmp_path / "a" / "ckpt-0000004.pt"))
    assert snapshot(tmp_path) == before
    branch = run(tmp_path / "c", npz_data, steps=3, resume=str(tmp_path / "a" / "ckpt-0000002.pt"))  # a new --out
    assert branch.state.step == 3 and snapshot(tmp_path / "a") == {k[2:]: v for k, v in before.items()
                                                                   if k.startswith("a/")}


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_its_settings(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=3)
    (tmp_path / "ckpt-0000003.pt").unlink()  # as if killed before the end-of-run save
    with pytest.raises(UserError, match=r"run.json: the configuration differs \(lr: 0.001 -> 0.002\)"):
        run(tmp_path, npz_data, steps=3, resume="auto", lr=2e-3)
    again = run(tmp_path, npz_data, steps=3, resume="auto")
    assert again.state.step == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # the rows of the first attempt were dropped, not doubled


# 2. Data of another size than --image-size: refused with options that work.

def idx_folder(root: Path, count: int = 16, size: int = 28) -> Path:
    """A Fashion-MNIST-style folder of idx files: `count` grayscale `size`x`size` images in 2 classes."""
    root.mkdir(parents=True, exist_ok=True)
    images = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (root / "train-images-idx3-ubyte").write_bytes(header + images.tobytes())
    labels = (np.arange(count) % 2).astype(np.uint8)
    (root / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + count.to_bytes(4, "big") + labels.tobytes())
    return root


@pytest.mark.parametrize("given, suggested", [
    (["--vae", "none"], "--image-size 28 --channels 1"),  # the first error's own advice led here
    ([], "--vae none --image-size 28 --channels 1"),
    (["--image-size", 32, "--channels", 1, "--vae", "none"], "--image-size 28"),
    (["--image-size", 32, "--channels", 1, "--vae", "none", "--model", "DiT-S/8"], "--image-size 28 --model DiT-S/4"),
])
def test_idx_data_of_another_size_is_refused_and_the_suggestion_runs(tmp_path, offline, given, suggested):
    data = idx_folder(tmp_path / "fashion")
    command = ["train", "--data", data, *TINY_ARGS, "--steps", 2, *given]
    line = error_line(dit(*command, "--out", tmp_path / "run"))
    assert "holds 28x28 grayscale images" in line and " ".join(hinted_options(line, "(add ")) == suggested
    assert not (tmp_path / "run").exists()  # refused before anything was written
    ok(*command, *hinted_options(line, "(add "), "--out", tmp_path / "run")  # the suggestion, verbatim
    assert safe_torch_load(tmp_path / "run" / "ckpt-0000002.pt")["config"]["model"]["input_size"] == 28


# 3. The fine-tuning hint names every option that differs.

def test_the_suggested_flags_fix_a_learn_sigma_mismatch(tmp_path, offline):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "fm.npz", images=rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
             labels=np.arange(16) % 10)
    command = ["train", "--preset", "fashion-mnist", "--init-from", ROOT / "weights" / "fashion-mnist-ddpm.safetensors",
               "--data", tmp_path / "fm.npz", "--steps", 1, "--global-batch", 8, "--device", "cpu"]
    line = error_line(dit(*command, "--out", tmp_path / "run"))
    assert "learn_sigma True (source) vs False" in line
    flags = hinted_options(line, "train the source's shape: ")
    assert "--learn-sigma" in flags
    ok(*command, *flags, "--out", tmp_path / "run")
    config = safe_torch_load(tmp_path / "run" / "ckpt-0000001.pt")["config"]
    assert config["model"]["learn_sigma"] and config["train"]["objective"] == "flow"


# 4. FD while training: its progress, warnings and sampler.

@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    np.savez(path, arr_0=np.random.default_rng(1).integers(0, 256, (48, 8, 8, 3), dtype=np.uint8))
    return path


def test_evaluation_reports_progress_and_warnings_and_takes_its_sampler(tmp_path, npz_data, reference):
    events = []
    config = TrainConfig(data=str(npz_data), out=str(tmp_path), steps=4, eval_every=2, eval_ref=str(reference),
                         eval_num=12, eval_features="fashion-judge", eval_sampler="ddim", eval_steps=3, eval_cfg=1.5,
                         **TINY)
    Trainer(config, on_event=lambda kind, data: events.append((kind, data))).run()
    starts = [data for kind, data in events if kind == "eval_start"]
    assert [(d["step"], d["sampler"], d["steps"], d["cfg"], d["num"]) for d in starts] == [
        (2, "ddim", 3, 1.5, 12), (4, "ddim", 3, 1.5, 12)]
    stages = [(d["step"], d["stage"], d["done"], d["total"]) for kind, d in events if kind == "eval_progress"]
    assert (2, "sampling", 12, 12) in stages and (4, "sampling", 12, 12) in stages
    assert (2, "reference", 48, 48) in stages and not [s for s in stages if s[:2] == (4, "reference")]  # once a run
    assert (2, "samples", 12, 12) in stages and (4, "samples", 12, 12) in stages
    warnings = [d["message"] for kind, d in events if kind == "warning" and "evaluation" in d["message"]]
    assert warnings[0].startswith("warning: evaluation at step 2: only 12 samples for 128 features")
    said = [message.split(": ", 2)[2] for message in warnings]
    assert len(said) == len(set(said))  # each warning once, not at every evaluation
    assert [d["evals_left"] for kind, d in events if kind == "step"] == [2, 1, 1, 0]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["eval_sampler"], r["eval_steps"], r["eval_cfg"]) for r in rows if "fd" in r]
    assert evals == [("ddim", 3, 1.5)] * 2 and not any("warnings" in r or "evals_left" in r for r in rows)
    sidecar = json.loads((tmp_path / "eval" / "step-0000002.provenance.json").read_text())
    assert (sidecar["sampler"], sidecar["steps"], sidecar["cfg"]) == ("ddim", 3, 1.5)


def test_evaluation_sampling_options_are_checked_and_may_change_on_resume(tmp_path, npz_data, reference):
    evaluating = dict(eval_every=2, eval_ref=str(reference), eval_num=4, eval_features="fashion-judge")
    for bad, message in ((dict(eval_sampler="dopri5"), "--eval-sampler 'dopri5' does not sample a DDPM model"),
                         (dict(eval_steps=0), "--eval-steps must be between 1 and"),
                         (dict(eval_cfg=-1.0), "--eval-cfg must be in"),
                         (dict(eval_cfg=2.0, class_dropout_prob=0.0), "--eval-cfg 2 needs a null class")):
        with pytest.raises(UserError, match=message):
            TrainConfig(data="x", **{**evaluating, **bad})
    run(tmp_path, npz_data, steps=2, **evaluating)
    resumed = run(tmp_path, npz_data, steps=4, resume="auto", eval_sampler="ddim", eval_steps=2, **evaluating)
    assert resumed.state.step == 4


def test_the_eta_counts_the_evaluations_still_due():
    config = TrainConfig(data="x", steps=100, global_batch=8)
    progress = TrainProgress(config, Console(quiet=True), quiet=True)
    step = {"step": 50, "loss": 0.5, "img_per_s": 8.0, "evals_left": 2}  # 1 s a step
    assert progress.eta(step) == "0:00:50 + evals"  # no evaluation timed yet
    progress.on_event("eval", {"step": 50, "fd": 1.0, "eval_num": 4, "eval_features": "x", "eval_seconds": 30.0})
    assert progress.eta(step) == "0:01:50"
    assert progress.eta({**step, "evals_left": 0}) == "0:00:50"


def test_the_cli_says_what_the_evaluation_does(tmp_path, npz_data, reference):
    result = ok("train", "--data", npz_data, *TINY_ARGS, "--image-size", 8, "--channels", 1, "--vae", "none",
                "--steps", 2, "--eval-every", 2, "--eval-ref", reference, "--eval-num", 4, "--eval-features",
                "fashion-judge", "--eval-sampler", "ddim", "--eval-steps", 2, "--out", tmp_path)
    assert "eval: step 2, 4 images (ddim, 2 steps, cfg 4) scored in fashion-judge features" in result.output
    assert "warning: evaluation at step 2: only 4 samples for 128 features" in result.output


# 5. A bare --resume continues with the run's stored settings.

def test_resume_alone_continues_with_the_stored_settings(tmp_path, npz_data):
    first = ["train", "--data", npz_data, *TINY_ARGS, "--image-size", 8, "--channels", 1, "--vae", "none",
             "--lr", "1e-3", "--ema-decay", 0.9, "--lr-schedule", "cosine", "--steps", 2, "--out", tmp_path / "run"]
    ok(*first)
    ok("train", "--resume", "auto", "--out", tmp_path / "run", "--steps", 4)  # the only option that changes
    stored = [safe_torch_load(tmp_path / "run" / f"ckpt-{s:07d}.pt")["config"]["train"] for s in (2, 4)]
    assert stored[1] == {**stored[0], "steps": 4}
    line = error_line(dit("train", "--resume", "auto", "--out", tmp_path / "run", "--lr", 0.5, "--steps", 5))
    assert "the configuration differs (lr: 0.001 -> 0.5)" in line
    (tmp_path / "run" / "run.json").unlink()  # a run from before run.json: the newest checkpoint's settings
    ok("train", "--resume", "auto", "--out", tmp_path / "run", "--steps", 5)
    # A named checkpoint continues into a new folder with its settings.
    ok("train", "--resume", tmp_path / "run" / "ckpt-0000004.pt", "--out", tmp_path / "branch", "--steps", 6)
    branch = safe_torch_load(tmp_path / "branch" / "ckpt-0000006.pt")["config"]["train"]
    assert branch == {**stored[0], "steps": 6, "out": str(tmp_path / "branch")}
    line = error_line(dit("train", "--resume", "auto", "--out", tmp_path / "empty"))
    assert "no training data given" in line and "--out of an existing run" in line


# 6. The start-up table and the preview grid.

def test_the_start_up_table_names_the_recipe_and_a_readable_codec(tmp_path, npz_data):
    trainer = Trainer(TrainConfig(data=str(npz_data), out=str(tmp_path / "a"), steps=2,
                                  **{**TINY, "lr": 3e-4, "lr_schedule": "cosine", "lr_warmup": 1, "ema_warmup": True}))
    trainer.setup()
    rows = trainer.summary()
    assert rows["objective"] == "ddpm, learned sigma" and rows["schedule"] == "linear"
    assert rows["learning_rate"] == "0.0003, cosine to 0 at step 2, 1 warm-up steps"
    assert rows["ema"] == "decay 0.9, warm-up" and rows["out"] == str(tmp_path / "a")
    assert rows["codec"] == "pixels, 1 channel (no VAE)"
    result = ok("train", "--data", npz_data, *TINY_ARGS, "--image-size", 8, "--channels", 1, "--vae", "none",
                "--objective", "flow", "--time-sampling", "logit-normal", "--steps", 1, "--out", tmp_path / "b")
    cells = [line.split("│")[2].strip() for line in result.output.splitlines() if line.count("│") == 3]
    for row in ("flow, time noise-to-data, learned sigma, time sampling logit-normal", "pixels, 1 channel (no VAE)",
                "decay 0.9999"):
        assert row in " ".join(cells), result.output
    assert str(tmp_path / "b") in "".join(cells)  # the output folder whole, however narrow the terminal
    assert "'kind'" not in result.output


def test_the_preview_grid_is_upscaled_and_captioned_with_class_names(tmp_path, monkeypatch):
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                       num_classes=3)
    from ditcli.diffusion.objectives import DDPM
    from ditcli.model.codec import PixelCodec

    captions = []
    real_grid = preview.make_grid
    monkeypatch.setattr(preview, "make_grid", lambda images, names, *a, **k: captions.extend(names) or
                        real_grid(images, names, *a, **k))
    path = preview.ema_preview(DiT(config).eval(), PixelCodec(1), DDPM, "linear", tmp_path / "p.png", 0,
                               ["shirt", "shoe", "bag"])
    assert captions == ["shirt", "shirt", "shoe", "shoe", "bag", "bag"]
    width, height = Image.open(path).size
    assert width == 4 * (preview.PREVIEW_CELL + 2) - 2 and height > 2 * preview.PREVIEW_CELL  # 8 px drawn at 96
