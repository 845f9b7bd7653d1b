"""`dit train --objective flow` and flow sampling through the front door: training, exact resume, torchrun, the
record in every file, and one-line errors for what does not fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit, ok

from ditcli.diffusion.flow import FlowMatching, shift_noise_level
from ditcli.diffusion.objectives import FlowObjective
from ditcli.io import safe_torch_load
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import load_checkpoint

TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=100, seed=3, objective="flow")
TRAIN = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size",
         "8", "--vae", "none", "--channels", "1", "--global-batch", "8", "--lr", "1e-3", "--device", "cpu",
         "--objective", "flow"]


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory) -> Path:
    """Three classes, one flat grey level each: something a few steps can learn."""
    patterns = np.array([0, 128, 255], dtype=np.uint8)[:, None, None, None] * np.ones((3, 8, 8, 1), np.uint8)
    labels = np.arange(24) % 3
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=patterns[labels], labels=labels, class_names=np.array(["a", "b", "c"]))
    return path


@pytest.fixture(autouse=True)
def no_downloads(offline):
    """Nothing here downloads."""


def run(out: Path, data: Path, steps: int, resume=None, **overrides) -> Trainer:
    trainer = Trainer(TrainConfig(data=str(data), out=str(out), steps=steps, **{**TINY, **overrides}), resume=resume)
    trainer.run()
    return trainer


# Training.

def test_flow_training_lowers_the_velocity_loss_and_records_the_objective(tmp_path, npz_data):
    trainer = run(tmp_path, npz_data, steps=30, learn_sigma=False, lr=3e-3)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])  # 1.61 -> 0.77 as written
    assert trainer.model.config.out_channels == 1  # --no-learn-sigma: the velocity alone
    data = safe_torch_load(tmp_path / "ckpt-0000030.pt")
    assert data["config"]["train"]["objective"] == "flow"
    assert data["sampling"]["sampler"] == "heun"  # a flow sampler, not DDPM's dpm++2m
    checkpoint = load_checkpoint(tmp_path / "ckpt-0000030.pt")
    assert checkpoint.objective == FlowObjective("noise-to-data") and checkpoint.objective_recorded


def test_flow_resume_is_bit_exact(tmp_path, npz_data):
    straight = run(tmp_path / "a", npz_data, steps=6, time_sampling="logit-normal", time_shift=2.0)
    run(tmp_path / "b", npz_data, steps=3, time_sampling="logit-normal", time_shift=2.0)
    resumed = run(tmp_path / "b", npz_data, steps=6, resume="auto", time_sampling="logit-normal", time_shift=2.0)
    for (name, a), b in zip(straight.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_resuming_a_flow_run_as_ddpm_is_refused(tmp_path, npz_data):
    run(tmp_path, npz_data, steps=2)
    with pytest.raises(Exception, match="objective: 'flow' -> 'ddpm'"):
        run(tmp_path, npz_data, steps=4, resume="auto", objective="ddpm")


def test_time_sampling_and_shift_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    uniform = FlowMatching().draw_times(20000, g)
    assert 0 <= float(uniform.min()) and float(uniform.max()) < 1 and abs(float(uniform.mean()) - 0.5) < 0.01
    logit = FlowMatching(time_sampling="logit-normal").draw_times(20000, torch.Generator().manual_seed(0))
    z = torch.logit(logit.double())
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    shifted = FlowMatching(time_shift=3.0).draw_times(5, torch.Generator().manual_seed(0))
    plain = torch.rand(5, generator=torch.Generator().manual_seed(0))
    # SiT's time: the noise level is 1 - t, and the shift moves it up (more training at high noise).
    torch.testing.assert_close(1 - shifted, shift_noise_level(1 - plain, 3.0))
    assert bool((shifted <= plain).all())


def test_time_grids_run_from_noise_to_data_in_either_direction():
    sit, repa = FlowMatching("noise-to-data"), FlowMatching("data-to-noise")
    assert sit.time_grid(4) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert repa.time_grid(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert repa.time_grid(3, last_step=0.04)[-2:] == pytest.approx([0.04, 0.0])
    assert sit.time_grid(2, shift=3.0)[1] == pytest.approx(1 - shift_noise_level(0.5, 3.0))


def test_cli_trains_a_flow_model_then_samples_it_with_each_flow_sampler(tmp_path, npz_data):
    ok(*TRAIN, "--data", npz_data, "--out", tmp_path / "run", "--steps", 3, "--sample-every", 3, "--json")
    assert (tmp_path / "run" / "samples" / "step-0000003.png").exists()  # the preview samples the flow
    ckpt = tmp_path / "run" / "ckpt-0000003.pt"
    nfe = {}
    for sampler in ("euler", "heun", "dopri5", "sde"):
        steps = [] if sampler == "dopri5" else ["--steps", 4]  # dopri5 chooses its own: --steps is refused
        out = json.loads(ok("sample", "--ckpt", ckpt, "--sampler", sampler, *steps, "--class", "a",
                            "--num-per-class", 2, "--out", tmp_path / sampler, "--json").stdout.splitlines()[-1])
        provenance = json.loads((tmp_path / sampler / "provenance.json").read_text())
        assert provenance["objective"] == {"objective": "flow", "time_direction": "noise-to-data"}
        assert provenance["nfe"] == out["nfe"]
        nfe[sampler] = out["nfe"]
    assert (nfe["euler"], nfe["heun"], nfe["sde"]) == (4, 8, 4)
    assert nfe["dopri5"] >= 8 and (nfe["dopri5"] - 2) % 6 == 0  # f0, the initial-step probe, 6 per step tried


def test_safetensors_round_trip_keeps_the_objective(tmp_path, npz_data):
    run(tmp_path / "run", npz_data, steps=2, time_direction="data-to-noise")
    ok("convert", tmp_path / "run" / "ckpt-0000002.pt", tmp_path / "m.safetensors")
    checkpoint = load_checkpoint(tmp_path / "m.safetensors")
    assert checkpoint.objective == FlowObjective("data-to-noise") and checkpoint.objective_recorded
    assert isinstance(checkpoint.process(), FlowMatching) and checkpoint.process().direction == "data-to-noise"
    info = json.loads(ok("convert", "--info", tmp_path / "m.safetensors", "--json").stdout)
    assert info["objective"] == {"objective": "flow", "time_direction": "data-to-noise"}
    refused = dit("convert", tmp_path / "m.safetensors", tmp_path / "pipe", "--to", "diffusers")
    assert refused.exit_code == 2 and "flow-matching" in refused.output and not (tmp_path / "pipe").exists()


def test_a_guidance_interval_in_training_timesteps_is_refused_for_a_flow_model(tmp_path, npz_data):
    run(tmp_path / "run", npz_data, steps=1)
    result = dit("sample", "--ckpt", tmp_path / "run" / "ckpt-0000001.pt", "--guidance-interval", "0,700",
                 "--out", tmp_path / "out")
    assert result.exit_code == 2 and "flow time [0, 1]" in result.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_gloo_processes_train_the_same_flow_model_as_one(tmp_path, npz_data):
    common = [*TRAIN, "--data", str(npz_data), "--steps", "4", "--ckpt-every", "2", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ditcli", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "ditcli", *common, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = (safe_torch_load(tmp_path / name / "ckpt-0000004.pt") for name in ("one", "two"))
    assert two["config"]["train"]["objective"] == "flow"
    for name, tensor in one["ema"].items():
        torch.testing.assert_close(two["ema"][name], tensor, rtol=0, atol=1e-5, msg=name)


# Bad input: one line, exit 2, nothing written.

@pytest.mark.parametrize("args, message", [
    (["--objective", "score"], "unknown --objective 'score'"),
    (["--objective", "flow", "--time-shift", "0"], "--time-shift must be a finite number in [0.001, 1000]"),
    (["--objective", "flow", "--time-shift", "-2"], "--time-shift must be a finite number in [0.001, 1000]"),
    (["--objective", "flow", "--time-shift", "1e300"], "--time-shift must be a finite number in [0.001, 1000]"),
    (["--objective", "flow", "--time-sampling", "beta"], "unknown --time-sampling 'beta'"),
    (["--objective", "flow", "--time-direction", "sideways"], "unknown --time-direction 'sideways'"),
    (["--objective", "ddpm", "--time-shift", "3"], "--time-shift only applies to --objective flow"),
    (["--objective", "flow", "--schedule", "cosine"], "--schedule (the beta schedule) only applies"),
])
def test_bad_training_objectives_are_one_line(tmp_path, npz_data, args, message):
    result = dit(*[a for a in TRAIN if a not in ("--objective", "flow")], "--data", npz_data, "--out",
                 tmp_path / "run", "--steps", 1, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, npz_data):
    root = tmp_path_factory.mktemp("models")
    for objective in ("flow", "ddpm"):
        Trainer(TrainConfig(data=str(npz_data), out=str(root / objective), steps=1,
                            **{**TINY, "objective": objective})).run()
    return {k: root / k / "ckpt-0000001.pt" for k in ("flow", "ddpm")}


@pytest.mark.parametrize("model, args, message", [
    ("ddpm", ["--sampler", "dopri5"], "sampler 'dopri5' samples flow-matching models, and this is a DDPM model"),
    ("ddpm", ["--sampler", "sde"], "sampler 'sde' samples flow-matching models"),
    ("flow", ["--sampler", "ddim"], "sampler 'ddim' samples DDPM models, and this is a flow-matching model"),
    ("flow", ["--sampler", "dpm++2m"], "sampler 'dpm++2m' samples DDPM models"),
    ("flow", ["--sampler", "rk4"], "sampler 'rk4' is unknown"),
    ("ddpm", ["--time-shift", "2"], "--time-shift only applies to flow-matching and mean-flow models"),
    ("flow", ["--time-shift", "0"], "time shift must be a finite number in [0.001, 1000]"),
    ("flow", ["--time-shift", "1e-300"], "time shift must be a finite number in [0.001, 1000]"),
    ("flow", ["--sampler", "dopri5", "--rtol", "-1"], "atol and rtol must be finite numbers in [1e-10, 1]"),
    ("flow", ["--sampler", "dopri5", "--atol", "1e-300", "--rtol", "1e-300"], "atol and rtol must be finite numbers"),
    ("flow", ["--objective", "ddpm"], "records the objective flow, time noise-to-data, not ddpm"),
    ("flow", ["--time-direction", "data-to-noise"], "not flow, time data-to-noise"),
    ("ddpm", ["--objective", "flux"], "unknown objective 'flux'"),
])
def test_bad_sampling_choices_are_one_line(two_models, tmp_path, model, args, message):
    result = dit("sample", "--ckpt", two_models[model], "--class", "a", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
