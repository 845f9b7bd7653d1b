"""The bf16 inference path (weights cast once, no autocast, fp32 sampler state) and `--compile auto`'s choice."""

import json

import pytest
import torch
from conftest import dit, ok, perturbed, tiny_config

from ditcli.diffusion.guidance import Guidance
from ditcli.model.dit import DiT, preset
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.forward import CastWeights, compile_pays, inference_model
from ditcli.sampling.generate import sample_latents
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

DRIFT_BOUND = 0.01  # per image, max |bf16 - fp32| / max |fp32|; measured 0.18-0.22% for DDPM-50, DDIM-10, DPM++-10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(DiT(tiny_config()), seed=0, std=0.02).eval()


def latents(model, sampler: str, steps: int, precision: str) -> torch.Tensor:
    config = GenerateConfig(labels=tuple(range(8)), seed=0, sampler=sampler, steps=steps, guidance=Guidance(4.0),
                            precision=precision)
    return sample_latents(inference_model(model, precision), config.plan(model.config.learn_sigma), config,
                          list(range(8)), 8, torch.device("cpu"))[0]


@pytest.mark.parametrize("sampler, steps", [("ddpm", 50), ("ddim", 10), ("dpm++2m", 10)])
def test_bf16_sampling_drifts_from_fp32_within_the_stated_bound(model, sampler, steps):
    fp32, bf16 = latents(model, sampler, steps, "fp32"), latents(model, sampler, steps, "bf16")
    assert bf16.dtype == torch.float32  # the sampler state stays fp32
    drift = (bf16 - fp32).flatten(1).abs().max(1).values / fp32.flatten(1).abs().max(1).values
    assert 0 < float(drift.max()) <= DRIFT_BOUND


def test_the_bf16_path_runs_cast_weights_without_autocast_and_leaves_the_callers_model(model):
    seen = []
    net = inference_model(model, "bf16")
    assert isinstance(net, CastWeights) and net.inner is not model
    net.inner.final_layer.linear.register_forward_hook(
        lambda module, args, out: seen.append((module.weight.dtype, args[0].dtype, torch.is_autocast_enabled("cpu"))))
    config = GenerateConfig(labels=(0, 1, 2, 3), seed=0, sampler="ddim", steps=2, guidance=Guidance(4.0),
                            precision="bf16")
    sample_latents(net, config.plan(True), config, [0, 1, 2, 3], 4, torch.device("cpu"))
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16, False)}
    assert next(model.parameters()).dtype == torch.float32
    cast = dict(net.inner.named_parameters())
    assert cast.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(cast[k], p.to(torch.bfloat16)) and cast[k] is not p for k, p in model.named_parameters())
    assert inference_model(model, "fp32") is model


def test_compile_auto_compiles_only_a_job_that_repays_it():
    small = GenerateConfig(labels=tuple(range(16)), sampler="dpm++2m", steps=10, guidance=Guidance(4.0),
                           precision="bf16")
    chosen, why = compile_pays(small, tiny_config(), 10, torch.device("cpu"))
    assert chosen is False and why.startswith("eager:")
    fid = GenerateConfig(labels=tuple(range(1000)) * 50, sampler="ddpm", steps=250, guidance=Guidance(1.5),
                         batch_size=64, precision="bf16")
    chosen, why = compile_pays(fid, preset("DiT-XL/2"), 250, torch.device("cpu"))
    assert chosen is True and why.startswith("compiled:")


def test_compile_auto_weighs_this_cpus_measured_rates_and_a_package_already_built(monkeypatch):
    """DiT-B/2, 8 images, DDIM 50 at cfg 4 in bf16: 153 s of eager forwards at the EPYC's measured rate, 92 s at
    the AMX Xeon's. Freezing saves 20 s and 31 s: short of a 45 s build on both, more than a 4 s load on both."""
    from ditcli.sampling import forward

    job = GenerateConfig(labels=(0,) * 8, sampler="ddim", steps=50, guidance=Guidance(4.0, "all"), batch_size=8,
                         precision="bf16")
    seen = {}
    for kind in ("amx", "other"):
        monkeypatch.setattr(forward, "cpu_kind", lambda kind=kind: kind)
        seen[kind] = [compile_pays(job, preset("DiT-B/2"), 50, torch.device("cpu"), built) for built in (False, True)]
    assert [chosen for chosen, _ in seen["amx"]] == [False, True] == [chosen for chosen, _ in seen["other"]]
    assert "about 92 s eager, compiling would save about 31 s for about 45 s of compilation" in seen["amx"][0][1]
    assert "about 153 s eager, compiling would save about 20 s" in seen["other"][0][1]
    assert seen["other"][0][1].endswith("of compilation (or 4 s to load a package an earlier run built)")
    assert seen["other"][1][1].endswith("for about 4 s of loading the package an earlier run built")


def test_a_cast_model_is_not_cast_again():
    cast = inference_model(DiT(tiny_config()), "bf16")
    assert inference_model(cast, "bf16") is cast and inference_model(cast, "fp16") is not cast


def test_dit_sample_records_the_compile_choice_and_its_reason(tmp_path, offline):
    torch.manual_seed(0)
    config = tiny_config(in_channels=1)
    path = tmp_path / "m.safetensors"
    save_safetensors(Checkpoint(DiT(config).state_dict(), config, "safetensors",
                                codec={"kind": "pixel", "channels": 1}), path)
    ok("sample", "--ckpt", path, "--class", 1, "--steps", 2, "--out", tmp_path / "auto")
    record = json.loads((tmp_path / "auto" / "provenance.json").read_text())["compile"]
    assert record["compiled"] is False and record["why"].startswith("eager: the job's forwards take about")
    ok("sample", "--ckpt", path, "--class", 1, "--steps", 2, "--no-compile", "--out", tmp_path / "off")
    assert json.loads((tmp_path / "off" / "provenance.json").read_text())["compile"] == \
        {"compiled": False, "why": "--no-compile given"}


@pytest.mark.parametrize("args", [["--compile=maybe"], ["--compile", "--no-compile=1"]])
def test_bad_compile_values_are_one_line(tmp_path, args):
    result = dit("sample", "--model", "fashion-mnist", "--class", 1, *args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert len(result.output.strip().splitlines()) == 1, result.output
