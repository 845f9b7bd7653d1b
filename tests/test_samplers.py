"""Samplers against an oracle whose answer is known, per-image determinism, NFE counts and bad input."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import perturbed, tiny_config

from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.guidance import (
    CountingModelFn,
    Guidance,
    ImageNoise,
    guided_model_fn,
    unconditional_model_fn,
)
from ditcli.diffusion.samplers import SAMPLERS, plan_sampler
from ditcli.model.codec import PixelCodec
from ditcli.model.dit import DiT
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.forward import batch_width
from ditcli.sampling.generate import generate_images, sample_latents

# Data x_0 ~ N(MU, SIGMA^2). Then x_t ~ N(sqrt(ab) MU, ab SIGMA^2 + 1 - ab), and the optimal eps predictor is
# E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab SIGMA^2 + 1 - ab).
MU, SIGMA = 0.5, 0.5
TRAIN = Diffusion.create("")
TRAIN_SIGMAS = np.sqrt((1 - TRAIN.alphas_cumprod) / TRAIN.alphas_cumprod)


def oracle(diffusion: Diffusion):
    """The exact model_fn for Gaussian data: optimal eps, and as learned variance the exact reverse variance

    beta_tilde + coef1^2 Var[x_0 | x_t], encoded in the learned-range form, so ancestral sampling is exact too.
    Solvers pass training timesteps as floats; their alpha-bar comes from the scheduler's sigma interpolation.
    """
    table = {k: torch.from_numpy(v) for k, v in dict(
        ab=diffusion.alphas_cumprod, ab_prev=diffusion.alphas_cumprod_prev, beta=diffusion.betas,
        beta_tilde=diffusion.posterior_variance, log_min=diffusion.posterior_log_variance_clipped).items()}

    def model_fn(x, index):
        if index.is_floating_point():
            sigma = torch.from_numpy(np.interp(index.numpy(), np.arange(len(TRAIN_SIGMAS)), TRAIN_SIGMAS))
            ab = (1 / (1 + sigma ** 2)).view(-1, 1, 1, 1)
        else:
            ab = table["ab"][index].view(-1, 1, 1, 1)
        var_t = ab * SIGMA ** 2 + 1 - ab
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / var_t
        if index.is_floating_point():
            return torch.cat([eps, torch.zeros_like(eps)], dim=1).float()
        t = {k: v[index].view(-1, 1, 1, 1) for k, v in table.items()}
        coef1 = t["ab_prev"].sqrt() * t["beta"] / (1 - t["ab"])
        exact = t["beta_tilde"] + coef1 ** 2 * SIGMA ** 2 * (1 - ab) / var_t
        v = 2 * (exact.log() - t["log_min"]) / (t["beta"].log() - t["log_min"]) - 1
        return torch.cat([eps, v.expand_as(eps)], dim=1).float()

    return model_fn


# First-order ODE solvers (DDIM with eta 0, Euler) shrink the spread by O(1/steps) (about 1.2% at 200 steps);
# the others are within sampling error at 50 steps.
ORACLE_STEPS = {"ddpm": 50, "ddim": 200, "dpm++2m": 50, "unipc": 50, "euler": 200, "heun": 50}


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_reproduces_gaussian_data_with_the_oracle(name):
    """Tolerance: mean within 0.03 and std within 3% of (MU, SIGMA) from 4096 samples (standard errors 0.008, 1.1%)."""
    plan = plan_sampler(name, ORACLE_STEPS[name], learn_sigma=True)
    generator = torch.Generator().manual_seed(0)
    noise = lambda like: torch.randn(like.shape, generator=generator)
    x = noise(torch.empty(4096, 1, 1, 1))
    out = plan.sample(oracle(plan.process), x, plan.process, noise)
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() / SIGMA - 1) < 0.03


def test_oracle_check_fails_for_a_wrong_model():
    """The tolerance above is tight enough to catch a model that is slightly off (eps scaled by 0.9)."""
    plan = plan_sampler("dpm++2m", 50, learn_sigma=True)
    exact = oracle(plan.process)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4096, 1, 1, 1), generator=generator)
    out = plan.sample(lambda x, i: exact(x, i) * 0.9, x, plan.process, None)
    assert abs(out.std().item() / SIGMA - 1) > 0.03


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return perturbed(DiT(tiny_config()), std=0.02)


@pytest.mark.parametrize("name", SAMPLERS)
def test_image_is_identical_in_a_batch_of_one_and_of_four(tiny_model, name):
    """Same seed and index, same image, bit for bit: alone (batch 1) or with three others, in any position."""
    config = GenerateConfig((3, 1, 4, 1, 5, 9), seed=7, sampler=name, steps=4, eta=1.0, guidance=Guidance(2.5))
    plan = plan_sampler(name, 4, learn_sigma=True, eta=1.0)

    def run(indices, batch_size):
        sized = replace(config, batch_size=batch_size)
        return sample_latents(tiny_model, plan, sized, indices, batch_width(sized), torch.device("cpu"))[0]

    together = run([0, 1, 2, 3], batch_size=4)
    for i in range(4):
        assert torch.equal(run([i], batch_size=1)[0], together[i]), f"image {i} changed with the batch size"
    assert torch.equal(run([5, 2], batch_size=1)[1], together[2])


def test_generated_images_do_not_depend_on_batch_size(tiny_model):
    config = GenerateConfig((3, 1, 4, 1, 5, 9), seed=7, sampler="ddpm", steps=4, guidance=Guidance(2.0))
    codec = PixelCodec(4)

    def images(batch_size, indices=range(6)):
        sized = replace(config, batch_size=batch_size)
        batches = generate_images(tiny_model, codec, sized, list(indices), torch.device("cpu"))
        return torch.cat([batch.images for batch in batches])

    one = images(1)
    assert one.shape == (6, 8, 8, 4) and one.dtype == torch.uint8
    assert torch.equal(images(4), one)
    assert torch.equal(images(5, [5, 3, 0]), one[[5, 3, 0]])


def test_ddpm_images_differ_between_seeds_and_indices(tiny_model):
    plan = plan_sampler("ddpm", 4, learn_sigma=True)
    model_fn = unconditional_model_fn(tiny_model, plan.process)
    outs = {}
    for seed, indices in ((0, [0, 1]), (1, [0, 1])):
        noise = ImageNoise(seed, indices)
        outs[seed] = plan.sample(model_fn, noise(torch.empty(2, 4, 8, 8)), plan.process, noise)
    assert not torch.equal(outs[0][0], outs[0][1])
    assert not torch.equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("name", SAMPLERS)
def test_nfe_counts_one_per_doubled_cfg_batch(tiny_model, name):
    plan = plan_sampler(name, 5, learn_sigma=True)
    batches = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        model_fn = CountingModelFn(guided_model_fn(tiny_model, torch.tensor([1, 2]), plan.process, Guidance(4.0),
                                                   null_class=10))
        noise = ImageNoise(0, [0, 1])
        plan.sample(model_fn, noise(torch.empty(2, 4, 8, 8)), plan.process, noise)
    finally:
        handle.remove()
    assert model_fn.calls == plan.nfe == len(batches)
    assert plan.nfe == (2 * 5 - 1 if name == "heun" else 5)
    assert set(batches) == {4}  # cond and uncond halves in one forward


def test_cfg_scale_one_runs_no_unconditional_pass(tiny_model):
    seen = []
    handle = tiny_model.register_forward_pre_hook(lambda module, args: seen.append(args[2].tolist()))
    try:
        diffusion = Diffusion.create("10")
        model_fn = guided_model_fn(tiny_model, torch.tensor([1, 2]), diffusion, Guidance(1.0), null_class=10)
        model_fn(torch.zeros(2, 4, 8, 8), torch.tensor([3, 3]))
    finally:
        handle.remove()
    assert seen == [[1, 2]]


def test_guidance_interval_switches_guidance_off_outside(tiny_model):
    diffusion = Diffusion.create("")
    labels, x = torch.tensor([1, 2]), torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = guided_model_fn(tiny_model, labels, diffusion, Guidance(1.0), 10)
    windowed = guided_model_fn(tiny_model, labels, diffusion, Guidance(4.0, interval=(100, 500)), 10)
    outside, inside = torch.tensor([800, 800]), torch.tensor([300, 300])
    assert torch.equal(windowed(x, outside), plain(x, outside))
    assert not torch.allclose(windowed(x, inside), plain(x, inside))


def test_solver_plan_is_reusable_across_batches(tiny_model):
    """A diffusers scheduler keeps multistep state; the second batch must start afresh, not crash or drift."""
    plan = plan_sampler("dpm++2m", 5, learn_sigma=True)
    model_fn = guided_model_fn(tiny_model, torch.tensor([1]), plan.process, Guidance(1.0), 10)
    runs = [plan.sample(model_fn, ImageNoise(0, [0])(torch.empty(1, 4, 8, 8)), plan.process, None) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_unknown_respacing_spec_is_one_line_listing_the_forms():
    with pytest.raises(ValueError, match=r"unknown respacing spec 'fast'.*'250', 'ddim50'.*'10,10,5'") as err:
        Diffusion.create("fast")
    assert "\n" not in str(err.value)


def test_impossible_ddim_stride_is_one_line():
    with pytest.raises(ValueError, match=r"ddim300.*no integer stride") as err:
        plan_sampler("ddim", 300, learn_sigma=True, respacing="ddim300")
    assert "\n" not in str(err.value)


def test_ddim_without_an_exact_stride_falls_back_to_even_spacing():
    assert plan_sampler("ddim", 300, learn_sigma=True).process.num_steps == 300


def test_unknown_sampler_lists_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'plms'.*ddpm, ddim, dpm\\+\\+2m, unipc, euler, heun") as err:
        plan_sampler("plms", 10, learn_sigma=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=-1.0), "cfg scale must be >= 0"),
    (dict(channels="some"), "unknown guided channels 'some'.*paper, all"),
    (dict(interval=(500, 100)), "guidance interval"),
])
def test_bad_guidance_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Guidance(**kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_single_step_runs(sampler):
    plan = plan_sampler(sampler, 1, learn_sigma=True)
    model_fn = lambda x, index: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)  # noqa: E731
    x = torch.randn(2, 1, 4, 4)
    out = plan.sample(model_fn, x, plan.process, ImageNoise(0, range(2)))
    assert plan.process.num_steps == 1 and torch.isfinite(out).all()


def test_split_output_is_the_learned_sigma_adapter():
    """Learned sigma: eps is the first C of 2C channels, the variance values the rest; fixed variance: all eps."""
    out = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)
    eps, var_values = Diffusion.create("", learn_sigma=True).split_output(out)
    assert torch.equal(eps, out[:, :2]) and torch.equal(var_values, out[:, 2:])
    eps, var_values = Diffusion.create("", learn_sigma=False).split_output(out)
    assert eps is out and var_values is None


@pytest.mark.parametrize("name", ["dpm++2m", "heun"])
def test_solvers_run_on_the_diffusion_they_are_given_and_read_only_eps(name):
    """The contract is honest: `diffusion` sets the solver's betas, and only eps (never the variance) is used."""
    plan = plan_sampler(name, 6, learn_sigma=True)
    exact = oracle(plan.process)
    x = torch.randn((8, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    linear = plan.sample(exact, x, plan.process, None)
    cosine = plan.sample(exact, x, Diffusion.create("", "cosine", learn_sigma=True), None)
    assert not torch.allclose(linear, cosine)

    def nan_variance(x, index):
        eps, _ = plan.process.split_output(exact(x, index))
        return torch.cat([eps, torch.full_like(eps, float("nan"))], dim=1)

    assert torch.equal(plan.sample(nan_variance, x, plan.process, None), linear)


def test_plan_records_its_nfe_when_built():
    assert [plan_sampler(n, 5, learn_sigma=True).nfe for n in ("ddpm", "ddim", "heun", "euler")] == [5, 5, 9, 5]
    assert replace(plan_sampler("heun", 5, learn_sigma=True), nfe=3).nfe == 3  # a field, not read out of a partial


@pytest.mark.parametrize("eta", [-1.0, 1.5, float("nan")])
def test_eta_outside_zero_to_one_is_refused(eta):
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        plan_sampler("ddim", 5, learn_sigma=True, eta=eta)
