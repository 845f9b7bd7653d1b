"""The mean-flow process (`ditcli.diffusion.meanflow`) against the original code's training losses: MeanFlow's
PyTorch port (zhuyu-cs/MeanFlow, with the official adaptive weight) and Decoupled MeanFlow's MeanFlow term
(tests/golden-meanflow/README.md, Sections 6.3 and 8.3).

Every loss is computed from the stored forced draws (t, r, noise, dropped labels), never re-drawn. Targets match to
1e-5 of their scale, the raw loss L to 1e-6 relative, gradients to 1e-4 of each parameter's scale; each comparison is
shown to fail with one convention flipped (the sign of the (t - r) du/dt term, the JVP tangents, r and t, the null
label of the guidance).
"""

import math

import pytest
import torch
from safetensors.torch import load_file
from test_meanflow_golden import GOLDEN, close, dmf_model, meanflow_model

from ditcli.diffusion.flow import FlowMatching
from ditcli.diffusion.meanflow import (
    MeanFlow,
    TrainedGuidance,
    adaptive_loss,
    guidance_mask,
    guided_velocity,
    mean_flow_target,
)
from ditcli.training.net import RunNet

MF_SETTINGS = {  # README Section 6.3
    "nog": TrainedGuidance(),
    "w3k0": TrainedGuidance(omega=3.0),
    "w02k092": TrainedGuidance(omega=0.2, kappa=0.92, interval=(0.0, 0.8)),
}
DMF_SETTINGS = {  # README Section 8.3
    "default": TrainedGuidance(form="model", omega=0.0),
    "mg": TrainedGuidance(form="model", omega=0.6, interval=(0.0, 0.7)),
}
TARGET_TOL, L_TOL, GRAD_TOL = 1e-5, 1e-6, 1e-4


@pytest.fixture(scope="module")
def mf():
    return load_file(GOLDEN / "meanflow.vectors.safetensors")


@pytest.fixture(scope="module")
def dmf():
    return load_file(GOLDEN / "dmf.vectors.safetensors")


def run_net(model) -> RunNet:
    return RunNet(model.train(), model, torch.device("cpu"), torch.float32)


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float(((ours - theirs).abs() / theirs.abs()).max())


class NullIgnored:
    """The network with the guidance's null label replaced by the row's own label."""

    def __init__(self, net):
        self.net = net

    def evaluate(self, x, t, y, drop_mask, r=None):
        return self.net.evaluate(x, t, y, torch.zeros_like(drop_mask), r=r)


class Counting:
    """The network, counting the guidance forwards."""

    def __init__(self, net):
        self.net, self.evaluations = net, 0

    def evaluate(self, *args, **kwargs):
        self.evaluations += 1
        return self.net.evaluate(*args, **kwargs)


def mf_inputs(mf):
    """The port's forced draws: (x, noise, t, r, labels, drop)."""
    return (mf["loss.images"], mf["loss.draw.noise"], mf["loss.t"], mf["loss.r"], mf["loss.y"],
            mf["loss.drop_mask"].bool())


def targets(process, net, z_t, t, r, v, y, drop):
    """(v_g, du/dt, u_tgt) as `MeanFlow.loss` builds them."""
    v_g = process.guide(net, z_t, t, v, y, drop)
    dudt = process.time_derivative(net, z_t, t, r, v_g, y, drop)
    return v_g, dudt, mean_flow_target(v_g, dudt, t, r)


def assert_flips_break(process, net, z_t, t, r, v, y, drop, u_tgt_ref, v_g_ref, guided: bool):
    """Each flipped convention moves u_tgt (or v_g) outside the tolerance."""
    v_g, dudt, _ = targets(process, net, z_t, t, r, v, y, drop)
    flipped_sign = v_g + (t - r).view(-1, 1, 1, 1) * dudt  # (N, 1, 1, 1) broadcast
    assert not close(flipped_sign, u_tgt_ref, TARGET_TOL), "sign of (t - r) du/dt"
    swapped = net.jvp(z_t, t, r, y, drop, tangents=(v_g, torch.zeros_like(t), torch.ones_like(r)))[1]
    assert not close(mean_flow_target(v_g, swapped, t, r), u_tgt_ref, TARGET_TOL), "JVP tangents swapped"
    assert not close(targets(process, net, z_t, r, t, v, y, drop)[2], u_tgt_ref, TARGET_TOL), "r and t swapped"
    if guided:
        assert not close(process.guide(NullIgnored(net), z_t, t, v, y, drop), v_g_ref, TARGET_TOL), "null label"


@pytest.mark.parametrize("setting", list(MF_SETTINGS))
def test_meanflow_targets_match_the_port(mf, setting):
    process, net = MeanFlow(guidance=MF_SETTINGS[setting]), run_net(meanflow_model(mf))
    x, noise, t, r, y, drop = mf_inputs(mf)
    z_t, v = process.q_sample(x, t, noise), process.path.velocity(x, noise)
    assert close(z_t, mf["loss.z_t"], TARGET_TOL) and close(v, mf["loss.v"], TARGET_TOL)
    v_g, dudt, u_tgt = targets(process, net, z_t, t, r, v, y, drop)
    for name, ours in (("v_g", v_g), ("dudt", dudt), ("u_tgt", u_tgt)):
        assert close(ours, mf[f"loss.{setting}.{name}"], TARGET_TOL), name
    assert_flips_break(process, net, z_t, t, r, v, y, drop, mf[f"loss.{setting}.u_tgt"], mf[f"loss.{setting}.v_g"],
                       guided=setting != "nog")


@pytest.mark.parametrize("setting", list(MF_SETTINGS))
def test_meanflow_loss_and_gradients_match_the_official_weight(mf, setting):
    model = meanflow_model(mf)
    x, noise, t, r, y, drop = mf_inputs(mf)
    terms = MeanFlow(guidance=MF_SETTINGS[setting]).loss(run_net(model), x, torch.stack([t, r], dim=1), noise, y,
                                                          drop)
    assert relative(terms["mse"] * x[0].numel(), mf[f"loss.{setting}.L"]) <= L_TOL
    assert math.isclose(float(terms["mse"].mean()), float(mf[f"loss.{setting}.loss_mean_ref"]), rel_tol=L_TOL)
    assert relative(terms["loss"].detach(), mf[f"loss.{setting}.loss_official"]) <= L_TOL
    (terms["loss"].sum() / len(x)).backward()  # the trainer's sum / per_rank: the batch mean
    grads = {name: p.grad for name, p in model.named_parameters() if name != "pos_embed"}
    assert len(grads) == len([k for k in mf if k.startswith(f"loss.{setting}.grad_official.")])
    for name, grad in grads.items():
        assert close(grad, mf[f"loss.{setting}.grad_official.{name}"], GRAD_TOL), name
    # zhuyu's L^2 weight (README 9b) gives other gradients: the comparison tells the two apart.
    assert not all(close(g, mf[f"loss.{setting}.grad_zhuyu.{n}"], GRAD_TOL) for n, g in grads.items())


@pytest.mark.parametrize("setting", list(MF_SETTINGS))
def test_guidance_rows_match_the_port(mf, setting):
    _, _, t, _, _, drop = mf_inputs(mf)
    mask = guidance_mask(t, drop, MF_SETTINGS[setting].interval)
    assert torch.equal(mask, mf[f"loss.{setting}.cfg_mask"].bool())


@pytest.mark.parametrize("setting", list(DMF_SETTINGS))
def test_dmf_meanflow_term_matches_the_original(dmf, setting):
    process, net = MeanFlow(guidance=DMF_SETTINGS[setting]), run_net(dmf_model(dmf))
    t, r = dmf["loss.t_mf"].view(-1), dmf["loss.r_mf"].view(-1)  # (N,) each
    z_t, v, y, drop = dmf["loss.x_t_mf"], dmf["loss.v_mf_raw"], dmf["loss.y"], dmf["loss.drop_mask"].bool()
    assert torch.equal(torch.where(drop, 10, y), dmf["loss.y_in"])  # the null label is num_classes
    v_g, _, u_tgt = targets(process, net, z_t, t, r, v, y, drop)
    assert close(v_g, dmf[f"loss.{setting}.v_g"], TARGET_TOL) and close(u_tgt, dmf[f"loss.{setting}.u_tgt"], TARGET_TOL)
    assert_flips_break(process, net, z_t, t, r, v, y, drop, dmf[f"loss.{setting}.u_tgt"], dmf[f"loss.{setting}.v_g"],
                       guided=setting == "mg")
    if setting == "mg":
        assert torch.equal(guidance_mask(t, drop, (0.0, 0.7)), dmf["loss.mg.mf.cfg_ids"].view(-1).bool())
    terms = process.loss(net, dmf["loss.x"], torch.stack([t, r], dim=1), dmf["loss.draw.eps_mf"], y, drop)
    assert relative(terms["mse"], dmf[f"loss.{setting}.mf_mean_err"]) <= L_TOL


def test_times_from_draws_match_the_port(mf):
    tr = MeanFlow().times_from_draws(mf["loss.draw.time_normal"], mf["loss.draw.eq_rand"])
    assert torch.allclose(tr, torch.stack([mf["loss.t"], mf["loss.r"]], dim=1), rtol=0, atol=1e-7)
    assert torch.equal(tr[:, 0] == tr[:, 1], mf["loss.eq_mask"].bool())


@pytest.mark.parametrize("direction", ["data-to-noise", "noise-to-data"])
def test_draw_times_puts_t_at_the_noisier_time(direction):
    process = MeanFlow(path=FlowMatching(direction=direction))
    tr = process.draw_times(200_000, torch.Generator().manual_seed(0))
    t, r = tr.unbind(dim=1)
    assert tr.shape == (200_000, 2) and tr.dtype == torch.float32
    assert bool((process.noise_level(t) >= process.noise_level(r)).all())
    assert bool((t >= r).all()) if direction == "data-to-noise" else bool((t <= r).all())
    assert abs(float((t == r).float().mean()) - (1 - process.interval_ratio)) < 0.005


def test_draw_times_levels_are_logit_normal_and_the_ratio_is_exact_at_the_ends():
    process = MeanFlow(interval_ratio=1.0, time_mean=-0.4, time_std=1.5)
    tr = process.draw_times(200_000, torch.Generator().manual_seed(1))
    logits = torch.logit(tr.double()).flatten()  # (2N,): both noise levels of every row
    assert abs(float(logits.mean()) + 0.4) < 0.02 and abs(float(logits.std()) - 1.5) < 0.02
    assert not bool((tr[:, 0] == tr[:, 1]).any())
    tr = MeanFlow(interval_ratio=0.0).draw_times(1000, torch.Generator().manual_seed(1))
    assert torch.equal(tr[:, 0], tr[:, 1])


def test_draw_times_with_r_proposal_sorts_two_logit_normals_of_their_own():
    """DMF's proposals: one level from (time_mean, time_std), one from r_time, the larger t's. Drawn as t's, the
    pair's larger level would have a mean above time_mean; here its order statistics follow the two laws."""
    process = MeanFlow(interval_ratio=1.0, time_mean=0.4, time_std=1.0, r_time=(-1.2, 0.5))
    normal = torch.randn((200_000, 2), generator=torch.Generator().manual_seed(2))
    tr = process.times_from_draws(normal, torch.zeros(200_000))
    first, second = torch.sigmoid(normal[:, 0] * 1.0 + 0.4), torch.sigmoid(normal[:, 1] * 0.5 - 1.2)
    assert torch.allclose(tr[:, 0], torch.maximum(first, second))
    assert torch.allclose(tr[:, 1], torch.minimum(first, second))
    logits = torch.logit(torch.stack([first, second]).double(), eps=0)
    assert abs(float(logits[1].mean()) + 1.2) < 0.01 and abs(float(logits[1].std()) - 0.5) < 0.01
    shared = MeanFlow(interval_ratio=1.0, time_mean=0.4, time_std=1.0).times_from_draws(normal, torch.zeros(200_000))
    assert float(tr[:, 1].mean()) < float(shared[:, 1].mean()) - 0.1  # r's own law: far cleaner than t's
    assert torch.equal(MeanFlow(r_time=(0.4, 1.0), time_mean=0.4).times_from_draws(normal[:8], torch.ones(8)),
                       MeanFlow(time_mean=0.4).times_from_draws(normal[:8], torch.ones(8)))


def test_draw_times_uses_only_its_generator():
    process = MeanFlow()
    state = torch.get_rng_state()
    first = process.draw_times(64, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)
    assert torch.equal(process.draw_times(64, torch.Generator().manual_seed(3)), first)
    assert not torch.equal(process.draw_times(64, torch.Generator().manual_seed(4)), first)


class ExactNet:
    """The exact average velocity of dz/dt = z: u(z, t, r) = z (1 - e^(r - t)) / (t - r), whatever the direction."""

    @staticmethod
    def u(z, t, r):
        return z * ((1 - torch.exp(r - t)) / (t - r)).view(-1, 1, 1, 1)  # (N, 1, 1, 1) broadcast

    def jvp(self, x, t, r, y, drop_mask, tangents):
        return torch.func.jvp(self.u, (x, t, r), tangents)


def test_the_target_of_an_exact_field_is_the_field_in_both_directions():
    """The MeanFlow identity holds for the true velocity v = z: u_tgt = u for t > r and for t < r."""
    z = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t, r = torch.tensor([0.9, 0.6, 0.2, 0.1]), torch.tensor([0.1, 0.3, 0.7, 0.8])
    none = torch.zeros(4, dtype=torch.bool)
    process, net = MeanFlow(), ExactNet()
    dudt = process.time_derivative(net, z, t, r, z, none, none)
    assert torch.allclose(mean_flow_target(z, dudt, t, r), net.u(z, t, r), atol=1e-6)
    swapped = net.jvp(z, t, r, None, None, (z, torch.zeros_like(t), torch.ones_like(r)))[1]
    assert not torch.allclose(mean_flow_target(z, swapped, t, r), net.u(z, t, r), atol=1e-3)


@pytest.mark.parametrize("direction", ["data-to-noise", "noise-to-data"])
def test_rows_with_r_equal_t_train_the_flow_matching_velocity(mf, direction):
    """With r = t the target is the path's velocity and the loss is the flow-matching loss."""
    net = run_net(meanflow_model(mf))
    path = FlowMatching(direction=direction)
    x, noise, t, _, y, drop = mf_inputs(mf)
    ours = MeanFlow(path=path).loss(net, x, torch.stack([t, t], dim=1), noise, y, drop)["mse"]
    assert torch.allclose(ours, path.loss(net, x, t, noise, y, drop)["mse"].detach(), rtol=1e-6)


def test_identity_guidance_runs_no_extra_forwards(mf):
    net = run_net(meanflow_model(mf))
    x, noise, t, _, y, drop = mf_inputs(mf)
    v = noise - x
    for guidance, forwards in ((TrainedGuidance(), 0), (TrainedGuidance(form="model", omega=0.0), 0),
                               (TrainedGuidance(omega=3.0), 1), (TrainedGuidance(form="model", omega=0.6), 1)):
        counting = Counting(net)
        v_g = MeanFlow(guidance=guidance).guide(counting, x, t, v, y, drop)
        assert counting.evaluations == forwards, guidance
        assert (v_g is v) == (forwards == 0)


def test_guidance_formulas_and_rows():
    v, u_cond, u_uncond = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([5.0])
    assert float(guided_velocity(v, u_cond, u_uncond, TrainedGuidance(omega=0.2, kappa=0.5))) == pytest.approx(
        0.2 + 1.0 + 0.3 * 5)
    assert float(guided_velocity(v, u_cond, u_uncond, TrainedGuidance(form="model", omega=0.5))) == pytest.approx(
        1 + 0.5 * (2 - 5))
    t, drop = torch.tensor([0.1, 0.2, 0.5, 0.8, 0.9, 0.5]), torch.tensor([False] * 5 + [True])
    assert guidance_mask(t, drop, (0.2, 0.8)).tolist() == [False, True, True, True, False, False]


def test_adaptive_loss_is_the_official_weight():
    L = torch.tensor([0.5, 3.0, 700.0], requires_grad=True)
    loss = adaptive_loss(L, p=1.0, c=0.01)
    loss.sum().backward()
    assert torch.allclose(loss, L / (L + 0.01)) and torch.allclose(L.grad, 1 / (L.detach() + 0.01))
    assert torch.equal(adaptive_loss(L, p=0.0, c=0.01), L)  # p = 0: the plain squared error


@pytest.mark.parametrize("fields, message", [
    ({"interval_ratio": 1.5}, "interval_ratio"), ({"interval_ratio": -0.1}, "interval_ratio"),
    ({"time_std": 0.0}, "time_std"), ({"time_mean": math.nan}, "finite"), ({"adaptive_c": math.inf}, "finite"),
    ({"adaptive_p": -1.0}, "adaptive_p"), ({"adaptive_c": 0.0}, "adaptive_c"),
    ({"guidance": 1.0}, "TrainedGuidance"), ({"r_time": (0.0, 0.0)}, "r_time"), ({"r_time": (math.nan, 1.0)}, "finite"),
    ({"r_time": (0.0,)}, "r_time"),
])
def test_meanflow_rejects_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        MeanFlow(**fields)


@pytest.mark.parametrize("fields, message", [
    ({"form": "cfg"}, "form"), ({"omega": math.inf}, "finite"), ({"kappa": math.nan}, "finite"),
    ({"form": "model", "omega": 0.5, "kappa": 0.1}, "kappa"), ({"interval": (0.8, 0.2)}, "low <= high"),
    ({"interval": (0.0, math.nan)}, "finite"), ({"interval": (0.0,)}, "two finite"),
])
def test_trained_guidance_rejects_bad_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainedGuidance(**fields)


def test_meanflow_delegates_the_path_conventions():
    path = FlowMatching(direction="noise-to-data", learn_sigma=True)
    process = MeanFlow(path=path)
    assert (process.learn_sigma, process.data_time, process.noise_time) == (True, 1.0, 0.0)
    assert process.time_grid(4, 1.5) == path.time_grid(4, 1.5)
    assert float(process.time_at(process.noise_level(torch.tensor(0.3)))) == pytest.approx(0.3)
    out = torch.randn(2, 8, 4, 4)
    assert torch.equal(process.split_output(out)[0], out[:, :4])


def test_the_trained_scale_is_the_fixed_point_of_the_self_referencing_target():
    """The target feeds the network's own u_cond back: iterating u_c <- target(u_c) at r = t converges to
    E[v] + s (E[v | c] - E[v]) with the recorded scale s, for both forms (MeanFlow's L/2 and DMF's settings)."""
    v_cond, v_uncond = 1.0, 0.0  # E[v | c] and E[v]: u_uncond is trained on dropped labels, whose target is v
    for guidance in (TrainedGuidance("meanflow", 0.2, 0.92), TrainedGuidance("model", 0.6), TrainedGuidance()):
        u_cond = v_uncond
        for _ in range(2000):
            u_cond = float(guided_velocity(torch.tensor(v_cond), torch.tensor(u_cond), torch.tensor(v_uncond),
                                           guidance))
        assert u_cond == pytest.approx(guidance.scale, rel=1e-4)
    assert TrainedGuidance("meanflow", 0.2, 0.92).scale == pytest.approx(2.5)
    assert TrainedGuidance("model", 0.6).scale == pytest.approx(2.5)
    with pytest.raises(ValueError, match="omega"):
        TrainedGuidance("model", 1.0)  # no fixed point: u_cond - u_uncond grows every step
