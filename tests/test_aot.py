"""`--compile` on a CPU: an AOTInductor package, built once, loaded by later runs, keyed by what decides its code."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ok, perturbed, tiny_config
from PIL import Image

from ditcli.errors import UserError
from ditcli.model.dit import DiT
from ditcli.sampling.aot import AotCompiled, package_exists, package_key
from ditcli.sampling.forward import CastWeights
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(DiT(tiny_config(depth=2)), seed=1, std=0.05).eval()


def inputs(model, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, config.in_channels, config.input_size, config.input_size, generator=generator)
    t = torch.rand(rows, generator=generator) * 999
    return x, t, torch.randint(0, config.num_classes, (rows,), generator=generator)


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    """One bf16 package, built by a first run (about 20 s on one thread)."""
    folder = tmp_path_factory.mktemp("aoti")
    net = CastWeights(model, torch.bfloat16)
    first = AotCompiled(net, folder)
    with torch.no_grad():
        out = first(*inputs(model, 8))
    return folder, net, first, out


def test_a_package_is_built_once_and_loaded_by_a_later_run(model, built):
    folder, net, first, out = built
    assert first.built is True and len(list(folder.glob("*.pt2"))) == 1
    assert not list(folder.glob(".*"))  # no temporary file is left behind
    again = AotCompiled(net, folder)
    x, t, y = inputs(model, 8)
    with torch.no_grad():
        assert torch.equal(again(x, t, y), out)
        assert again(x, t.round().long(), y).shape == out.shape  # integer timesteps: the same package
    assert again.built is False and len(list(folder.glob("*.pt2"))) == 1
    assert package_exists(folder, net) and not package_exists(folder, model)  # the fp32 model has none


@pytest.mark.parametrize("rows", [4, 12])
def test_a_package_takes_any_batch_and_matches_the_eager_forward(model, built, rows):
    _, net, first, _ = built
    with torch.no_grad():
        ours, eager = first(*inputs(model, rows)), net(*inputs(model, rows))
    assert ours.shape == eager.shape and ours.dtype == torch.float32
    assert (ours - eager).abs().max() <= 0.02 * eager.abs().max()  # a few bf16 roundings apart


def test_the_key_follows_the_weights_and_the_input_signature_but_not_the_batch(model):
    key = package_key(model, inputs(model, 4))
    assert key == package_key(model, inputs(model, 8))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.final_layer.linear.bias[0] += 1e-3
    assert package_key(other, inputs(model, 4)) != key
    x, t, y = inputs(model, 4)
    assert package_key(model, (x, t.long(), y)) != key
    assert package_key(CastWeights(model, torch.bfloat16), (x, t, y)) != key


def test_dit_sample_compile_builds_the_package_once_and_reuses_it(tmp_path, offline, model):
    path = tmp_path / "m.safetensors"
    save_safetensors(Checkpoint(model.state_dict(), model.config, "safetensors", "ema", None,
                                {"kind": "pixel", "channels": model.config.in_channels}), path)
    common = ("sample", "--ckpt", path, "--num", 4, "--steps", 3, "--sampler", "ddim", "--seed", 1)
    for out in ("first", "second"):
        ok(*common, "--compile", "--out", tmp_path / out)
    ok(*common, "--no-compile", "--out", tmp_path / "eager")
    assert len(list((tmp_path / "home" / "aoti").glob("*.pt2"))) == 1
    grids = {d: np.asarray(Image.open(tmp_path / d / "grid.png")).astype(int) for d in ("first", "second", "eager")}
    assert np.array_equal(grids["first"], grids["second"])
    assert np.abs(grids["first"] - grids["eager"]).max() <= 2  # fp32: the compiled kernels round a little apart
    record = json.loads((tmp_path / "second" / "provenance.json").read_text())["compile"]
    assert record == {"compiled": True, "why": "--compile given"}


def test_compile_auto_counts_a_package_an_earlier_run_built(tmp_path, offline, model, monkeypatch):
    """A job too short to repay a build, long enough to repay a load: eager until a package exists, then compiled."""
    import ditcli.sampling.forward

    monkeypatch.setattr(ditcli.sampling.forward, "LOAD_SECONDS", {"cpu": 0.0})  # any job repays a load; none a 45 s build
    path = tmp_path / "m.safetensors"
    save_safetensors(Checkpoint(model.state_dict(), model.config, "safetensors", "ema", None,
                                {"kind": "pixel", "channels": model.config.in_channels}), path)
    common = ("sample", "--ckpt", path, "--num", 4, "--steps", 3, "--sampler", "ddim", "--precision", "bf16")

    def choice(out: str) -> dict:
        ok(*common, "--out", tmp_path / out)
        return json.loads((tmp_path / out / "provenance.json").read_text())["compile"]

    before = choice("before")
    assert before["compiled"] is False and "of compilation" in before["why"]
    ok(*common, "--compile", "--out", tmp_path / "build")
    after = choice("after")
    assert after["compiled"] is True and "loading the package an earlier run built" in after["why"], after
    assert len(list((tmp_path / "home" / "aoti").glob("*.pt2"))) == 1  # loaded, not built again


def test_a_damaged_package_is_built_again(model, tmp_path, monkeypatch):
    from ditcli.sampling import aot

    net = CastWeights(model, torch.bfloat16)
    path = tmp_path / f"{package_key(net, inputs(model, 4))}.pt2"
    path.write_bytes(b"not a package")
    builds, loads = [], []

    def load(name):
        loads.append(name)
        if Path(name).read_bytes() == b"not a package":
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return lambda *args: "runner"

    monkeypatch.setattr(aot, "build_package", lambda m, i, p: builds.append(p) or p.write_bytes(b"rebuilt"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", load)
    compiled = AotCompiled(net, tmp_path)
    assert compiled(*inputs(model, 4)) == "runner"
    assert builds == [path] and len(loads) == 2 and compiled.built is True


def test_an_unwritable_package_folder_is_one_line(model, tmp_path):
    (tmp_path / "file").write_text("")
    compiled = AotCompiled(CastWeights(model, torch.bfloat16), tmp_path / "file" / "aoti")
    with pytest.raises(UserError, match="cannot write the compiled package .*set DIT_HOME"):
        compiled(*inputs(model, 4))


@pytest.fixture(scope="module")
def mean_flow_model():
    torch.manual_seed(0)
    config = tiny_config(depth=2, learn_sigma=False, mean_flow_form="decoupled", decoupled_depth=1)
    return perturbed(DiT(config), seed=2, std=0.05).eval()


def test_a_mean_flow_package_takes_the_second_time(mean_flow_model, tmp_path):
    """The package of a mean-flow model has r as a fourth input: it equals the eager forward at (r, t), and r = t
    would give another output, so r is not dropped on the way."""
    compiled = AotCompiled(mean_flow_model, tmp_path)
    x, t, y = inputs(mean_flow_model, 6)
    t = t / 999
    r = t * 0.3
    with torch.no_grad():
        ours, eager = compiled(x, t, y, r=r), mean_flow_model(x, t, y, r=r)
        without_r = (mean_flow_model(x, t, y) - eager).abs().max()
    assert (ours - eager).abs().max() <= min(1e-4 * eager.abs().max(), without_r / 10)
    assert compiled.built is True and package_exists(tmp_path, mean_flow_model)


def test_dit_sample_compile_runs_a_mean_flow_model(tmp_path, offline, mean_flow_model):
    from ditcli.diffusion.objectives import MeanFlowObjective

    path = tmp_path / "mf.safetensors"
    save_safetensors(Checkpoint(mean_flow_model.state_dict(), mean_flow_model.config, "safetensors", "ema", None,
                                {"kind": "pixel", "channels": mean_flow_model.config.in_channels},
                                objective=MeanFlowObjective("data-to-noise")), path)
    common = ("sample", "--ckpt", path, "--num", 4, "--steps", 2, "--seed", 1)
    ok(*common, "--compile", "--out", tmp_path / "compiled")
    ok(*common, "--no-compile", "--out", tmp_path / "eager")
    grids = {d: np.asarray(Image.open(tmp_path / d / "grid.png")).astype(int) for d in ("compiled", "eager")}
    assert np.abs(grids["compiled"] - grids["eager"]).max() <= 2
    record = json.loads((tmp_path / "compiled" / "provenance.json").read_text())
    assert record["compile"] == {"compiled": True, "why": "--compile given"} and record["nfe"] == 2
