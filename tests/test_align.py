"""Representation alignment while training (`dit train --align repa|self`, `--dispersive`; ditcli.training.align).

REPA's projector output and projection loss match REPA's own code on the golden REPA model (tests/golden-flow/, see
its README, sections 4, 7 and 8.2) to 1e-5 of scale, and each check is shown to fail with the block off by one or
the cosine's sign flipped. The dispersive loss matches its formula written out pair by pair, and SRA's teacher runs
the EMA at the less noisy time of the same image and noise. Runs with alignment resume bit-exactly, train the same
weights in micro-batches and on two processes, keep their heads in REPA's key layout, take a REPA checkpoint's
projectors with --init-from, and refuse bad options in one line before writing anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dit, metrics
from safetensors.torch import load_file

from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.flow import FlowMatching
from ditcli.io import safe_torch_load
from ditcli.model.dit import DiT, DiTConfig
from ditcli.training.align import (
    AlignBatch,
    Alignment,
    DispersiveTerm,
    RepaTerm,
    SelfTerm,
    dispersive_loss,
    negative_cosine,
    projector,
)
from ditcli.training.config import TrainConfig
from ditcli.training.net import RunNet
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import infer_config, load_checkpoint

GOLDEN = Path(__file__).parent / "golden-flow"
REPA_FLOW = FlowMatching("data-to-noise", learn_sigma=False)
PROJECTOR_DIM, Z_DIM = 32, 16  # the golden REPA model's projector_dim and z_dims[0] (README section 7)
CPU = torch.device("cpu")


def tolerance(reference: torch.Tensor, share: float = 1e-5) -> float:
    return share * float(reference.abs().max())


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).abs().max())


@pytest.fixture(scope="module")
def repa():
    return load_file(GOLDEN / "repa.vectors.safetensors")


@pytest.fixture(scope="module")
def repa_state():
    return torch.load(GOLDEN / "repa-tiny.pt", weights_only=True)


class StubEncoder:
    """An encoder that hands out REPA's recorded target tokens (`loss.zs`, its stand-in for DINOv2's)."""

    name, dim = "golden zs", Z_DIM

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def __call__(self, pixels: torch.Tensor, grid: int) -> torch.Tensor:
        assert grid * grid == self.tokens.shape[1]
        return self.tokens


def golden_alignment(repa, repa_state, depth: int = 1) -> tuple[DiT, Alignment]:
    """The golden REPA model as our DiT, and a REPA term at `depth` with its projector loaded from the state dict."""
    model = DiT(infer_config({k: v for k, v in repa_state.items() if not k.startswith("projectors.")}, 2))
    model.load_state_dict({k: v for k, v in repa_state.items() if not k.startswith("projectors.")})
    term = RepaTerm(depth, projector(32, PROJECTOR_DIM, Z_DIM), 0.5, StubEncoder(repa["loss.zs"]), 4)
    alignment = Alignment([term], CPU, torch.float32, seed=0)
    alignment.heads.load_state_dict({k: v for k, v in repa_state.items() if k.startswith("projectors.")})
    return model.eval(), alignment


# The golden REPA model: the projector after block encoder_depth = 1, and the projection loss.

def test_the_heads_have_repas_key_layout(repa, repa_state):
    _, alignment = golden_alignment(repa, repa_state)
    ours = {k: v.shape for k, v in alignment.heads.state_dict().items()}
    assert ours == {k: v.shape for k, v in repa_state.items() if k.startswith("projectors.")}
    assert min(ours) == "projectors.0.0.bias"


@pytest.mark.parametrize("depth, matches", [(1, True), (2, False)])
def test_the_projector_output_matches_repa_after_its_block(repa, repa_state, depth, matches):
    model, alignment = golden_alignment(repa, repa_state, depth)
    with torch.no_grad():
        out, (zs,) = alignment.wrap(model)(repa["forward.x"], repa["forward.t"], repa["forward.y"])
    assert max_error(out, repa["forward.out"]) <= tolerance(repa["forward.out"])  # the plain forward is untouched
    assert (max_error(zs, repa["forward.zs0"]) <= tolerance(repa["forward.zs0"])) is matches


@pytest.mark.parametrize("sign, matches", [(1.0, True), (-1.0, False)])
def test_the_projection_loss_matches_repas_through_the_training_path(repa, repa_state, sign, matches):
    """The flow's loss through a tapped RunNet, then the alignment added as the trainer adds it: the projector output,
    REPA's proj_loss and its total loss (denoising mean + 0.5 proj_loss) from the recorded draws."""
    model, alignment = golden_alignment(repa, repa_state)
    net = RunNet(alignment.wrap(model), model, CPU, torch.float32, tapped=True)
    images, noises, t, y = repa["loss.images"], repa["loss.noises"], repa["loss.time"].flatten(), repa["loss.y"]
    drop = torch.zeros_like(y, dtype=torch.bool)
    terms = REPA_FLOW.loss(net, images, t, noises, y, drop)
    assert max_error(terms["mse"].detach(), repa["loss.denoising_loss"]) <= tolerance(repa["loss.denoising_loss"])
    assert max_error(net.taps[0].detach(), repa["loss.zs_tilde0"]) <= tolerance(repa["loss.zs_tilde0"])
    batch = AlignBatch(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), images, t, noises, y, drop, torch.zeros(4))
    added = alignment.add(terms, net.taps, batch)
    proj_loss = sign * added["align"].mean()
    assert (abs(float(proj_loss) - float(repa["loss.proj_loss"])) <= tolerance(repa["loss.proj_loss"])) is matches
    total = repa["loss.denoising_loss"].mean() + 0.5 * repa["loss.proj_loss"]
    assert abs(float(added["loss"].detach().mean()) - float(total)) <= tolerance(total)


def test_negative_cosine_is_minus_one_for_aligned_tokens_and_ignores_their_scale():
    z = torch.randn(3, 5, 7)
    torch.testing.assert_close(negative_cosine(2.5 * z, z), -torch.ones(3))
    torch.testing.assert_close(negative_cosine(-z, z), torch.ones(3))


# The dispersive loss.

def test_the_dispersive_loss_is_its_formula_over_every_pair_the_diagonal_included():
    z = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0))
    flat = z.flatten(1)
    squared = ((flat[:, None] - flat[None]) ** 2).sum(-1) / flat.shape[1]  # (N, N), the diagonal 0
    for tau in (1.0, 0.5):
        expected = torch.log(torch.exp(-squared / tau).mean())
        torch.testing.assert_close(dispersive_loss(z, tau), expected)
        off_diagonal = torch.log(torch.exp(-squared / tau)[~torch.eye(6, dtype=torch.bool)].mean())
        assert abs(float(dispersive_loss(z, tau) - off_diagonal)) > 1e-3  # leaving i = j out is another loss
    assert float(dispersive_loss(z[:1].expand(6, 4, 5), 1.0)) == pytest.approx(0.0, abs=1e-6)  # collapsed: its max


def test_the_dispersive_term_gives_every_image_the_batch_loss_and_has_no_head():
    term = DispersiveTerm(2, 0.5, 1.0)
    tap = torch.randn(4, 3, 8)
    values = term.loss(tap, None)
    assert term.head is None and values.shape == (4,) and torch.equal(values, dispersive_loss(tap, 1.0).expand(4))


# SRA's teacher.

@pytest.mark.parametrize("direction, t, expected", [("data-to-noise", 0.5, 0.3), ("noise-to-data", 0.5, 0.7),
                                                     ("data-to-noise", 0.1, 0.0)])
def test_a_less_noisy_flow_time_moves_towards_the_data_and_stops_there(direction, t, expected):
    flow = FlowMatching(direction)
    assert float(flow.less_noisy(torch.tensor([t]), torch.tensor([0.2]))) == pytest.approx(expected)


def test_a_less_noisy_ddpm_step_is_a_share_of_the_chain_earlier():
    steps = Diffusion.create("", "linear").less_noisy(torch.tensor([500, 10]), torch.tensor([0.2, 0.2]))
    assert steps.tolist() == [300, 0]


def test_the_self_teacher_is_the_emas_later_block_at_the_less_noisy_time():
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=3,
                       learn_sigma=False)
    torch.manual_seed(0)
    ema = DiT(config).eval()
    for p in ema.parameters():
        p.data += 0.05 * torch.randn_like(p)
    flow = FlowMatching("data-to-noise")
    term = SelfTerm(1, torch.nn.Identity(), 0.5, ema, 2, 0.2, flow)
    x, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, shift, y, drop = torch.tensor([0.6, 0.1]), torch.tensor([0.5, 1.0]), torch.tensor([0, 2]), torch.tensor([0, 1])
    batch = AlignBatch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), x, t, noise, y, drop.bool(), shift)
    with torch.no_grad():
        target = term.target(batch)
        teacher_t = torch.tensor([0.5, 0.0])  # 0.6 - 0.2 * 0.5, and 0.1 - 0.2 stopped at the data
        _, (expected,) = ema.forward_tokens(flow.q_sample(x, teacher_t, noise), teacher_t, y, drop.bool(), None, (2,))
        _, (same_time,) = ema.forward_tokens(flow.q_sample(x, t, noise), t, y, drop.bool(), None, (2,))
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)
    assert max_error(target, same_time) > 1e-3  # the time shift shows


# Training runs with alignment.

TINY = {"model": "DiT-S/2", "hidden_size": 32, "depth": 2, "num_heads": 2, "image_size": 8, "channels": 1,
        "vae": None, "global_batch": 8, "lr": 1e-3, "ema_decay": 0.9, "log_every": 1, "ckpt_every": 100, "seed": 3,
        "objective": "flow", "learn_sigma": False}
REPA_JUDGE = {"align": "repa", "align_encoder": "fashion-judge", "align_projector_dim": 16}
VARIANTS = {"repa+dispersive": {**REPA_JUDGE, "dispersive": True}, "self": {"align": "self"},
            "dispersive": {"dispersive": True}}


@pytest.fixture(scope="module")
def npz_data(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, size=(24, 8, 8, 1), dtype=np.uint8), labels=np.arange(24) % 3,
             class_names=np.array(["a", "b", "c"]))
    return path


def run(out: Path, data: Path, steps: int, resume=None, **overrides) -> Trainer:
    trainer = Trainer(TrainConfig(data=str(data), out=str(out), steps=steps, **{**TINY, **overrides}), resume=resume)
    trainer.run()
    return trainer


def test_the_checkpoint_keeps_the_heads_in_repas_layout_and_their_optimizer(tmp_path, npz_data):
    trainer = run(tmp_path, npz_data, steps=2, **REPA_JUDGE)
    data = safe_torch_load(tmp_path / "ckpt-0000002.pt")
    assert sorted(data["align"]) == [f"projectors.0.{i}.{kind}" for i in (0, 2, 4) for kind in ("bias", "weight")]
    assert data["align"]["projectors.0.4.weight"].shape == (64, 16)  # to the judge's 64-d tokens
    assert data["align_optimizer"]["state"] and not any(k.startswith("projectors") for k in data["model"])
    for name, value in trainer.alignment.heads.state_dict().items():
        assert torch.equal(data["align"][name], value), name
    assert {"align", "mse", "loss"} <= set(metrics(tmp_path)[-1])
    assert load_checkpoint(tmp_path / "ckpt-0000002.pt").dropped[0].startswith("projectors.* (6 tensors")
    tuned = Trainer(TrainConfig(data=str(npz_data), out=str(tmp_path / "tuned"), steps=1,
                                init_from=str(tmp_path / "ckpt-0000002.pt"), **{**TINY, **REPA_JUDGE}))
    tuned.setup()  # a fine-tune of an aligned run starts from its heads too
    for name, value in tuned.alignment.heads.state_dict().items():
        assert torch.equal(value, data["align"][name]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_run_with_alignment_resumes_bit_exactly(tmp_path, npz_data, variant):
    straight = run(tmp_path / "a", npz_data, steps=4, **VARIANTS[variant])
    run(tmp_path / "b", npz_data, steps=2, **VARIANTS[variant])
    resumed = run(tmp_path / "b", npz_data, steps=4, resume="auto", **VARIANTS[variant])
    for module in ("model", "ema"):
        for (name, a), b in zip(getattr(straight, module).state_dict().items(),
                                getattr(resumed, module).state_dict().values()):
            assert torch.equal(a, b), f"{module}.{name}"
    if straight.alignment.heads is not None:
        for (name, a), b in zip(straight.alignment.heads.state_dict().items(),
                                resumed.alignment.heads.state_dict().values()):
            assert torch.equal(a, b), name
    assert metrics(tmp_path / "a")[-1] == {**metrics(tmp_path / "b")[-1], "img_per_s": metrics(tmp_path / "a")[-1][
        "img_per_s"], "peak_mem_mb": metrics(tmp_path / "a")[-1]["peak_mem_mb"]}


@pytest.mark.parametrize("variant", ["repa+dispersive", "self"])
def test_the_alignment_changes_training_and_per_image_terms_accumulate(tmp_path, npz_data, variant):
    options = {k: v for k, v in VARIANTS[variant].items() if k != "dispersive"}  # a batch-level term would differ
    plain = run(tmp_path / "plain", npz_data, steps=2)
    whole = run(tmp_path / "whole", npz_data, steps=2, **options)
    split = run(tmp_path / "split", npz_data, steps=2, micro_batch=3, **options)
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(whole.model.parameters(), plain.model.parameters()))
    assert metrics(tmp_path / "whole")[-1]["align"] == pytest.approx(metrics(tmp_path / "split")[-1]["align"],
                                                                     abs=1e-5)


@pytest.mark.parametrize("objective", [{"objective": "ddpm", "learn_sigma": True}, {"objective": "meanflow"}])
def test_alignment_composes_with_the_other_objectives_and_bf16(tmp_path, npz_data, objective):
    run(tmp_path, npz_data, steps=2, precision="bf16", **objective, **VARIANTS["repa+dispersive"])
    last = metrics(tmp_path)[-1]
    assert not last["skipped"] and all(math.isfinite(last[k]) for k in ("loss", "align", "dispersive"))
    self_run = run(tmp_path / "self", npz_data, steps=2, **objective, align="self")
    assert not metrics(tmp_path / "self")[-1]["skipped"] and self_run.alignment.terms[0].teacher is self_run.ema


def repa_train_checkpoint(path: Path, heads: dict[str, torch.Tensor]) -> Path:
    """A REPA train.py checkpoint ({model, ema, opt, args}) of the tiny run's shape, with projectors `heads`."""
    config = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                       num_classes=3, learn_sigma=False)
    torch.manual_seed(5)
    state = DiT(config).state_dict()
    model = {**state, **heads}
    torch.save({"model": model, "ema": model, "opt": {}, "args": {"enc_type": "dinov2-vit-b", "proj_coeff": 0.5}},
               path)
    return path


def test_init_from_a_repa_checkpoint_takes_its_projectors_where_they_fit(tmp_path, npz_data):
    g = torch.Generator().manual_seed(1)
    heads = {f"projectors.0.{i}.{kind}": torch.randn(shape, generator=g) for i, (out, inp) in
             ((0, (16, 32)), (2, (16, 16)), (4, (64, 16))) for kind, shape in (("weight", (out, inp)), ("bias", (out,)))}
    source = repa_train_checkpoint(tmp_path / "repa.pt", heads)
    fits = Trainer(TrainConfig(data=str(npz_data), out=str(tmp_path / "fits"), steps=1, init_from=str(source),
                               time_direction="data-to-noise", **{**TINY, **REPA_JUDGE}))
    fits.setup()
    for name, value in fits.alignment.heads.state_dict().items():
        assert torch.equal(value, heads[name]), name
    warnings = []
    other = Trainer(TrainConfig(data=str(npz_data), out=str(tmp_path / "other"), steps=1, init_from=str(source),
                                time_direction="data-to-noise", **{**TINY, **REPA_JUDGE, "align_projector_dim": 8}),
                    on_event=lambda kind, data: warnings.append(data.get("message", "")) if kind == "warning" else 0)
    other.setup()
    assert any("do not fit" in line for line in warnings)
    assert not torch.equal(other.alignment.heads.state_dict()["projectors.0.4.weight"][:, :8],
                           heads["projectors.0.4.weight"][:, :8])


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_alignment(tmp_path, npz_data):
    """The heads sit in the DDP module: their gradients are averaged with the model's. The dispersive term is a
    batch's, so the one process takes the same micro-batches (4 images) as each of the two."""
    common = ["--data", str(npz_data), "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads",
              "2", "--image-size", "8", "--vae", "none", "--channels", "1", "--global-batch", "8", "--steps", "3",
              "--lr", "1e-3", "--device", "cpu", "--objective", "flow", "--no-learn-sigma", "--align", "repa",
              "--align-encoder", "fashion-judge", "--align-projector-dim", "16", "--dispersive", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ditcli", "train", "--out", str(tmp_path / "one"),
                             "--micro-batch", "4", *common], check=False, capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "ditcli", "train", "--out", str(tmp_path / "two"), *common],
                            check=False, capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    one = safe_torch_load(tmp_path / "one" / "ckpt-0000003.pt")
    two = safe_torch_load(tmp_path / "two" / "ckpt-0000003.pt")
    for key in ("model", "ema", "align"):
        for name, tensor in one[key].items():
            torch.testing.assert_close(two[key][name], tensor, rtol=0, atol=1e-5, msg=f"{key}.{name}")


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compile_traces_the_model_with_its_heads(tmp_path, npz_data):
    """About 2 minutes on a loaded 2-core CPU (the compile of forward and backward), hence slow."""
    torch._dynamo.reset()
    compiled = run(tmp_path / "compiled", npz_data, steps=2, compile=True, **VARIANTS["repa+dispersive"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager = run(tmp_path / "eager", npz_data, steps=2, **VARIANTS["repa+dispersive"])
    for a, b in zip(metrics(tmp_path / "compiled"), metrics(tmp_path / "eager")):
        assert a["align"] == pytest.approx(b["align"], abs=1e-5) and a["mse"] == pytest.approx(b["mse"], rel=1e-4)
    for (name, a), b in zip(compiled.alignment.heads.state_dict().items(),
                            eager.alignment.heads.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_sigterm_to_one_rank_then_resume_ends_where_the_straight_run_ends(tmp_path, npz_data):
    """The fault trial of tests/test_scale.py with alignment: rank 1 alone is told to stop after step 2, both ranks
    stop at step 3 and save, and the resumed run's model, EMA, heads and both optimizers equal the straight run's."""
    faulty = str(Path(__file__).resolve().parent / "faults" / "dit_with_fault.py")
    common = ["train", "--data", str(npz_data), "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2",
              "--num-heads", "2", "--image-size", "8", "--vae", "none", "--channels", "1", "--global-batch", "8",
              "--steps", "6", "--ckpt-every", "3", "--lr", "1e-3", "--device", "cpu", "--objective", "flow",
              "--no-learn-sigma", "--align", "repa", "--align-encoder", "fashion-judge", "--align-projector-dim",
              "16", "--dispersive"]

    def torchrun(out: Path, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({"DIT_FAULT": fault} if fault else {})}
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               faulty, *common, "--out", str(out), *extra], check=False, capture_output=True,
                              text=True, env=env, timeout=300)

    assert torchrun(tmp_path / "straight").returncode == 0
    stopped = torchrun(tmp_path / "stopped", fault="TERM:1:2")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "stopped").glob("ckpt-*.pt")) == ["ckpt-0000003.pt"]
    resumed = torchrun(tmp_path / "stopped", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (safe_torch_load(tmp_path / run / "ckpt-0000006.pt") for run in ("straight", "stopped"))
    for key in ("model", "ema", "align"):
        for name, tensor in a[key].items():
            assert torch.equal(b[key][name], tensor), f"{key}.{name}"
    for key in ("optimizer", "align_optimizer"):
        for i, state in a[key]["state"].items():
            for name, tensor in state.items():
                assert torch.equal(b[key]["state"][i][name], tensor), f"{key}.{i}.{name}"


# Bad options: one line, exit 2, nothing written.

def refused(tmp_path: Path, *options) -> str:
    out = tmp_path / "run"
    result = dit("train", "--data", tmp_path / "tiny.npz", "--out", out, "--model", "DiT-S/2", "--hidden-size", 32,
                 "--depth", 2, "--num-heads", 2, "--image-size", 8, "--vae", "none", "--channels", 1, "--steps", 1,
                 "--global-batch", 8, "--objective", "flow", *options)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not out.exists()
    return lines[0]


@pytest.fixture
def bad_inputs(tmp_path, npz_data):
    (tmp_path / "tiny.npz").write_bytes(npz_data.read_bytes())
    torch.save({"weight": torch.zeros(3)}, tmp_path / "random.pt")
    return tmp_path


@pytest.mark.parametrize("options, says", [
    (["--align", "clip"], "unknown --align 'clip'"),
    (["--align", "self", "--align-depth", "0"], "--align-depth 0 is not a block"),
    (["--align", "self", "--align-depth", "3"], "whose depth is 2"),
    (["--align", "self", "--align-teacher-depth", "5"], "--align-teacher-depth 5"),
    (["--align", "self", "--align-weight", "-1"], "--align-weight must be"),
    (["--align", "self", "--align-weight", "nan"], "--align-weight must be"),
    (["--dispersive", "--dispersive-temperature", "0"], "--dispersive-temperature must be"),
    (["--align", "repa"], "--align repa needs an encoder"),
    (["--align", "repa", "--align-encoder", "missing.pth"], "--align-encoder missing.pth is neither"),
    (["--align-encoder", "dinov2"], "--align-encoder only applies to --align repa"),
    (["--dispersive-weight", "1"], "only applies with --dispersive"),
    (["--align", "self", "--dinov2-weights", "x.pth"], "--dinov2-weights only applies"),
])
def test_bad_alignment_options_are_refused_in_one_line(bad_inputs, options, says):
    assert says in refused(bad_inputs, *options)


def test_an_encoder_file_of_another_kind_is_refused_before_anything_is_written(bad_inputs):
    line = refused(bad_inputs, "--align", "repa", "--align-encoder", bad_inputs / "random.pt")
    assert "neither a DINOv2 backbone nor a fashion-judge weight file" in line


# DINOv2 as the encoder (the tiny golden ViT of tests/golden-dinov2/, 48 wide, 3 heads by its sidecar), and as the
# features of FD while training.

@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dinov2")
    weights = folder / "tiny-dinov2.pt"
    weights.write_bytes((Path(__file__).parent / "golden-dinov2" / "dinov2-A.pt").read_bytes())
    (folder / "tiny-dinov2.pt.json").write_text(json.dumps({"num_heads": 3}))
    return weights


def test_dinov2_tokens_match_the_dit_grid_and_the_file_is_known_by_its_keys(tmp_path, npz_data, tiny_dinov2):
    from ditcli.training.encoders import DINOV2, encoder_kind, load_encoder

    assert encoder_kind(tiny_dinov2) == DINOV2
    encoder = load_encoder(str(tiny_dinov2), None, CPU)
    tokens = encoder(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), 4)
    assert tokens.shape == (2, 16, 48)  # a 56 px input: 4 x 4 patches of 14 px
    trainer = run(tmp_path, npz_data, steps=2, align="repa", align_encoder="dinov2", dinov2_weights=str(tiny_dinov2),
                  align_projector_dim=16)
    assert trainer.alignment.heads.state_dict()["projectors.0.4.weight"].shape == (48, 16)
    assert math.isfinite(metrics(tmp_path)[-1]["align"])


def test_fd_dinov2_while_training_uses_the_dinov2_weights(tmp_path, npz_data, tiny_dinov2):
    images = np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "data.npz", arr_0=images)
    made = dit("fid", "--make-ref", tmp_path / "data.npz", "-o", tmp_path / "ref.npz", "--features", "dinov2",
               "--dinov2-weights", tiny_dinov2, "--device", "cpu")
    assert made.exit_code == 0, made.output
    run(tmp_path / "run", npz_data, steps=2, eval_every=2, eval_ref=str(tmp_path / "ref.npz"), eval_num=4,
        eval_steps=2, eval_features="dinov2", dinov2_weights=str(tiny_dinov2))
    record = [row for row in metrics(tmp_path / "run") if "fd" in row][-1]
    assert record["eval_features"] == "dinov2" and math.isfinite(record["fd"])
