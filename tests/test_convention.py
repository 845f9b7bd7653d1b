"""The timestep convention: a diffusers-trained DiT keeps its forward on import; reference weights keep theirs."""

import json
import re

import pytest
import torch
from conftest import perturbed, tiny_config
from safetensors import safe_open
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.model.dit import DiT, DiTConfig, timestep_embedding
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.convert import convert, parity_inputs
from ditcli.weights.record import Checkpoint


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_diffusers_dit(norm_eps: float = 1e-5, seed: int = 0):
    """diffusers' own DiTTransformer2DModel with its random init; the per-block embedder copies tied, as in any
    DiT (diffusers' final layer reads block 0's, and ours keeps one copy)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                  norm_eps=norm_eps).eval()
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            match = re.fullmatch(r"transformer_blocks\.(\d+)\.norm1\.emb\.(.*)", key)
            if match and match.group(1) != "0":
                value.copy_(state[f"transformer_blocks.0.norm1.emb.{match.group(2)}"])
    return model


@torch.no_grad()
def relative_gap(ours: DiT, theirs) -> float:
    x, t, y = parity_inputs(ours.config, batch=8)
    reference = theirs(x, timestep=t, class_labels=y).sample
    return ((ours(x, t, y) - reference).abs().max() / reference.abs().max()).item()


def test_shifted_frequencies_are_diffusers_timestep_features():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 250, 999])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)
    assert torch.allclose(timestep_embedding(t, 256, shift=1), theirs, atol=1e-6)
    assert not torch.allclose(timestep_embedding(t, 256), theirs, atol=1e-2)


@pytest.mark.parametrize("norm_eps", [1e-5, 1e-6])
def test_a_random_diffusers_dit_imports_with_diffusers_forward(tmp_path, norm_eps):
    theirs = random_diffusers_dit(norm_eps)
    theirs.save_pretrained(tmp_path / "transformer")
    checkpoint = load_checkpoint(tmp_path / "transformer")
    assert checkpoint.config.timestep_convention == "diffusers" and checkpoint.config.norm_eps == norm_eps
    assert relative_gap(checkpoint.build(), theirs) <= 1e-5
    # The same weights under the reference's forward are a different model.
    assert relative_gap(Checkpoint(checkpoint.state_dict, DiTConfig(**{
        **checkpoint.config.to_dict(), "timestep_convention": "reference", "norm_eps": 1e-6}), "x").build(),
        theirs) > 1e-2


def test_the_convention_survives_every_file_we_write(tmp_path):
    theirs = random_diffusers_dit()
    theirs.save_pretrained(tmp_path / "transformer")
    imported = tmp_path / "imported.safetensors"
    convert(tmp_path / "transformer", imported)
    with safe_open(str(imported), framework="pt") as f:
        stored = json.loads(f.metadata()["config"])
    assert (stored["timestep_convention"], stored["norm_eps"]) == ("diffusers", 1e-5)

    # Our diffusers export records it, and diffusers' own model runs the written folder as we do.
    report = convert(imported, tmp_path / "pipe", to="diffusers", vae=None)
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_ditcli"]["timestep_convention"] \
        == "diffusers"
    drift = report.parity["diffusers"]
    assert not drift["expected"] and drift["max_abs_diff"] <= 1e-5 * drift["max_abs_output"]
    back = load_checkpoint(tmp_path / "pipe")
    assert back.config == load_checkpoint(imported).config

    result = CliRunner().invoke(app, ["convert", "--info", str(tmp_path / "pipe")])
    assert result.exit_code == 0 and "timestep convention" in result.output
    assert "diffusers (recorded by the ditcli export)" in result.output, result.output


def test_reference_models_keep_the_reference_forward_and_say_so(tmp_path, golden, golden_model):
    meta, vectors = golden
    assert golden_model.config.timestep_convention == "reference" and golden_model.config.norm_eps == 1e-6
    # The same file exported to diffusers and read back is still the golden model.
    source = Checkpoint(golden_model.state_dict(), golden_model.config, "golden")
    save_safetensors(source, tmp_path / "golden.safetensors")
    convert(tmp_path / "golden.safetensors", tmp_path / "pipe", to="diffusers", vae=None, diffusers_check=False)
    model = load_checkpoint(tmp_path / "pipe").build()
    with torch.no_grad():
        out = model(vectors["forward.x"], vectors["forward.t"], vectors["forward.y"])
    assert torch.allclose(out, vectors["forward.out"], atol=1e-5 * vectors["forward.out"].abs().max().item())
    result = CliRunner().invoke(app, ["convert", "--info", str(tmp_path / "golden.safetensors"), "--json"])
    assert json.loads(result.output)["timestep_convention"] == "reference"


def test_files_written_before_the_field_read_as_reference(tmp_path):
    config = tiny_config()
    model = perturbed(DiT(config))
    save_safetensors(Checkpoint(model.state_dict(), config, "x"), tmp_path / "m.safetensors")
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    fields = json.loads(metadata["config"])
    del fields["timestep_convention"], fields["norm_eps"]
    save_file(load_file(str(tmp_path / "m.safetensors")), str(tmp_path / "old.safetensors"),
              metadata={**metadata, "config": json.dumps(fields)})
    old = load_checkpoint(tmp_path / "old.safetensors")
    assert old.config == config and "not recorded" in old.convention_source
