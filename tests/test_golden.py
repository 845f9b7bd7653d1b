"""Our model, diffusion and samplers against outputs of the original DiT code (tests/golden)."""

import numpy as np
import pytest
import torch
from conftest import assert_close_to_ref

from ditcli.diffusion.ddpm import Diffusion, space_timesteps
from ditcli.diffusion.guidance import Guidance, guided_model_fn
from ditcli.diffusion.samplers import sample_ddim, sample_ddpm
from ditcli.model.dit import sincos_2d


def test_forward_matches_reference(golden, golden_model):
    _, v = golden
    out = golden_model(v["forward.x"], v["forward.t"], v["forward.y"])
    assert_close_to_ref(out, v["forward.out"])


def test_pos_embed_matches_reference_table(golden_model):
    config = golden_model.config
    ours = sincos_2d(config.hidden_size, config.input_size // config.patch_size)
    assert_close_to_ref(ours, golden_model.pos_embed[0], rel=1e-6)


def test_cfg_paper_channels_matches_reference(golden, golden_model):
    _, v = golden
    n = v["cfg.x"].shape[0] // 2
    diffusion = Diffusion.create("")
    model_fn = guided_model_fn(golden_model, v["cfg.y"][:n], diffusion, Guidance(4.0, "paper"), null_class=10)
    out = model_fn(v["cfg.x"][:n], v["cfg.t"][:n])
    assert_close_to_ref(out, v["cfg.scale4.out"][:n])


def test_cfg_all_channels_differs_only_in_fourth_eps_channel(golden, golden_model):
    _, v = golden
    n = v["cfg.x"].shape[0] // 2
    diffusion = Diffusion.create("")
    x, t, y = v["cfg.x"][:n], v["cfg.t"][:n], v["cfg.y"][:n]
    paper = guided_model_fn(golden_model, y, diffusion, Guidance(4.0, "paper"), 10)(x, t)
    every = guided_model_fn(golden_model, y, diffusion, Guidance(4.0, "all"), 10)(x, t)
    assert torch.equal(paper[:, :3], every[:, :3])
    assert torch.equal(paper[:, 4:], every[:, 4:])
    assert not torch.allclose(paper[:, 3], every[:, 3])


@pytest.mark.parametrize("spec", ["250", "25", "ddim50", "ddim25", "10,10,5"])
def test_respacing_matches_reference(golden, spec):
    meta, v = golden
    assert space_timesteps(1000, spec) == meta["respacing"][spec]
    diffusion = Diffusion.create(spec)
    np.testing.assert_allclose(diffusion.betas, v[f"respace.{spec}.betas"].double().numpy(), rtol=1e-12, atol=0)


def test_loss_terms_match_reference(golden, golden_model):
    _, v = golden
    diffusion = Diffusion.create("")
    t = v["loss.t"]
    x_t = diffusion.q_sample(v["loss.x_start"], t, v["loss.noise"])
    out = golden_model(x_t, t, v["loss.y"])
    terms = diffusion.training_losses(out, v["loss.x_start"], x_t, t, v["loss.noise"])
    for key in ("loss", "mse", "vb"):
        assert_close_to_ref(terms[key], v[f"loss.{key}"])


def test_p_mean_variance_matches_reference(golden, golden_model):
    _, v = golden
    diffusion = Diffusion.create("250")
    index = v["pmv250.index"]
    x = v["pmv250.x"]
    out = diffusion.p_mean_variance(golden_model(x, diffusion.model_timesteps(index), v["pmv250.y"]), x, index)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert_close_to_ref(out[key], v[f"pmv250.{key}"])


class ReplayNoise:
    """Replays the reference loop's noise, cond half only."""

    def __init__(self, noise: torch.Tensor, n: int):
        self.noise, self.n, self.step = noise, n, 0

    def __call__(self, like):
        draw = self.noise[self.step, : self.n]
        self.step += 1
        return draw


@pytest.mark.parametrize("name, spec, sampler", [("ddpm", "25", sample_ddpm), ("ddim", "ddim25", sample_ddim)])
def test_whole_sampling_loop_matches_reference(golden, golden_model, name, spec, sampler):
    _, v = golden
    prefix = f"sample.{name}.{spec}"
    labels = v[f"{prefix}.labels"]
    n = labels.shape[0]
    diffusion = Diffusion.create(spec)
    model_fn = guided_model_fn(golden_model, labels, diffusion, Guidance(4.0, "paper"), null_class=10)
    out = sampler(model_fn, v[f"{prefix}.z"][:n], diffusion, ReplayNoise(v[f"{prefix}.noise"], n))
    assert_close_to_ref(out, v[f"{prefix}.out"][:n])
