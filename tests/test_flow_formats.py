"""SiT and REPA weight files from elsewhere: refused without an objective, read with one, recorded once converted, and
the SiT registry entry downloaded from a loopback server and sampled with the entry's objective."""

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LoopbackServer, dit, ok, perturbed, tiny_config
from safetensors import safe_open

import ditcli.weights.registry
from ditcli.diffusion.objectives import FlowObjective
from ditcli.errors import UserError
from ditcli.model.dit import DiT
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.record import Checkpoint
from ditcli.weights.registry import resolve_weights

GOLDEN_FLOW = Path(__file__).resolve().parent / "golden-flow"
SIT = FlowObjective("noise-to-data")
REPA = FlowObjective("data-to-noise")
SIT_KEY = ("SiT-XL/2", 256)


def sit_layout(seed: int = 0, **overrides) -> dict[str, torch.Tensor]:
    """A SiT-XL/2-shaped state dict in miniature: DiT's keys, learned sigma (2C outputs), random weights.

    Width 384 is DiT-S's, so the heads (6) come from the preset table, as `dit sample` (which has no --num-heads)
    needs; depth 1 and 2x2 tokens keep it fast.
    """
    torch.manual_seed(seed)
    fields = dict(input_size=8, patch_size=4, hidden_size=384, depth=1, num_heads=6, learn_sigma=True)
    return perturbed(DiT(tiny_config(**{**fields, **overrides})), seed=seed, std=0.02).state_dict()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random 4-channel AutoencoderKL folder (2x downsampling), as tests/test_sample.py builds it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                        norm_num_groups=8, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sit_file(tmp_path_factory) -> Path:
    """A plain SiT state dict under the name SiT's download.py gives its release."""
    path = tmp_path_factory.mktemp("sit") / "SiT-XL-2-256x256.pt"
    torch.save(sit_layout(), path)
    return path


def repa_checkpoint(path: Path) -> Path:
    """REPA's train.py checkpoint of the golden REPA model: projector heads, no sigma channels, REPA's arguments."""
    ema = torch.load(GOLDEN_FLOW / "repa-tiny.pt", weights_only=True)
    raw = {k: v + 1.0 for k, v in ema.items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    args = argparse.Namespace(model="SiT-XL/2", enc_type="dinov2-vit-b", proj_coeff=0.5, encoder_depth=8,
                              resolution=256, num_classes=10, vae="ema", path_type="linear", prediction="v")
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": args, "steps": 4000}, path)
    return path


def one_line_error(result, *fragments: str) -> str:
    """The single `error: ...` line of a refused command, which must name every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_sit_layout_in_miniature_has_exactly_the_golden_sit_keys():
    golden = torch.load(GOLDEN_FLOW / "sit-tiny.pt", weights_only=True)
    ours = sit_layout(hidden_size=32, num_heads=2, patch_size=2, depth=2)
    assert set(ours) == set(golden)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in golden.items()}


def test_released_sit_file_is_refused_without_an_objective_and_samples_as_a_flow_with_one(
        sit_file, tiny_vae, tmp_path, offline):
    common = ["sample", "--ckpt", sit_file, "--vae", tiny_vae, "--sampler", "euler", "--steps", 3, "--class", 1,
              "--num-per-class", 2]
    refused = dit(*common, "--out", tmp_path / "refused")
    one_line_error(refused, "SiT", "--objective flow --time-direction noise-to-data")
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "out"
    ok(*common, "--objective", "flow", "--out", out, "--npz", tmp_path / "sit.npz")
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["objective"] == {"objective": "flow", "time_direction": "noise-to-data"}
    assert provenance["nfe"] == 3 and provenance["sampler"] == "euler" and provenance["labels"] == [1, 1]
    assert len(list(out.glob("0*.png"))) == 2

    # The direction is used, not only recorded: read the other way the same noise gives other images.
    ok(*common, "--objective", "flow", "--time-direction", "data-to-noise", "--npz", tmp_path / "repa.npz")
    forward, backward = (np.load(tmp_path / name)["arr_0"] for name in ("sit.npz", "repa.npz"))
    assert forward.shape == (2, 16, 16, 3) and not np.array_equal(forward, backward)


def test_sit_train_checkpoint_is_recognised_by_its_arguments_and_gives_its_ema(tmp_path):
    ema = torch.load(GOLDEN_FLOW / "sit-tiny.pt", weights_only=True)
    raw = {k: v * 0.5 for k, v in ema.items()}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    args = argparse.Namespace(model="SiT-XL/2", image_size=256, num_classes=10, vae="mse", path_type="Linear",
                              prediction="velocity", global_seed=0)
    path = tmp_path / "0100000.pt"  # SiT's train.py names checkpoints by step: only the arguments say SiT
    torch.save({"model": raw, "ema": ema, "opt": opt, "args": args}, path)

    with pytest.raises(UserError, match="SiT") as err:
        load_checkpoint(path, num_heads=2)
    assert "noise-to-data" in str(err.value) and "\n" not in str(err.value)

    checkpoint = load_checkpoint(path, num_heads=2, objective=SIT)
    assert checkpoint.objective == SIT and not checkpoint.objective_recorded
    assert checkpoint.weights == "ema" and "SiT" in checkpoint.format
    assert checkpoint.config.input_size == 8 and checkpoint.config.learn_sigma  # from the tensors, not args' 256
    assert checkpoint.codec == {"kind": "vae", "vae": "stabilityai/sd-vae-ft-mse"}
    assert set(checkpoint.state_dict) == set(ema)
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in ema.items())


def test_repa_checkpoint_drops_its_projectors_and_records_its_objective_once_converted(tmp_path):
    path = repa_checkpoint(tmp_path / "0004000.pt")
    with pytest.raises(UserError, match="REPA") as err:
        load_checkpoint(path, num_heads=2)
    assert "--time-direction data-to-noise" in str(err.value)
    one_line_error(dit("convert", "--info", path, "--num-heads", 2), "REPA", "data-to-noise")

    given = ["--objective", "flow", "--time-direction", "data-to-noise", "--num-heads", 2]
    lines = ok("convert", "--info", path, *given).output.splitlines()
    assert [line for line in lines if line.startswith("dropped: projectors.*")], lines
    assert [line.split() for line in lines if "schedule" in line] == [["schedule", "none", "(a", "flow", "model)"]]
    data = json.loads(ok("convert", "--info", path, *given, "--json").stdout)
    assert data["objective"] == {"objective": "flow", "time_direction": "data-to-noise"}
    assert data["objective_source"] == "given or assumed"
    assert len(data["dropped"]) == 1 and data["dropped"][0].startswith("projectors.* (6 tensors")
    assert data["weights"] == "ema" and data["config"]["learn_sigma"] is False

    dst = tmp_path / "repa.safetensors"
    ok("convert", path, dst, *given)
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["objective"] == "flow" and f.metadata()["time_direction"] == "data-to-noise"
        assert not [k for k in f.keys() if k.startswith("projectors.")]
    converted = load_checkpoint(dst)
    assert converted.objective == REPA and converted.objective_recorded and not converted.dropped
    ema = torch.load(GOLDEN_FLOW / "repa-tiny.pt", weights_only=True)
    assert all(torch.equal(converted.state_dict[k], ema[k]) for k in converted.state_dict)

    # The record decides from now on: no option is needed, and a contradicting one is refused.
    assert json.loads(ok("convert", "--info", dst, "--json").stdout)["objective_source"] == "recorded in the file"
    one_line_error(dit("convert", "--info", dst, "--objective", "ddpm"), "records the objective", "flow")
    one_line_error(dit("convert", "--info", dst, "--objective", "flow"), "records the objective", "noise-to-data")


@pytest.fixture
def flow_safetensors(tmp_path) -> Path:
    config = tiny_config(learn_sigma=False)
    model = perturbed(DiT(config))
    path = tmp_path / "flow.safetensors"
    save_safetensors(Checkpoint(model.state_dict(), config, "test", objective=SIT), path)
    return path


@pytest.mark.parametrize("source", ["recorded", "named"])
def test_flow_model_is_never_exported_as_a_ddpm_pipeline(source, flow_safetensors, tmp_path, offline):
    out = tmp_path / "pipeline"
    if source == "recorded":
        args = [flow_safetensors]
    else:  # the golden SiT state dict under its release name, with the objective named
        sit = tmp_path / "SiT-tiny.pt"
        sit.write_bytes((GOLDEN_FLOW / "sit-tiny.pt").read_bytes())
        args = [sit, "--objective", "flow", "--num-heads", 2]
    one_line_error(dit("convert", *args[:1], out, "--to", "diffusers", *args[1:]), "flow-matching", ".safetensors")
    assert not out.exists()


@pytest.fixture
def sit_server(sit_file):
    server = LoopbackServer(sit_file.read_bytes(), name="SiT-XL-2-256.pt?dl=0")
    yield server
    server.close()


def test_sit_registry_entry_downloads_and_samples_with_the_entrys_objective(sit_server, sit_file, tiny_vae,
                                                                          tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DIT_HOME", str(home))
    for name in ("DIT_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    payload = sit_file.read_bytes()
    entry = dataclasses.replace(ditcli.weights.registry.REGISTRY[SIT_KEY], url=sit_server.url, size=len(payload),
                                sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(ditcli.weights.registry.REGISTRY, SIT_KEY, entry)
    assert entry.objective == SIT and entry.sampler == "sde"

    path = resolve_weights(entry)
    assert path == home / "SiT-XL-2-256x256.pt" and path.read_bytes() == payload and len(sit_server.requests) == 1

    out = tmp_path / "out"
    ok("sample", "--model", "SiT-XL/2", "--vae", tiny_vae, "--steps", 3, "--class", 1, "--num-per-class", 2,
       "--out", out)
    assert len(sit_server.requests) == 1  # found in DIT_HOME, not fetched again
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["model"] == "SiT-XL/2" and provenance["checkpoint"] == str(path)
    assert provenance["objective"] == {"objective": "flow", "time_direction": "noise-to-data"}
    assert provenance["sampler"] == "sde" and provenance["nfe"] == 3 and provenance["cfg"] == 4.0
    assert len(list(out.glob("0*.png"))) == 2
