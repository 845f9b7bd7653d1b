"""`dit train --objective meanflow`, in both network forms (MeanFlow's separate embedder of t - r and Decoupled
MeanFlow's `--decoupled-depth`): the JVP on the unwrapped module keeps two processes equal to one, bf16 stays close to
fp32, --compile leaves the JVP eager, a non-finite du/dt is a skipped step, resume is bit-exact, --init-from a flow
model starts from its weights, distillation from a --teacher starts on the teacher's field, and the bad options are
one line each."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import metrics, ok, perturbed
from test_bad_inputs import assert_one_line_error, invoke, snapshot

from ditcli.errors import UserError
from ditcli.io import safe_torch_load
from ditcli.model.dit import DiT, DiTConfig
from ditcli.training.config import TrainConfig
from ditcli.training.net import RunNet
from ditcli.training.trainer import Trainer

TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=100, seed=3, objective="meanflow",
            interval_ratio=0.5)  # half the rows on an interval, so the JVP term is in every batch
TRAIN = ["train", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "2", "--num-heads", "2", "--image-size",
         "8", "--vae", "none", "--channels", "1", "--global-batch", "8", "--lr", "1e-3", "--device", "cpu",
         "--objective", "meanflow", "--interval-ratio", "0.5"]
FORMS = {"separate": {}, "decoupled": {"decoupled_depth": 1}}
FORM_FLAGS = {"separate": [], "decoupled": ["--decoupled-depth", "1"]}


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


# Two processes equal one: the gradient flows only through the DDP forward, so it is synchronised.

@pytest.mark.slow
@pytest.mark.parametrize("form, extra", [
    ("separate", []),
    ("decoupled", ["--train-guidance", "model", "--train-omega", "0.6"]),  # and the guidance forwards, on the module
    ("decoupled", ["--train-guidance", "distill", "--train-omega", "2", "--teacher", "{teacher}", "--init-from",
                   "{teacher}"]),  # and a teacher's forwards on each rank
], ids=["separate", "model-guidance", "distill"])
def test_two_gloo_processes_train_the_same_mean_flow_model_as_one(tmp_path, npz_data, teacher_source, form, extra):
    extra = [a.replace("{teacher}", str(teacher_source)) for a in extra]
    common = [*TRAIN, *FORM_FLAGS[form], *extra, "--data", str(npz_data), "--steps", "2", "--ckpt-every", "1",
              "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ditcli", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "ditcli", *common, "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    for step in (1, 2):
        one, two = (safe_torch_load(tmp_path / name / f"ckpt-{step:07d}.pt") for name in ("one", "two"))
        assert len(two["rng"]) == 2 and two["config"]["train"]["objective"] == "meanflow"
        for name, tensor in one["model"].items():  # the raw weights: the EMA would shrink a difference tenfold
            torch.testing.assert_close(comparable(name, two["model"][name]), comparable(name, tensor), rtol=0,
                                       atol=1e-6, msg=f"step {step}: {name}")
    # A step moves weights by about lr (AdamW's first updates are lr * sign(g)): a rank that stepped on its own
    # half's gradient would be that far off, a thousand times the tolerance.
    before, after = (safe_torch_load(tmp_path / "one" / f"ckpt-{step:07d}.pt")["model"] for step in (1, 2))
    assert max(float((after[k] - before[k]).abs().max()) for k in after) > 5e-4


def comparable(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The weights whose updates are determined: a key bias shifts every logit of a query alike, which softmax
    ignores, so its gradient is rounding noise, and AdamW turns noise of any size into steps of about lr."""
    return tensor.view(3, -1)[[0, 2]] if name.endswith("attn.qkv.bias") else tensor


# bf16.

def step_gradient(tmp_path: Path, data: Path, precision: str, form: str) -> tuple[dict, torch.Tensor]:
    """One training step from the same weights off the zero init; its metrics and the gradient it applied."""
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / precision), steps=1, precision=precision,
                                  **{**TINY, **FORMS[form]}))
    trainer.setup()
    perturbed(trainer.model, seed=1).train()  # every layer in play, not only the final one
    applied = {}
    update = trainer.apply_update

    def capture(ok):
        applied["grad"] = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.requires_grad])
        update(ok)

    trainer.apply_update = capture
    return trainer.train_step(), applied["grad"]


@pytest.mark.parametrize("form", FORMS)
def test_bf16_gradient_drifts_from_fp32_within_a_bound(tmp_path, npz_data, form):
    """Measured on this model: the bf16 gradient is 0.29-0.39 % (relative L2) off fp32's, the per-pixel error 1e-4
    to 3e-4 relative, over three weight seeds and both forms. The weights after one AdamW step are no measure: its
    first update is lr * sign(g), so a single sign flip moves a weight by 2 lr whatever the precision."""
    fp32, g32 = step_gradient(tmp_path, npz_data, "fp32", form)
    bf16, g16 = step_gradient(tmp_path, npz_data, "bf16", form)
    assert not fp32["skipped"] and not bf16["skipped"]
    drift = float((g16 - g32).norm() / g32.norm())
    assert 1e-4 < drift < 0.02, drift  # nonzero: autocast is on; 5x the measured drift at most
    assert bf16["mse"] == pytest.approx(fp32["mse"], rel=3e-3)


def test_bf16_trains_through_the_cli(tmp_path, npz_data):
    ok(*TRAIN, *FORM_FLAGS["decoupled"], "--data", npz_data, "--out", tmp_path, "--steps", 3, "--precision", "bf16",
       "--log-every", 1)
    records = metrics(tmp_path)
    assert [r["skipped"] for r in records] == [False] * 3 and all(np.isfinite(r["mse"]) for r in records)
    data = safe_torch_load(tmp_path / "ckpt-0000003.pt")
    assert data["config"]["train"]["precision"] == "bf16"
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in data["model"].values())


# --compile: the forward compiled, the JVP eager on the module.

@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler")
def test_compile_applies_to_the_forward_and_the_jvp_runs_eager(tmp_path, npz_data, monkeypatch):
    """About 100 s on a loaded 2-core CPU (the compile of forward and backward), hence slow."""
    torch._dynamo.reset()
    nets = []  # (forward, module) of each JVP's RunNet: the trainer lets go of them when the run ends
    jvp = RunNet.jvp
    monkeypatch.setattr(RunNet, "jvp", lambda self, *a, **k: nets.append((self.forward, self.module))
                        or jvp(self, *a, **k))
    compiled = run(tmp_path / "compiled", npz_data, steps=2, compile=True, **FORMS["decoupled"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert len(nets) == 2 and all(isinstance(f, torch._dynamo.eval_frame.OptimizedModule) for f, _ in nets)
    assert all(type(m) is DiT and m is compiled.model for _, m in nets)  # the JVP never sees the compiled wrapper
    eager = run(tmp_path / "eager", npz_data, steps=2, **FORMS["decoupled"])
    for a, b in zip(metrics(tmp_path / "compiled"), metrics(tmp_path / "eager")):
        assert not a["skipped"] and a["mse"] == pytest.approx(b["mse"], rel=1e-4)
    for (name, a), b in zip(compiled.model.state_dict().items(), eager.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


# The NaN guard covers the JVP.

def test_a_non_finite_time_derivative_skips_the_step_and_counts_it(tmp_path, npz_data, monkeypatch):
    original = RunNet.jvp
    calls = {"n": 0}

    def one_nan(self, *args, **kwargs):
        calls["n"] += 1
        out, du = original(self, *args, **kwargs)
        if calls["n"] == 2:
            du = du.clone()
            du[0, 0, 0, 0] = float("nan")  # one element of du/dt, in the second step
        return out, du

    monkeypatch.setattr(RunNet, "jvp", one_nan)
    trainer = run(tmp_path / "one", npz_data, steps=3, **FORMS["separate"])
    assert calls["n"] == 3 and trainer.state.bad_steps == 1 and trainer.state.step == 3
    assert [r["skipped"] for r in metrics(tmp_path / "one")] == [False, True, False]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    monkeypatch.setattr(RunNet, "jvp", lambda self, *a, **k: tuple(x * float("inf") for x in original(self, *a, **k)))
    with pytest.raises(UserError, match="3 consecutive steps with a non-finite"):
        run(tmp_path / "two", npz_data, steps=10, max_bad_steps=3, **FORMS["decoupled"])


# Resume.

@pytest.mark.parametrize("form", FORMS)
def test_mean_flow_resume_is_bit_exact(tmp_path, npz_data, form):
    settings = dict(FORMS[form], train_guidance="meanflow", train_omega=0.6, train_kappa=0.2)
    straight = run(tmp_path / "a", npz_data, steps=4, **settings)
    run(tmp_path / "b", npz_data, steps=2, **settings)
    resumed = run(tmp_path / "b", npz_data, steps=4, resume="auto", **settings)
    assert resumed.state.step == 4
    for key in ("model", "ema"):
        for (name, a), b in zip(getattr(straight, key).state_dict().items(), getattr(resumed, key).state_dict().values()):
            assert torch.equal(a, b), f"{key}.{name}"
    assert [r["mse"] for r in metrics(tmp_path / "a")] == [r["mse"] for r in metrics(tmp_path / "b")]


# Fine-tuning a flow model.

@pytest.fixture(scope="module")
def flow_source(tmp_path_factory, npz_data) -> Path:
    """A 2-step `dit train --objective flow` at another seed and a large lr: weights that differ from a fresh model."""
    out = tmp_path_factory.mktemp("flow")
    ok(*[a for a in TRAIN if a not in ("meanflow", "--interval-ratio", "0.5")], "flow", "--data", npz_data,
       "--out", out, "--steps", 2, "--lr", "1e-2", "--seed", 5)
    return out / "ckpt-0000002.pt"


def started(tmp_path: Path, data: Path, name: str, **overrides) -> Trainer:
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / name), steps=1, **{**TINY, **overrides}))
    trainer.setup()
    return trainer


def test_a_decoupled_fine_tune_starts_as_its_flow_source(tmp_path, npz_data, flow_source):
    source = safe_torch_load(flow_source)["model"]
    tuned = started(tmp_path, npz_data, "tuned", init_from=str(flow_source), init_weights="model", decoupled_depth=1)
    fresh = started(tmp_path, npz_data, "fresh", decoupled_depth=1)
    assert tuned.model.state_dict().keys() == source.keys()  # DMF's form adds no weights
    for name, tensor in tuned.model.state_dict().items():
        assert torch.equal(tensor, source[name]), name
    assert any(not torch.equal(fresh.model.state_dict()[k], v) for k, v in source.items())
    # With r = t the decoupled model is the flow model: the same velocity, to the bit.
    flow = DiT(DiTConfig.from_dict(safe_torch_load(flow_source)["config"]["model"]))
    flow.load_state_dict(source)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8, generator=generator), torch.rand(4, generator=generator)
    y, drop = torch.tensor([0, 1, 2, 0]), torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(tuned.model.eval()(x, t, y, drop, r=t), flow.eval()(x, t, y, drop))
    assert run(tmp_path / "steps", npz_data, steps=2, init_from=str(flow_source), decoupled_depth=1).state.step == 2


def test_a_separate_form_fine_tune_takes_all_but_a_fresh_r_embedder(tmp_path, npz_data, flow_source):
    source = safe_torch_load(flow_source)["model"]
    tuned = started(tmp_path, npz_data, "tuned", init_from=str(flow_source), init_weights="model")
    fresh = started(tmp_path, npz_data, "fresh")
    own = {k for k in tuned.model.state_dict() if k.startswith("r_embedder.")}
    assert own and own == tuned.model.state_dict().keys() - source.keys()
    for name, tensor in tuned.model.state_dict().items():
        expected = fresh.model.state_dict()[name] if name in own else source[name]
        assert torch.equal(tensor, expected), name
    assert any(not torch.equal(fresh.model.state_dict()[k], v) for k, v in source.items())
    assert all(torch.equal(a, b) for a, b in zip(tuned.ema.state_dict().values(), tuned.model.state_dict().values()))


# Distillation: the frozen teacher's velocity is the target (--train-guidance distill --teacher).

@pytest.fixture(scope="module")
def teacher_source(tmp_path_factory, npz_data) -> Path:
    """A flow model trained long enough (30 steps at a large lr) for its velocity to depend on the label."""
    out = tmp_path_factory.mktemp("teacher")
    ok(*[a for a in TRAIN if a not in ("meanflow", "--interval-ratio", "0.5")], "flow", "--data", npz_data,
       "--out", out, "--steps", 30, "--lr", "1e-2", "--seed", 5, "--ema-decay", "0.5")
    return out / "ckpt-0000030.pt"


def distilled(tmp_path: Path, data: Path, source: Path, name: str, steps: int, resume=None, **overrides) -> Trainer:
    settings = dict(init_from=str(source), init_weights="ema", teacher=str(source), train_guidance="distill",
                    decoupled_depth=1)
    return run(tmp_path / name, data, steps, resume=resume, **{**settings, **overrides})


def test_a_distilled_fine_tune_starts_on_its_teachers_field(tmp_path, npz_data, teacher_source):
    # From the teacher's own EMA, at r = t the decoupled model is the teacher: the unguided target (omega 1) has zero
    # error on every row, kept or dropped. A teacher fed the wrong label, time or drop mask would not.
    exact = distilled(tmp_path, npz_data, teacher_source, "exact", 1, train_omega=1.0, interval_ratio=0.0)
    assert metrics(tmp_path / "exact")[0]["mse"] == 0.0
    assert exact.teacher is not None and not any(p.requires_grad for p in exact.teacher.parameters())
    # Guided (omega 2) the target moves off the teacher's conditional velocity; on intervals it takes the JVP term.
    distilled(tmp_path, npz_data, teacher_source, "guided", 1, train_omega=2.0, interval_ratio=0.0)
    distilled(tmp_path, npz_data, teacher_source, "intervals", 1, train_omega=1.0, interval_ratio=1.0)
    assert metrics(tmp_path / "guided")[0]["mse"] > 1e-6
    assert metrics(tmp_path / "intervals")[0]["mse"] > 1e-6


def test_the_distilled_target_guides_inside_the_interval_and_keeps_dropped_rows_unconditional():
    from ditcli.diffusion.meanflow import TrainedGuidance, distilled_velocity
    cond, uncond = torch.full((4, 1, 2, 2), 3.0), torch.full((4, 1, 2, 2), 1.0)
    t = torch.tensor([0.1, 0.5, 0.5, 0.9])
    drop = torch.tensor([False, False, True, False])
    target = distilled_velocity(cond, uncond, t, drop, TrainedGuidance("distill", 2.5, 0.0, (0.2, 0.8)))
    assert target[:, 0, 0, 0].tolist() == [3.0, 1.0 + 2.5 * 2.0, 1.0, 3.0]
    assert TrainedGuidance("distill", 2.5, 0.0, (0.2, 0.8)).scale == 2.5  # no fixed point: the teacher is frozen


def test_a_distilled_run_resumes_bit_exactly(tmp_path, npz_data, teacher_source):
    settings = dict(train_omega=2.0, train_guidance_interval="0.2,0.9")
    straight = distilled(tmp_path, npz_data, teacher_source, "a", 4, **settings)
    distilled(tmp_path, npz_data, teacher_source, "b", 2, **settings)
    resumed = distilled(tmp_path, npz_data, teacher_source, "b", 4, resume="auto", **settings)
    assert resumed.state.step == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["mse"] for r in metrics(tmp_path / "a")] == [r["mse"] for r in metrics(tmp_path / "b")]


# Bad input: one line, exit 2, nothing written.

@pytest.fixture(scope="module")
def fx(tmp_path_factory, npz_data) -> Path:
    import diffusers  # noqa: F401  its import makes torch's compile cache folder in $TMPDIR, once: not our doing
    root = tmp_path_factory.mktemp("fixtures")
    shutil.copy(npz_data, root / "good.npz")
    ddpm = dict(TINY, objective="ddpm", interval_ratio=0.25)
    Trainer(TrainConfig(data=str(npz_data), out=str(root / "ddpm"), steps=1, **ddpm)).run()
    return root


MF = ["--objective", "meanflow"]


@pytest.mark.parametrize("args, mentions", [
    ([*MF, "--interval-ratio", "1.5"], "--interval-ratio"),
    ([*MF, "--interval-ratio", "-0.1"], "--interval-ratio"),
    ([*MF, "--decoupled-depth", "0"], "--decoupled-depth"),
    ([*MF, "--decoupled-depth", "3"], "--decoupled-depth"),
    ([*MF, "--init-from", "{fx}/ddpm/ckpt-0000001.pt"], "DDPM"),
    (["--objective", "ddpm", "--decoupled-depth", "2"], "--decoupled-depth"),
    (["--objective", "flow", "--train-omega", "2"], "--train-omega"),
    ([*MF, "--train-guidance", "sideways"], "--train-guidance"),
    ([*MF, "--train-guidance", "meanflow", "--train-kappa", "1"], "--train-kappa"),
    ([*MF, "--mf-time-std", "0"], "--mf-time-std"),
    ([*MF, "--mf-r-time", "-1.2"], "--mf-r-time"),
    ([*MF, "--mf-r-time=-1.2,0"], "--mf-r-time"),
    ([*MF, "--mf-r-time", "low,1"], "--mf-r-time"),
    (["--objective", "flow", "--mf-r-time=-1.2,1"], "--mf-r-time"),
    ([*MF, "--train-guidance", "model", "--train-omega", "0.6", "--train-guidance-interval", "0.9,0.1"], "--train-guidance-interval"),
    ([*MF, "--train-guidance", "model", "--train-omega", "0.6", "--train-guidance-interval", "abc"], "--train-guidance-interval"),
    ([*MF, "--train-guidance", "model", "--train-omega", "0.6", "--train-guidance-interval", "0,700"], "--train-guidance-interval"),
    ([*MF, "--train-guidance", "model", "--train-omega", "0.6", "--train-guidance-interval", "0,0.5,1"], "--train-guidance-interval"),
    ([*MF, "--train-omega", "2"], "--train-guidance"),  # guidance options without guidance are not ignored
    ([*MF, "--train-guidance-interval", "0.2,0.8"], "--train-guidance"),
    ([*MF, "--train-guidance", "model", "--train-omega", "0.6", "--train-kappa", "0.5"], "--train-kappa"),
    ([*MF, "--train-guidance", "model", "--train-omega", "1"], "--train-omega"),  # no fixed point: it would diverge
    ([*MF, "--train-guidance", "distill", "--train-omega", "2"], "--teacher"),
    ([*MF, "--teacher", "{fx}/ddpm/ckpt-0000001.pt"], "--train-guidance"),
    ([*MF, "--train-guidance", "distill", "--teacher", "{fx}/missing.pt"], "--teacher"),
    ([*MF, "--train-guidance", "distill", "--teacher", "{fx}/ddpm/ckpt-0000001.pt"], "flow model"),
    ([*MF, "--train-guidance", "distill", "--teacher", "{fx}/good.npz"], "--teacher"),
    ([*MF, "--train-guidance", "distill", "--teacher", "{fx}/ddpm/ckpt-0000001.pt", "--train-omega", "-1"],
     "--train-omega"),
    ([*MF, "--train-guidance", "distill", "--teacher", "{fx}/ddpm/ckpt-0000001.pt", "--train-kappa", "0.5"],
     "--train-kappa"),
], ids=["ratio-above-1", "ratio-negative", "depth-0", "depth-beyond-model", "init-from-ddpm", "depth-with-ddpm",
        "omega-with-flow", "guidance-sideways", "kappa-1", "time-std-0", "r-time-one-number",
        "r-time-std-0", "r-time-word", "r-time-with-flow", "interval-reversed", "interval-word",
        "interval-in-timesteps", "interval-three-numbers", "omega-without-guidance", "interval-without-guidance",
        "kappa-with-model-guidance", "model-guidance-without-fixed-point", "distill-without-teacher",
        "teacher-without-distill", "teacher-missing", "teacher-ddpm", "teacher-not-a-model", "distill-omega-negative",
        "kappa-with-distill"])
def test_bad_mean_flow_options_are_one_line_and_write_nothing(args, mentions, fx, tmp_path, monkeypatch):
    argv = ["train", "--data", str(fx / "good.npz"), "--out", "run", *TRAIN[1:TRAIN.index("--objective")],
            "--steps", "1", *[a.replace("{fx}", str(fx)) for a in args]]
    work = tmp_path / "work"
    work.mkdir()
    before = snapshot(fx, work)
    code, output = invoke(argv, work, monkeypatch)
    assert_one_line_error(code, output, mentions)
    assert snapshot(fx, work) == before, "files were created or changed"
