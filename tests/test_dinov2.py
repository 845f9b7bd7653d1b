"""Our DINOv2 ViT and EDM2's FD-DINOv2 preprocessing against outputs of the original code (tests/golden-dinov2).

Model A mirrors the register-free releases (`dinov2_vit*14`: offset 0.1, no antialias), Areg the `_reg` ones (4
registers, offset 0, antialias). The README there lists every call and the effect of each convention error.
"""

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ditcli.errors import UserError
from ditcli.evaluation.dinov2 import (
    RELEASED_WEIGHTS,
    DINOv2,
    DINOv2Config,
    edm2_preprocess,
    load_dinov2,
    read_state_dict,
)

GOLDEN = Path(__file__).resolve().parent / "golden-dinov2"
WEIGHTS = {"A": GOLDEN / "dinov2-A.pt", "Areg": GOLDEN / "dinov2-Areg.safetensors"}  # one of each format
SIZES = ("native", "down", "up", "rect")
MODEL_TOL = 1e-5  # README: 1e-4 is safe; 1e-5 still holds and also catches LayerNorm eps 1e-5 (2.3e-5)
TORCH_RESIZE_TOL = 2e-4  # README: float32 antialiased-bicubic kernels may differ by up to 9e-5 after /255/std
GOLDEN_HEADS = 3  # the tiny models have D = 48 and 3 heads, not D / 64


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN / "dinov2.vectors.safetensors"))


@pytest.fixture(scope="module")
def models() -> dict[str, DINOv2]:
    return {name: load_dinov2(path, num_heads=GOLDEN_HEADS) for name, path in WEIGHTS.items()}


def max_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return (ours.double() - ref.double()).abs().max().item()


def model_outputs(model: DINOv2, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """Every recorded call of README Section 6 for one model and input size, keyed by the golden tensor names."""
    H, W = x.shape[-2:]
    out = {"pos_embed": model.interpolate_pos_encoding((H // 14) * (W // 14), H, W, x.dtype),
           "tokens": model.prepare_tokens(x), "forward": model(x)}
    out |= {f"block{i}": block for i, block in enumerate(model.block_outputs(x, n=model.config.depth))}
    features = model.forward_features(x)
    out |= {f"ff.{key}": value for key, value in features._asdict().items() if value.shape[1:2] != (0,)}
    layers = model.get_intermediate_layers(x, n=model.config.depth, return_class_token=True, norm=True)
    for i, (patch, cls) in enumerate(layers):
        out |= {f"gil_all_norm.{i}.patch": patch, f"gil_all_norm.{i}.cls": cls}
    (patch, cls), = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True, norm=False)
    out |= {"gil_last_raw_reshape.patch": patch, "gil_last_raw_reshape.cls": cls}
    return {f"{prefix}.{key}": value for key, value in out.items()}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ["A", "Areg"])
def test_model_outputs_match_reference(vectors, models, name, size):
    with torch.no_grad():
        outputs = model_outputs(models[name], vectors[f"input.{size}.x"], f"{name}.{size}")
    recorded = {key for key in vectors if key.startswith(f"{name}.{size}.") and ".masked." not in key}
    assert recorded == outputs.keys()
    errors = {key: max_err(value, vectors[key]) for key, value in outputs.items()}
    assert max(errors.values()) <= MODEL_TOL, errors


@pytest.mark.parametrize("name", ["A", "Areg"])
def test_masked_forward_features_match_reference(vectors, models, name):
    masks = vectors[f"{name}.native.masked.mask"].bool()
    with torch.no_grad():
        features = models[name].forward_features(vectors["input.native.x"], masks=masks)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        assert max_err(getattr(features, key), vectors[f"{name}.native.masked.{key}"]) <= MODEL_TOL


@pytest.mark.parametrize("name", ["A", "Areg"])
def test_weights_load_from_both_formats_with_shape_read_config(vectors, models, name):
    config = models[name].config
    registers = 4 if name == "Areg" else 0
    assert (config.embed_dim, config.depth, config.grid_size, config.mlp_hidden) == (48, 2, 5, 192)
    assert (config.num_register_tokens, config.interpolate_antialias) == (registers, registers > 0)
    assert config.interpolate_offset == (0.0 if registers else 0.1)
    for key, value in models[name].state_dict().items():
        assert torch.equal(value, vectors[f"{name}.model.{key}"]), key
    assert DINOv2Config.from_state_dict(read_state_dict(WEIGHTS[name])).num_heads == 0  # 48 // 64: heads = D / 64


def test_released_sizes_round_trip_through_their_shapes():
    for dim, depth, swiglu, hidden in [(384, 12, False, 1536), (1024, 24, False, 4096), (1536, 40, True, 4096)]:
        config = DINOv2Config(dim, 2, dim // 64, 37, hidden, swiglu, num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0)
        with torch.device("meta"):  # shapes only
            state = DINOv2(config).state_dict()
        assert DINOv2Config.from_state_dict(state) == config
    assert DINOv2Config.from_state_dict(state).num_heads == 24  # ViT-g/14: 1536 / 64


def test_foreign_state_dict_is_refused(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, 48)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not a DINOv2 backbone"):
        load_dinov2(tmp_path / "bad.pt")
    state = read_state_dict(WEIGHTS["A"]) | {"head.weight": torch.zeros(2, 48)}
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="unexpected"):
        load_dinov2(tmp_path / "extra.pt", num_heads=GOLDEN_HEADS)


@pytest.mark.parametrize("src", ["src256", "src32"])
def test_edm2_preprocessing_matches_reference(vectors, models, src):
    u8 = vectors[f"edm2.{src}.u8"].to(torch.uint8)
    pil, resized = edm2_preprocess(u8, "pil"), edm2_preprocess(u8, "torch")
    assert torch.equal(pil, vectors[f"edm2.{src}.pil.model_input"])
    # The copy keeps the torch-mode input of image 1 (the noise image) only; the features below check all three
    assert max_err(resized[1:2], vectors[f"edm2.{src}.torch.model_input"]) <= TORCH_RESIZE_TOL
    with torch.no_grad():
        for name, model in models.items():
            assert max_err(model(pil), vectors[f"edm2.{src}.pil.{name}.feature"]) <= MODEL_TOL
            assert max_err(model(resized), vectors[f"edm2.{src}.torch.{name}.feature"]) <= 1e-4
    with pytest.raises(ValueError, match="resize_mode"):
        edm2_preprocess(u8, "bilinear")


def test_released_weights_table():
    for name, weights in RELEASED_WEIGHTS.items():
        assert weights.url.endswith(f"/{name}/{name}_pretrain.pth")
        assert len(weights.sha256) == 64 and weights.size > 10**8


# The conventions the golden vectors pin down: each error moves the outputs far beyond the tolerance (README Section 2).

def _broken_forward(vectors, name, size, edit=None):
    model = load_dinov2(WEIGHTS[name], num_heads=GOLDEN_HEADS)
    if edit is not None:
        edit(model)
    with torch.no_grad():
        return max_err(model(vectors[f"input.{size}.x"]), vectors[f"{name}.{size}.forward"])


def _unit_layer_scale(model):
    for block in model.blocks:
        block.ls1.gamma.fill_(1.0)
        block.ls2.gamma.fill_(1.0)


def _transposed_grid(model):
    grid, patch = model.config.grid_size, model.pos_embed.data[:, 1:]
    patch.copy_(patch.reshape(1, grid, grid, -1).transpose(1, 2).reshape(patch.shape))  # (1, M * M, D)


def _tanh_gelu(model):
    for block in model.blocks:
        block.mlp.act.approximate = "tanh"


@pytest.mark.parametrize("name", ["A", "Areg"])
def test_convention_errors_break_the_match(vectors, name, monkeypatch):
    assert _broken_forward(vectors, name, "native", _unit_layer_scale) > 0.5
    assert _broken_forward(vectors, name, "native", _transposed_grid) > 0.1
    assert _broken_forward(vectors, name, "native", _tanh_gelu) > 1e-4
    bicubic = F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda *a, **k: bicubic(*a, **(k | {"mode": "bilinear"})))
    assert _broken_forward(vectors, name, "down") > 0.01
    monkeypatch.undo()
    assert _broken_forward(vectors, name, "down") <= MODEL_TOL


def test_the_copied_files_are_the_ones_the_readme_lists():
    """Each file of tests/golden-dinov2 has its size and sha256 in the folder's README (the vectors file is a trimmed
    copy: a changed copy must update its line)."""
    text = (GOLDEN / "README.md").read_text()
    for path in sorted(GOLDEN.iterdir()):
        if path.name != "README.md":
            data = path.read_bytes()
            assert f"| `{path.name}` | {len(data)} | `{hashlib.sha256(data).hexdigest()}` |" in text, path.name

