"""The DiT model: presets, init, shapes, parameter/FLOP counts, loading and its errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from conftest import GOLDEN, perturbed, tiny_config

import ditcli.model.dit
from ditcli import load_model
from ditcli.errors import UserError
from ditcli.model.dit import (
    DiT,
    DiTConfig,
    count_parameters,
    forward_macs,
    preset,
    preset_names,
    timestep_embedding,
)
from ditcli.weights.checkpoint import load_checkpoint
from ditcli.weights.record import check_state_dict


def test_fresh_model_outputs_exactly_zero():
    model = DiT(tiny_config()).eval()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 5, 10]))
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_unpatchify_inverts_patchify():
    config = tiny_config(patch_size=4, input_size=16, learn_sigma=False)
    model = DiT(config)
    x = torch.randn(2, 4, 16, 16)
    p = config.patch_size
    tokens = x.view(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)  # (N, T, p*p*C)
    assert torch.equal(model.unpatchify(tokens), x)


def test_every_block_gets_a_contiguous_residual_stream():
    """A transposed token view would set the layout of every residual add after it (docs/benchmarks.md: 0.13 s of a
    bf16 B/2 forward), so the stream must enter each block, and leave it, contiguous."""
    model = DiT(tiny_config()).eval()
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].is_contiguous(),
                                                                           out.is_contiguous())))
    with torch.no_grad():
        model(torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([0, 1]))
    assert seen == [(True, True)] * len(model.blocks)


def test_xl2_parameter_and_flop_counts_without_allocating():
    config = preset("DiT-XL/2")
    assert count_parameters(config) == 675_129_632
    assert round(forward_macs(config) / 1e9, 1) == 118.6


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_on_meta(name):
    config = preset(name)
    with torch.device("meta"):
        model = DiT(config)
    assert len(model.blocks) == config.depth
    assert model.final_layer.linear.out_features == config.patch_size ** 2 * 8


def test_custom_configurations():
    config = DiTConfig(input_size=12, patch_size=3, in_channels=1, hidden_size=48, depth=1, num_heads=3,
                       num_classes=7, learn_sigma=False, class_dropout_prob=0.0)
    model = perturbed(DiT(config))
    out = model(torch.randn(2, 1, 12, 12), torch.tensor([1, 2]), torch.tensor([0, 6]))
    assert out.shape == (2, 1, 12, 12)
    assert model.y_embedder.embedding_table.num_embeddings == 7


@pytest.mark.parametrize("fields, message", [
    (dict(input_size=10, patch_size=4), "not divisible by patch_size"),
    (dict(hidden_size=30, num_heads=4), "not divisible by num_heads"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
])
def test_invalid_configs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        preset("DiT-XXL/2")


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([0.0]), 8)
    assert torch.equal(emb[0, :4], torch.ones(4)) and torch.equal(emb[0, 4:], torch.zeros(4))


def test_label_dropout_only_in_training_mode():
    model = perturbed(DiT(tiny_config(class_dropout_prob=0.5)))
    x, t, y = torch.randn(64, 4, 8, 8), torch.full((64,), 10), torch.zeros(64, dtype=torch.long)
    reference = model(x, t, y)
    assert torch.equal(model(x, t, y), reference)  # eval: never dropped
    model.train()
    torch.manual_seed(0)
    trained = model(x, t, y)
    null = model.eval()(x, t, torch.full_like(y, 10))
    dropped = [i for i in range(64) if torch.allclose(trained[i], null[i], atol=1e-6)]
    assert 10 < len(dropped) < 54


def test_gradient_checkpointing_runs_and_gives_the_same_gradients(monkeypatch):
    model = perturbed(DiT(tiny_config())).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 2])
    mask = torch.zeros(2, dtype=torch.bool)
    checkpointed_blocks = []

    def counting_checkpoint(block, *args, **kwargs):
        checkpointed_blocks.append(block)
        return torch.utils.checkpoint.checkpoint(block, *args, **kwargs)

    monkeypatch.setattr(ditcli.model.dit, "checkpoint", counting_checkpoint)
    model(x, t, y, mask).square().sum().backward()
    assert checkpointed_blocks == []  # off by default
    plain = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.grad_checkpointing = True
    model(x, t, y, mask).square().sum().backward()
    assert checkpointed_blocks == list(model.blocks)  # every block, once
    checkpointed = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert checkpointed.keys() == plain.keys() and len(plain) == sum(p.requires_grad for p in model.parameters())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_golden_checkpoint_loads_strictly():
    model = load_model(GOLDEN / "tiny-dit.official.pt", num_heads=4)
    assert not model.training and model.config.depth == 2 and model.config.num_classes == 10
    with pytest.raises(UserError, match="cannot infer the number of attention heads for hidden size 64"):
        load_model(GOLDEN / "tiny-dit.official.pt")


def test_extra_block_is_named_in_one_line():
    state = torch.load(GOLDEN / "tiny-dit.official.pt", weights_only=True)
    state.update({k.replace("blocks.1.", "blocks.2."): v for k, v in state.items() if k.startswith("blocks.1.")})
    config = load_checkpoint(GOLDEN / "tiny-dit.official.pt", num_heads=4).config
    with pytest.raises(UserError, match=r"unexpected keys blocks\.2\.\*.*3 blocks found, expected 2"):
        check_state_dict(state, config)


def test_wrong_shape_is_named(tmp_path):
    state = torch.load(GOLDEN / "tiny-dit.official.pt", weights_only=True)
    config = load_checkpoint(GOLDEN / "tiny-dit.official.pt", num_heads=4).config
    state["blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.proj\.weight has shape \(64, 32\), expected \(64, 64\)"):
        check_state_dict(state, config)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"hello": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="not a DiT checkpoint: missing x_embedder.proj.weight"):
        load_model(path)


def test_initialisation_draws_only_from_the_generator_it_is_given():
    config = tiny_config()
    before = torch.get_rng_state()
    first = DiT(config, generator=torch.Generator().manual_seed(1)).state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    torch.manual_seed(123)  # and does not matter
    again = DiT(config, generator=torch.Generator().manual_seed(1)).state_dict()
    other = DiT(config, generator=torch.Generator().manual_seed(2)).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert all(torch.isfinite(v).all() for v in first.values())  # nothing left as uninitialised memory
    fresh = DiT(config).state_dict()  # the reference's initialisation: same zeros, same tables, same spread
    for key, value in first.items():
        assert torch.equal(value == 0, fresh[key] == 0), key
    assert torch.equal(first["pos_embed"], fresh["pos_embed"])
    model = DiT(config, generator=torch.Generator().manual_seed(1)).eval()
    assert torch.count_nonzero(model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))) == 0


def test_building_on_the_meta_device_leaves_torch_dynamo_unimported():
    """Reading a checkpoint builds a DiT on the meta device; the Python kernel of a meta `normal_` would import
    torch._dynamo (2 s of start-up). Seeded models are built there too, with the same weights as ever."""
    script = ("import sys, torch\n"
              "from ditcli.weights.checkpoint import load_checkpoint\n"
              "from ditcli.model.dit import DiT\n"
              "checkpoint = load_checkpoint(sys.argv[1])\n"
              "checkpoint.build('cpu')\n"
              "DiT(checkpoint.config, generator=torch.Generator().manual_seed(0))\n"
              "print('torch._dynamo' in sys.modules)\n")
    weights = Path(__file__).resolve().parents[1] / "weights" / "fashion-mnist.safetensors"
    result = subprocess.run([sys.executable, "-c", script, str(weights)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
