"""The mean-flow sampler against the original samplers: MeanFlow's Alg. 2 in the PyTorch port
(`meanflow_sampler`) and Decoupled MeanFlow's `euler_sampler` (tests/golden-meanflow/README.md, Sections 6.4, 8.5).

Each final sample and each stored evaluation (input, (t, r), labels, output) is compared to 1e-5 of its scale. The
README's effect table and the checks below show that (t, r) swapped in the call, the step's sign flipped, the shift
ignored or the guidance interval dropped move the result by far more.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_meanflow_golden import GOLDEN, close, dmf_model, meanflow_model

from ditcli.diffusion import flow_map
from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.flow_map import sample_flow_map
from ditcli.diffusion.guidance import (
    CountingModelFn,
    Guidance,
    guided_model_fn,
    unconditional_model_fn,
)
from ditcli.sampling.forward import CastWeights

FLOW = FlowMatching("data-to-noise", learn_sigma=False)  # both codes: t = 0 data, t = 1 noise


@pytest.fixture(scope="module")
def mf():
    return load_file(GOLDEN / "meanflow.vectors.safetensors")


@pytest.fixture(scope="module")
def dmf():
    return load_file(GOLDEN / "dmf.vectors.safetensors")


class Recording(torch.nn.Module):
    """The model, keeping every evaluation's (x, t, r, y, out)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, []

    def forward(self, x, t, y, r=None):
        out = self.model(x, t, y, r=r)
        self.calls.append({"x": x, "t": t, "r": r, "y": y, "out": out})
        return out


def never(like):
    raise AssertionError("the mean-flow sampler drew noise")


UNGUIDED = Guidance(1.0, channels="all")


def run(model, vectors, guidance=UNGUIDED, model_fn=None, **settings):
    """sample_flow_map on the stored noise and labels, guided as the original sampler: (final, recorded calls)."""
    recording = Recording(model)
    fn = guided_model_fn(recording, vectors["sample.y"], FLOW, guidance, model.config.num_classes)
    final = sample_flow_map(model_fn(fn) if model_fn else fn, vectors["sample.z"], FLOW, never, **settings)
    return final, recording.calls


MF_RUNS = [(f"{steps}step.{cfg}", steps, scale)
           for steps in (1, 2, 4) for cfg, scale in (("nocfg", 1.0), ("cfg2", 2.0))]


@pytest.mark.parametrize("name, steps, scale", MF_RUNS)
def test_meanflow_sampler_matches_the_port(mf, name, steps, scale):
    """The port's runtime CFG guides every step and every channel: u = u_uncond + s (u_cond - u_uncond)."""
    final, calls = run(meanflow_model(mf), mf, Guidance(scale, channels="all"), steps=steps)
    ref = f"sample.{name}.calls"
    assert len(calls) == steps == len(mf[f"{ref}.t"])
    for i, call in enumerate(calls):  # full batch, the null-label half included
        assert torch.equal(call["t"], mf[f"{ref}.t"][i]) and torch.equal(call["r"], mf[f"{ref}.r"][i]), i
        assert torch.equal(call["y"], mf[f"{ref}.y"][i]), i
        assert close(call["x"], mf[f"{ref}.x"][i]) and close(call["out"], mf[f"{ref}.out"][i]), i
    assert close(final, mf[f"sample.{name}.final"])


DMF_RUNS = {
    "euler.1step": {"steps": 1},
    "euler.2step": {"steps": 2},
    "euler.4step": {"steps": 4},
    "euler.4step.cfg2": {"steps": 4, "guidance": Guidance(2.0, channels="all", interval=(0.0, 0.7))},
    "euler.2step.shift1.5": {"steps": 2, "shift": 1.5},
}


@pytest.mark.parametrize("name", DMF_RUNS)
def test_dmf_euler_sampler_matches_the_original(dmf, name):
    """DMF guides only the steps whose start time lies in [g_min, g_max]; its float64 state differs by ~3e-7."""
    final, calls = run(dmf_model(dmf), dmf, **DMF_RUNS[name])
    ref, b = f"sample.{name}.calls", dmf["sample.y"].shape[0]
    assert len(calls) == len(dmf[f"{ref}.t"])
    for i, call in enumerate(calls):
        guided = call["x"].shape[0] == 2 * b
        assert guided == bool(dmf[f"{ref}.guided"][i]), i
        assert torch.equal(call["t"][:b], dmf[f"{ref}.t"][i]) and torch.equal(call["r"][:b], dmf[f"{ref}.r"][i]), i
        assert close(call["x"][:b], dmf[f"{ref}.x"][i]) and close(call["out"][:b], dmf[f"{ref}.out_cond"][i]), i
        if guided:
            assert close(call["out"][b:], dmf[f"{ref}.out_uncond"][i]), i
    assert close(final, dmf[f"sample.{name}.final"])


def swapped(model_fn):
    """The model called with t and r exchanged."""
    return lambda x, t, r: model_fn(x, r, r=t)


def test_meanflow_sampler_fails_with_t_and_r_swapped_or_the_step_flipped(mf, monkeypatch):
    model, ref = meanflow_model(mf), mf["sample.2step.nocfg.final"]
    assert close(run(model, mf, steps=2)[0], ref)
    assert not close(run(model, mf, model_fn=swapped, steps=2)[0], ref)
    monkeypatch.setattr(flow_map, "flow_map_step", lambda x, u, t, r: x + (t - r) * u)
    assert not close(run(model, mf, steps=2)[0], ref)


def test_dmf_sampler_fails_with_t_and_r_swapped_the_shift_ignored_or_no_interval(dmf, monkeypatch):
    model = dmf_model(dmf)
    assert not close(run(model, dmf, model_fn=swapped, steps=4)[0], dmf["sample.euler.4step.final"])
    assert not close(run(model, dmf, steps=2)[0], dmf["sample.euler.2step.shift1.5.final"])  # shift 1 for 1.5
    everywhere = Guidance(2.0, channels="all")
    assert not close(run(model, dmf, everywhere, steps=4)[0], dmf["sample.euler.4step.cfg2.final"])
    monkeypatch.setattr(flow_map, "flow_map_step", lambda x, u, t, r: x + (t - r) * u)
    assert not close(run(model, dmf, steps=1)[0], dmf["sample.euler.1step.final"])


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_one_step_is_one_model_evaluation_and_draws_no_noise(mf, scale):
    """steps is the true NFE: one forward per step (the doubled CFG batch counts once), and no noise is drawn."""
    recording = Recording(meanflow_model(mf))
    counted = CountingModelFn(guided_model_fn(recording, mf["sample.y"], FLOW, Guidance(scale, channels="all"), 10))
    final = sample_flow_map(counted, mf["sample.z"], FLOW, never, steps=1)
    assert counted.calls == 1 and len(recording.calls) == 1
    assert recording.calls[0]["x"].shape[0] == (1 if scale == 1.0 else 2) * mf["sample.z"].shape[0]
    assert close(final, mf[f"sample.1step.{'nocfg' if scale == 1.0 else 'cfg2'}.final"])


def test_the_other_adapters_pass_r_on(mf):
    """The unconditional adapter and the cast-weights forward hand a mean-flow model its second time."""
    model, x = meanflow_model(mf), mf["forward.x"]
    t, r = mf["forward.pairs.t"], mf["forward.pairs.r"]
    null = torch.full_like(mf["forward.y"], model.config.num_classes)
    with torch.no_grad():
        expected = model(x, t, null, r=r)
        assert torch.equal(unconditional_model_fn(model, FLOW)(x, t, r=r), expected)
        assert torch.equal(CastWeights(model, torch.float32)(x, t, null, r=r), expected)
        assert not torch.equal(CastWeights(model, torch.float32)(x, t, null), expected)  # r = t without it
