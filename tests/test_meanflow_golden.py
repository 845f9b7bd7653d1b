"""Mean-flow models against the original code: the MeanFlow PyTorch port (zhuyu-cs/MeanFlow) and Decoupled MeanFlow
(kyungmnlee/dmf), run on tiny random networks (tests/golden-meanflow/README.md gives every convention).

Each comparison is to 1e-5 of the compared tensor's scale; the README's effect table shows that each convention
flipped here (r and t swapped, the interval's length against r, the decoupled depth off by one, the JVP tangents, the
null label) moves the result by far more.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ditcli.model.dit import DiT, DiTConfig

GOLDEN = Path(__file__).parent / "golden-meanflow"
TOL = 1e-5


@pytest.fixture(scope="module")
def mf():
    return load_file(GOLDEN / "meanflow.vectors.safetensors")


@pytest.fixture(scope="module")
def dmf():
    return load_file(GOLDEN / "dmf.vectors.safetensors")


def tiny(vectors: dict, **form) -> DiT:
    depth = 1 + max(int(k.split(".")[2]) for k in vectors if k.startswith("model.blocks."))
    config = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                       num_classes=10, learn_sigma=False, class_dropout_prob=0.1, **form)
    model = DiT(config, generator=torch.Generator().manual_seed(0))
    state = {k.removeprefix("model."): v for k, v in vectors.items()
             if k.startswith("model.") and not k.startswith("model.logvar_linear")}
    model.load_state_dict(state)
    return model.eval()


def meanflow_model(vectors: dict) -> DiT:
    return tiny(vectors, mean_flow_form="separate")


def dmf_model(vectors: dict, depth: int = 3) -> DiT:
    return tiny(vectors, mean_flow_form="decoupled", decoupled_depth=depth)


def close(ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOL) -> bool:
    scale = max(float(theirs.abs().max()), 1e-12)
    return float((ours - theirs).abs().max()) <= tol * scale


def mf_jvp(model: DiT, x, r, t, y, tangents):
    """torch.func.jvp of u(z, r, t) in the port's argument order, through the math attention kernel."""
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return torch.func.jvp(lambda z, r_, t_: model(z, t_, y, r=r_), (x, r, t), tangents)


@pytest.mark.parametrize("case", ["pairs", "r0t1", "req"])
def test_meanflow_forward_matches_the_port(mf, case):
    model = meanflow_model(mf)
    with torch.no_grad():
        out = model(mf["forward.x"], mf[f"forward.{case}.t"], mf["forward.y"], r=mf[f"forward.{case}.r"])
    assert close(out, mf[f"forward.{case}.out"])


def test_meanflow_forward_fails_with_r_and_t_swapped_or_r_for_the_interval(mf):
    """The conventions the test guards: (r, t) order and the r_embedder seeing t - r, not r."""
    model = meanflow_model(mf)
    x, y, r, t = mf["forward.x"], mf["forward.y"], mf["forward.pairs.r"], mf["forward.pairs.t"]
    with torch.no_grad():
        assert not close(model(x, r, y, r=t), mf["forward.pairs.out"])
        c_wrong = model.t_embedder(t) + model.r_embedder(r) + model.y_embedder(y)
        assert not torch.allclose(c_wrong, model.embed_interval(x, t, r, y)[1], atol=1e-4)
        assert not close(model(x, t, torch.full_like(y, 10), r=r), mf["forward.pairs.out"])  # the null label


def test_meanflow_jvp_matches_the_port_and_its_tangents_matter(mf):
    model = meanflow_model(mf)
    x, y, r, t, v = mf["forward.x"], mf["forward.y"], mf["forward.pairs.r"], mf["forward.pairs.t"], mf["jvp.v"]
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    u, dudt = mf_jvp(model, x, r, t, y, (v, zeros, ones))
    assert close(u, mf["jvp.u"]) and close(dudt, mf["jvp.dudt"])
    for name, tangents in (("dudt_z", (v, zeros, zeros)), ("dudt_t", (torch.zeros_like(v), zeros, ones)),
                           ("dudr", (torch.zeros_like(v), ones, zeros))):
        assert close(mf_jvp(model, x, r, t, y, tangents)[1], mf[f"jvp.{name}"]), name
    assert not close(mf_jvp(model, x, r, t, y, (v, ones, zeros))[1], mf["jvp.dudt"])  # r and t tangents swapped


@pytest.mark.parametrize("case", ["pairs", "t1r0", "req"])
def test_dmf_forward_matches_the_original(dmf, case):
    model = dmf_model(dmf)
    with torch.no_grad():
        out = model(dmf["forward.x"], dmf[f"forward.{case}.t"], dmf["forward.y"], r=dmf[f"forward.{case}.r"])
    assert close(out, dmf[f"forward.{case}.out"])


@pytest.mark.parametrize("depth", [2, 4])
def test_dmf_forward_fails_with_the_decoupled_depth_off_by_one(dmf, depth):
    model = dmf_model(dmf, depth)
    with torch.no_grad():
        out = model(dmf["forward.x"], dmf["forward.pairs.t"], dmf["forward.y"], r=dmf["forward.pairs.r"])
    assert not close(out, dmf["forward.pairs.out"])


def test_dmf_jvp_matches_the_original(dmf):
    model = dmf_model(dmf)
    x, y, r, t, v = dmf["forward.x"], dmf["forward.y"], dmf["forward.pairs.r"], dmf["forward.pairs.t"], dmf["jvp.v"]
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    u, dudt = mf_jvp(model, x, r, t, y, (v, zeros, ones))
    assert close(u, dmf["jvp.u"]) and close(dudt, dmf["jvp.dudt"])
    assert close(mf_jvp(model, x, r, t, y, (torch.zeros_like(v), ones, zeros))[1], dmf["jvp.dudr"])
    assert not close(mf_jvp(model, x, r, t, y, (v, ones, zeros))[1], dmf["jvp.dudt"])


def test_a_model_without_a_second_time_refuses_r():
    model = DiT(DiTConfig(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=2),
                generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not a mean-flow model"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), r=torch.zeros(1))
