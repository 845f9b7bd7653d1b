"""Flow matching against the original SiT and REPA code (tests/golden-flow/, see its README).

Each check matches to 1e-5 of the reference's scale (dopri5: 1e-4), and each convention it pins is also flipped
once to show that the tolerance tells the two apart: the time direction, the target's sign, the channels guidance
touches, the SDE's last step and REPA's per-step guidance decision.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.flow_samplers import (
    sample_flow_dopri5,
    sample_flow_euler,
    sample_flow_heun,
    sample_flow_sde,
)
from ditcli.diffusion.guidance import CountingModelFn, Guidance, guided_model_fn
from ditcli.model.dit import DiT
from ditcli.weights.checkpoint import infer_config

GOLDEN = Path(__file__).parent / "golden-flow"
SIT_FLOW = FlowMatching("noise-to-data", learn_sigma=True)
REPA_FLOW = FlowMatching("data-to-noise", learn_sigma=False)
SIT_ODE_STEPS = 9  # SiT's num_steps=10 are grid points: 9 steps
NULL = 10


def tolerance(reference: torch.Tensor, share: float = 1e-5) -> float:
    return share * float(reference.abs().max())


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max())


@pytest.fixture(scope="module")
def sit():
    return load_file(GOLDEN / "sit.vectors.safetensors")


@pytest.fixture(scope="module")
def repa():
    return load_file(GOLDEN / "repa.vectors.safetensors")


def build(name: str, drop_prefix: str | None = None) -> DiT:
    state = torch.load(GOLDEN / f"{name}-tiny.pt", weights_only=True)
    if drop_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefix)}
    model = DiT(infer_config(state, num_heads=2))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def sit_model():
    return build("sit")


@pytest.fixture(scope="module")
def repa_model():
    return build("repa", drop_prefix="projectors.")


class ForcedNoise:
    """noise_fn that hands out the recorded draws in order (their first rows, where SiT doubled the batch)."""

    def __init__(self, draws: torch.Tensor):
        self.draws, self.used = draws, 0

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        draw = self.draws[self.used][: like.shape[0]]
        self.used += 1
        return draw.to(like.dtype)


def model_fn(model, labels, flow, guidance: Guidance | None = None) -> CountingModelFn:
    return CountingModelFn(guided_model_fn(model, labels, flow, guidance or Guidance(1.0), NULL))


# The forward pass: the DiT backbone is SiT's and REPA's, with t unscaled.

def test_sit_forward_matches_with_flow_time(sit, sit_model):
    out = sit_model(sit["forward.x"], sit["forward.t"], sit["forward.y"])
    assert max_error(out, sit["forward.out_full"]) <= tolerance(sit["forward.out_full"])
    assert max_error(SIT_FLOW.split_output(out)[0], sit["forward.out"]) <= tolerance(sit["forward.out"])


def test_sit_forward_fails_with_scaled_or_reversed_time(sit, sit_model):
    for t in (1 - sit["forward.t"], 1000 * sit["forward.t"]):
        out = SIT_FLOW.split_output(sit_model(sit["forward.x"], t, sit["forward.y"]))[0]
        assert max_error(out, sit["forward.out"]) > 10 * tolerance(sit["forward.out"])


def test_repa_forward_matches_without_the_projectors(repa, repa_model):
    out = repa_model(repa["forward.x"], repa["forward.t"], repa["forward.y"])
    assert out.shape[1] == 4  # no sigma channels
    assert max_error(out, repa["forward.out"]) <= tolerance(repa["forward.out"])


@pytest.mark.parametrize("channels, matches", [("paper", True), ("all", False)])
def test_sit_guidance_touches_the_first_three_channels(sit, sit_model, channels, matches):
    batch = sit["forward.x"].shape[0]
    fn = model_fn(sit_model, sit["forward_cfg.y"][:batch], SIT_FLOW, Guidance(4.0, channels))
    out = SIT_FLOW.split_output(fn(sit["forward_cfg.x"][:batch], sit["forward_cfg.t"][:batch]))[0]
    reference = sit["forward_cfg.out"][:batch]
    assert (max_error(out, reference) <= tolerance(reference)) is matches


# Training losses from the recorded draws.

@pytest.mark.parametrize("direction, matches", [("noise-to-data", True), ("data-to-noise", False)])
def test_sit_training_loss(sit, sit_model, direction, matches):
    flow = FlowMatching(direction, learn_sigma=True)
    x1, x0, t = sit["train.x1"], sit["train.x0"], sit["train.t_rand"]
    x_t = flow.q_sample(x1, t, x0)
    loss = flow.training_losses(sit_model(x_t, t, sit["train.y"]), x1, x_t, t, x0)["loss"]
    assert (max_error(loss, sit["train.loss"]) <= tolerance(sit["train.loss"])) is matches
    if matches:
        assert max_error(x_t, sit["train.xt"]) <= tolerance(sit["train.xt"])
        assert max_error(flow.velocity(x1, x0), sit["train.ut"]) <= tolerance(sit["train.ut"])


def test_sit_training_loss_fails_with_the_target_negated(sit, sit_model):
    x1, x0, t = sit["train.x1"], sit["train.x0"], sit["train.t_rand"]
    x_t = SIT_FLOW.q_sample(x1, t, x0)
    velocity = SIT_FLOW.split_output(sit_model(x_t, t, sit["train.y"]))[0]
    negated = ((velocity + SIT_FLOW.velocity(x1, x0)) ** 2).mean(dim=(1, 2, 3))
    assert max_error(negated, sit["train.loss"]) > 10 * tolerance(sit["train.loss"])


@pytest.mark.parametrize("direction, matches", [("data-to-noise", True), ("noise-to-data", False)])
def test_repa_training_loss(repa, repa_model, direction, matches):
    flow = FlowMatching(direction)
    images, noise, t = repa["loss.images"], repa["loss.noises"], repa["loss.time"].flatten()
    x_t = flow.q_sample(images, t, noise)
    loss = flow.training_losses(repa_model(x_t, t, repa["loss.y"]), images, x_t, t, noise)["loss"]
    assert (max_error(loss, repa["loss.denoising_loss"]) <= tolerance(repa["loss.denoising_loss"])) is matches
    if matches:
        assert max_error(x_t, repa["loss.model_input"]) <= tolerance(repa["loss.model_input"])


# SiT's ODE and SDE samplers (Sampler.sample_ode / sample_sde).

SIT_ODE = {"euler": (sample_flow_euler, {"steps": SIT_ODE_STEPS}, 1e-5),
           "heun2": (sample_flow_heun, {"steps": SIT_ODE_STEPS}, 1e-5),
           "dopri5": (sample_flow_dopri5, {"atol": 1e-6, "rtol": 1e-3}, 1e-4)}


@pytest.mark.parametrize("guided", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("method", list(SIT_ODE))
def test_sit_ode(sit, sit_model, method, guided):
    sampler, settings, share = SIT_ODE[method]
    run = f"ode.{method}.{'cfg' if guided else 'nocfg'}"
    fn = model_fn(sit_model, sit["sample.y"], SIT_FLOW, Guidance(4.0, "paper") if guided else None)
    out = sampler(fn, sit["sample.z"], SIT_FLOW, None, **settings)
    assert max_error(out, sit[f"{run}.final"]) <= tolerance(sit[f"{run}.final"], share)
    assert fn.calls == int(sit[f"{run}.nfe"])


def test_sit_ode_fails_in_the_other_time_direction(sit, sit_model):
    flipped = FlowMatching("data-to-noise", learn_sigma=True)
    out = sample_flow_euler(model_fn(sit_model, sit["sample.y"], flipped), sit["sample.z"], flipped, steps=9)
    assert max_error(out, sit["ode.euler.nocfg.final"]) > 10 * tolerance(sit["ode.euler.nocfg.final"])


def sit_sde(sit, sit_model, guided: bool, last_step: float = 0.04, **settings) -> tuple[torch.Tensor, int]:
    run = f"sde.euler.{'cfg' if guided else 'nocfg'}"
    fn = model_fn(sit_model, sit["sample.y"], SIT_FLOW, Guidance(4.0, "paper") if guided else None)
    noise = ForcedNoise(sit[f"{run}.noise"])
    out = sample_flow_sde(fn, sit["sample.z"], SIT_FLOW, noise, steps=20, last_step=last_step, **settings)
    assert noise.used == len(sit[f"{run}.noise"])
    return out, fn.calls


@pytest.mark.parametrize("guided", [False, True], ids=["nocfg", "cfg"])
def test_sit_sde(sit, sit_model, guided):
    out, calls = sit_sde(sit, sit_model, guided)
    reference = sit[f"sde.euler.{'cfg' if guided else 'nocfg'}.final"]
    assert max_error(out, reference) <= tolerance(reference)
    # SiT evaluates the same input twice per step (velocity, then score); one evaluation gives the same numbers.
    assert calls * 2 == int(sit[f"sde.euler.{'cfg' if guided else 'nocfg'}.nfe"])


def test_sit_sde_fails_with_another_last_step(sit, sit_model):
    out, _ = sit_sde(sit, sit_model, False, last_step=0.02)
    assert max_error(out, sit["sde.euler.nocfg.final"]) > 10 * tolerance(sit["sde.euler.nocfg.final"])


def test_sit_sde_fails_when_the_last_step_adds_noise(sit, sit_model):
    draws = torch.cat([sit["sde.euler.nocfg.noise"], sit["sde.euler.nocfg.noise"][-1:]])
    fn = model_fn(sit_model, sit["sample.y"], SIT_FLOW)
    grid = SIT_FLOW.time_grid(20, last_step=0.04)
    x, noise = sit["sample.z"], ForcedNoise(draws)
    for t_cur, t_next in zip(grid[:-1], grid[1:]):  # every step stochastic, the last one included
        dt, w = t_next - t_cur, float(SIT_FLOW.noise_level(t_cur))
        v = SIT_FLOW.split_output(fn(x, torch.full((4,), t_cur)))[0]
        x = x + dt * v + w * abs(dt) * SIT_FLOW.score(x, t_cur, v) + (2 * w * abs(dt)) ** 0.5 * noise(x)
    assert max_error(x, sit["sde.euler.nocfg.final"]) > 10 * tolerance(sit["sde.euler.nocfg.final"])


# REPA's samplers (samplers.euler_sampler, euler_maruyama_sampler): all channels guided, interval [0, 0.7].

def repa_run(repa, repa_model, sampler, guided: bool, **settings) -> tuple[torch.Tensor, int]:
    guidance = Guidance(1.8, "all", (0.0, 0.7)) if guided else None
    fn = model_fn(repa_model, repa["sample.y"], REPA_FLOW, guidance)
    return sampler(fn, repa["sample.z"], REPA_FLOW, **settings), fn.calls


@pytest.mark.parametrize("guided", [False, True], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("method", ["euler", "heun"])
def test_repa_ode(repa, repa_model, method, guided):
    sampler = sample_flow_euler if method == "euler" else sample_flow_heun
    settings = {"steps": 10} if method == "euler" else {"steps": 10, "final_correction": False}
    out, calls = repa_run(repa, repa_model, sampler, guided, **settings)
    run = f"{method}.{'cfg' if guided else 'nocfg'}"
    assert max_error(out, repa[f"{run}.final"]) <= tolerance(repa[f"{run}.final"])
    assert calls == int(repa[f"{run}.nfe"])


@pytest.mark.parametrize("guided", [False, True], ids=["nocfg", "cfg"])
def test_repa_sde(repa, repa_model, guided):
    run = f"em.{'cfg' if guided else 'nocfg'}"
    out, calls = repa_run(repa, repa_model, sample_flow_sde, guided, noise_fn=ForcedNoise(repa[f"{run}.noise"]),
                          steps=20, last_step=0.04)
    assert max_error(out, repa[f"{run}.final"]) <= tolerance(repa[f"{run}.final"])
    assert calls == int(repa[f"{run}.nfe"])


def test_repa_guidance_fails_on_the_first_three_channels_only(repa, repa_model):
    fn = model_fn(repa_model, repa["sample.y"], REPA_FLOW, Guidance(1.8, "paper", (0.0, 0.7)))
    out = sample_flow_euler(fn, repa["sample.z"], REPA_FLOW, steps=10)
    assert max_error(out, repa["euler.cfg.final"]) > 10 * tolerance(repa["euler.cfg.final"])


def test_repa_heun_fails_when_its_corrector_decides_guidance_at_its_own_time(repa, repa_model):
    """REPA decides guidance once per step, from the step's start; the corrector at t = 0.7 of the step from 0.8
    stays unguided."""
    inner = guided_model_fn(repa_model, repa["sample.y"], REPA_FLOW, Guidance(1.8, "all", (0.0, 0.7)), NULL)
    out = sample_flow_heun(lambda x, t, *step: inner(x, t), repa["sample.z"], REPA_FLOW, steps=10,
                           final_correction=False)
    assert max_error(out, repa["heun.cfg.final"]) > tolerance(repa["heun.cfg.final"])  # 6e-5 against 3e-5


def test_the_copied_vectors_are_the_shared_ones():
    """The README's table of digests describes the copies in this repository."""
    import hashlib

    text = (GOLDEN / "README.md").read_text()
    for name in ("sit.vectors.safetensors", "repa.vectors.safetensors", "sit-tiny.pt", "repa-tiny.pt"):
        digest = hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest()
        assert digest in text, name
    assert json.loads((GOLDEN / "sit.json").read_text())["family"] == "SiT"
