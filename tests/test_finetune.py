"""dit train --init-from: loss continuity, label rows by name or id, image size, architecture checks, resume rules,
and a source whose EMA is still mostly its initial weights."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import perturbed
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.diffusion.objectives import FlowObjective
from ditcli.errors import UserError
from ditcli.model.dit import DiT, DiTConfig, sincos_2d
from ditcli.sampling.request import stale_weights
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer
from ditcli.weights.checkpoint import load_checkpoint, save_safetensors
from ditcli.weights.diffusers_format import to_diffusers
from ditcli.weights.ema import EmaRecord
from ditcli.weights.record import Checkpoint

TINY = dict(model="DiT-S/2", hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
            global_batch=8, lr=1e-3, ema_decay=0.9, log_every=1, ckpt_every=1000, seed=3)
TABLE = "y_embedder.embedding_table.weight"
NAMES = [f"class-{i}" for i in range(10)]


def npz(path, names, num=24, size=8, seed=0):
    """Images with one pattern per class (learnable), labels cycling over the classes, and `names` if given."""
    rng = np.random.default_rng(seed)
    count = len(names) if names is not None else 3
    labels = np.arange(num) % count
    patterns = rng.integers(0, 256, size=(count, size, size, 1))
    images = np.clip(patterns[labels] + rng.normal(0, 20, size=(num, size, size, 1)), 0, 255).astype(np.uint8)
    arrays = dict(images=images, labels=labels)
    if names is not None:
        arrays["class_names"] = np.array(names)
    np.savez(path, **arrays)
    return path


def trainer(tmp_path, data, name, **overrides) -> Trainer:
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / name), **{**TINY, "steps": 1, **overrides}))
    trainer.setup()
    return trainer


def source_file(path, names=NAMES, ema: EmaRecord | None = None, **overrides) -> Checkpoint:
    """A tiny 10-class pixel DiT (weights off the zero init) saved as our .safetensors, with `ema` as its record."""
    config = DiTConfig(**{**dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                                 num_classes=len(names or NAMES)), **overrides})
    model = perturbed(DiT(config), seed=1)
    checkpoint = Checkpoint(model.state_dict(), config, "safetensors", class_names=names,
                            codec={"kind": "pixel", "channels": 1}, ema=ema)
    save_safetensors(checkpoint, path)
    return checkpoint


@torch.no_grad()
def fixed_loss(trainer: Trainer, model: DiT) -> float:
    """The training loss of `model` on one fixed batch, timesteps and noise (no label dropout)."""
    generator = torch.Generator().manual_seed(0)
    indices = np.arange(16) % len(trainer.data)
    x_start = trainer.data.x_start(indices, np.zeros(16, np.int64), torch.zeros(16, 1, 8, 8))
    t = torch.randint(0, trainer.objective.num_steps, (16,), generator=generator)
    noise = torch.randn(x_start.shape, generator=generator)
    x_t = trainer.objective.q_sample(x_start, t, noise)
    out = model.eval()(x_t, t, torch.from_numpy(trainer.images.labels[indices]), torch.zeros(16, dtype=torch.bool))
    return trainer.objective.training_losses(out, x_start, x_t, t, noise)["loss"].mean().item()


def test_fine_tuning_starts_at_the_trained_loss_far_below_scratch(tmp_path):
    data = npz(tmp_path / "x.npz", ["a", "b", "c"])
    trained = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run"), **{**TINY, "steps": 40, "lr": 3e-3}))
    trained.run()
    tuned = trainer(tmp_path, data, "tuned", init_from=str(tmp_path / "run" / "ckpt-0000040.pt"))
    scratch = trainer(tmp_path, data, "scratch")
    trained_loss, tuned_loss = fixed_loss(trained, trained.ema), fixed_loss(tuned, tuned.model)
    assert tuned_loss == pytest.approx(trained_loss, rel=1e-5)  # the EMA weights, by default
    assert tuned_loss < 0.5 * fixed_loss(scratch, scratch.model), (tuned_loss, fixed_loss(scratch, scratch.model))
    # EMA starts from the loaded weights, the optimizer from nothing.
    assert all(torch.equal(a, b) for a, b in zip(tuned.ema.state_dict().values(), tuned.model.state_dict().values()))
    assert not tuned.optimizer.state
    raw = trainer(tmp_path, data, "raw", init_from=str(tmp_path / "run" / "ckpt-0000040.pt"), init_weights="model")
    assert fixed_loss(raw, raw.model) == pytest.approx(fixed_loss(trained, trained.model), rel=1e-5)


def test_a_subset_of_named_classes_keeps_exactly_those_rows(tmp_path):
    source = source_file(tmp_path / "ten.safetensors")
    picked = ["class-7", "class-2", "class-9", "class-4"]
    tuned = trainer(tmp_path, npz(tmp_path / "four.npz", picked), "four", init_from=str(tmp_path / "ten.safetensors"))
    table, rows = tuned.model.state_dict()[TABLE], source.state_dict[TABLE]
    assert table.shape == (5, 32)
    assert torch.equal(table[:4], rows[[7, 2, 9, 4]]) and torch.equal(table[4], rows[10])  # the null row too
    assert tuned.summary()["label_rows"] == "4 copied by name, 0 fresh, null row copied"
    # Everything else is the source's.
    for key, value in source.state_dict.items():
        if key != TABLE:
            assert torch.equal(tuned.model.state_dict()[key], value), key


def test_unknown_names_start_fresh_and_unnamed_data_maps_by_id(tmp_path):
    source = source_file(tmp_path / "ten.safetensors")
    names = ["class-3", "Zebra", "CLASS_5", "yak"]  # names match case- and separator-insensitively
    data = npz(tmp_path / "mixed.npz", names)
    tuned = trainer(tmp_path, data, "mixed", init_from=str(tmp_path / "ten.safetensors"))
    fresh = trainer(tmp_path, data, "fresh").model.state_dict()[TABLE]
    table, rows = tuned.model.state_dict()[TABLE], source.state_dict[TABLE]
    assert torch.equal(table[0], rows[3]) and torch.equal(table[2], rows[5]) and torch.equal(table[4], rows[10])
    assert torch.equal(table[1], fresh[1]) and torch.equal(table[3], fresh[3])  # as a fresh model's
    assert tuned.summary()["label_rows"] == "2 copied by name, 2 fresh, null row copied"

    ids = trainer(tmp_path, npz(tmp_path / "ids.npz", None), "ids", init_from=str(tmp_path / "ten.safetensors"))
    assert torch.equal(ids.model.state_dict()[TABLE][:3], rows[:3])
    assert ids.summary()["label_rows"] == "3 copied by id, 0 fresh, null row copied"


def test_another_image_size_rebuilds_the_position_table(tmp_path):
    source = source_file(tmp_path / "ten.safetensors")
    data = npz(tmp_path / "big.npz", NAMES, size=16)
    tuned = trainer(tmp_path, data, "big", init_from=str(tmp_path / "ten.safetensors"), image_size=16)
    state = tuned.model.state_dict()
    assert torch.equal(state["pos_embed"], sincos_2d(32, 8)[None])
    assert torch.equal(state["blocks.1.attn.qkv.weight"], source.state_dict["blocks.1.attn.qkv.weight"])
    assert tuned.summary()["pos_embed"] == "rebuilt for 8x8 (source 4x4)"


def test_an_architecture_mismatch_is_one_line_naming_each_difference(tmp_path):
    source_file(tmp_path / "ten.safetensors")
    data = npz(tmp_path / "x.npz", NAMES)
    with pytest.raises(UserError, match=r"match the model to train: width 32 \(source\) vs 64 \(train") as raised:
        trainer(tmp_path, data, "wide", init_from=str(tmp_path / "ten.safetensors"), hidden_size=64)
    assert "train the source's shape: --model DiT-S/2 --hidden-size 32 --depth 2 --num-heads 2" in str(raised.value)
    with pytest.raises(UserError, match=r"width 32 \(source\) vs 64; depth 2 \(source\) vs 3; channels 1 "):
        trainer(tmp_path, data, "many", init_from=str(tmp_path / "ten.safetensors"), hidden_size=64, depth=3,
                channels=3)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--model", "DiT-S/2", "--hidden-size",
            "64", "--depth", "2", "--num-heads", "2", "--image-size", "8", "--vae", "none", "--channels", "1",
            "--steps", "1", "--init-from", str(tmp_path / "ten.safetensors")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.output.startswith("error: --init-from ") \
        and result.output.count("\n") == 1, result.output
    assert not (tmp_path / "cli").exists()  # refused before anything is written


def test_a_source_of_another_objective_warns_and_a_reversed_flow_is_refused(tmp_path):
    """A flow file fine-tuned as DDPM (or the reverse) is a choice, said aloud; a flow whose time runs the other way
    would train against its own velocity's sign."""
    flow = replace(source_file(tmp_path / "ddpm.safetensors", learn_sigma=False),
                   objective=FlowObjective("noise-to-data"))
    save_safetensors(flow, tmp_path / "flow.safetensors")
    data = npz(tmp_path / "x.npz", NAMES)
    source = dict(init_from=str(tmp_path / "flow.safetensors"), learn_sigma=False)
    run, events = watched(tmp_path, data, "as-ddpm", **source)
    run.setup()
    assert warnings(events) == [f"warning: --init-from {tmp_path / 'flow.safetensors'} was trained as flow, time "
                                "noise-to-data; this run trains it as ddpm, so it starts far from its source's "
                                "optimum; pass --objective flow to fine-tune it as it was trained"]
    run, events = watched(tmp_path, data, "as-flow", objective="flow", **source)
    run.setup()
    assert warnings(events) == []
    with pytest.raises(UserError, match="time noise-to-data, this run's time is data-to-noise"):
        trainer(tmp_path, data, "reversed", objective="flow", time_direction="data-to-noise", **source)
    released = tmp_path / "released.pt"  # a plain state dict records no objective: nothing to warn about
    torch.save(flow.state_dict, released)
    run, events = watched(tmp_path, data, "released", objective="flow", init_from=str(released), learn_sigma=False)
    run.setup()
    assert warnings(events) == []


def test_init_from_with_resume_auto_starts_once_then_continues(tmp_path):
    source = source_file(tmp_path / "ten.safetensors")
    data = npz(tmp_path / "x.npz", NAMES)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), init_from=str(tmp_path / "ten.safetensors"),
                         **{**TINY, "steps": 2})
    first = Trainer(config, resume="auto")
    first.setup()
    weight = "x_embedder.proj.weight"
    assert first.init is not None and torch.equal(first.ema.state_dict()[weight], source.state_dict[weight])
    first.run()
    # The source changes on disk: a resumed run must take its weights from the checkpoint, not from the source.
    (tmp_path / "ten.safetensors").unlink()
    source_file(tmp_path / "ten.safetensors", hidden_size=64)
    again = Trainer(TrainConfig(**{**config.to_dict(), "steps": 3}), resume="auto")
    again.run()
    trained = load_checkpoint(tmp_path / "run" / "ckpt-0000002.pt").state_dict
    assert again.init is None and again.state.step == 3 and again.model_config.hidden_size == 32
    assert not torch.equal(again.ema.state_dict()[weight], trained[weight])  # it trained on from the checkpoint
    with pytest.raises(UserError, match=r"init_from: '.*ten.safetensors' -> 'other.safetensors'"):
        Trainer(TrainConfig(**{**config.to_dict(), "steps": 4, "init_from": "other.safetensors"}), resume="auto").run()
    with pytest.raises(UserError, match="--init-from and --resume CHECKPOINT exclude each other"):
        Trainer(config, resume=str(tmp_path / "run" / "ckpt-0000003.pt"))
    with pytest.raises(UserError, match="unknown --init-weights"):
        TrainConfig(data="x", init_weights="best")


def test_a_diffusers_source_keeps_its_forward_through_training_and_resume(tmp_path):
    source = source_file(tmp_path / "ten.safetensors", timestep_convention="diffusers", norm_eps=1e-5)
    to_diffusers(source, tmp_path / "pipe", vae=None)
    data = npz(tmp_path / "x.npz", NAMES)
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), init_from=str(tmp_path / "pipe"),
                         **{**TINY, "steps": 2})
    Trainer(config).run()
    checkpoint = load_checkpoint(tmp_path / "run" / "ckpt-0000002.pt")
    assert (checkpoint.config.timestep_convention, checkpoint.config.norm_eps) == ("diffusers", 1e-5)
    resumed = Trainer(TrainConfig(**{**config.to_dict(), "init_from": None, "steps": 3}), resume="auto")
    resumed.run()
    assert resumed.state.step == 3 and resumed.model.config.timestep_convention == "diffusers"
    assert resumed.model.t_embedder.frequency_shift == 1 and resumed.ema.blocks[0].norm2.eps == 1e-5


def test_cli_start_up_table_reports_the_mapping(tmp_path):
    source_file(tmp_path / "ten.safetensors")
    data = npz(tmp_path / "four.npz", ["class-1", "class-0", "new-a", "new-b"])
    args = ["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--model", "DiT-S/2", "--hidden-size",
            "32", "--depth", "2", "--num-heads", "2", "--image-size", "8", "--vae", "none", "--channels", "1",
            "--global-batch", "4", "--steps", "2", "--log-every", "1", "--init-from", str(tmp_path / "ten.safetensors")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 copied by name, 2 fresh, null row copied" in result.output
    records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    longer = list(args)
    longer[longer.index("--steps") + 1] = "3"
    result = CliRunner().invoke(app, longer + ["--resume", "auto"])
    assert result.exit_code == 0 and "copied by name" not in result.output, result.output  # resumed, not re-initialised
    records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    result = CliRunner().invoke(app, args + ["--resume", str(tmp_path / "cli" / "ckpt-0000003.pt")])
    assert result.exit_code == 2 and "exclude each other" in result.output


def test_a_bad_source_fails_before_the_vae_or_any_latent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The VAE counts as found (training locates it before reading the data); it must still never load.
    monkeypatch.setattr("ditcli.training.trainer.locate_vae", lambda *args, **kwargs: None)
    source_file(tmp_path / "ten.safetensors")
    data = npz(tmp_path / "x.npz", NAMES, size=16)
    latent = {**TINY, "vae": "stabilityai/sd-vae-ft-ema", "image_size": 16, "channels": 3}
    with pytest.raises(UserError, match=r"channels 1 \(source\) vs 4"):  # not the VAE's absence from the cache
        Trainer(TrainConfig(data=str(data), out=str(tmp_path / "run"), init_from=str(tmp_path / "ten.safetensors"),
                            **latent)).setup()
    with pytest.raises(UserError, match=r"^--init-from missing.pt not found \(pass a checkpoint file"):
        trainer(tmp_path, npz(tmp_path / "y.npz", NAMES), "missing", init_from="missing.pt")
    assert not (tmp_path / "run" / "latents").exists()


def test_every_source_format_gives_the_same_start(tmp_path):
    """A released-style .pt, a reference train.py checkpoint, our .safetensors and a diffusers folder of one model."""
    import argparse

    from ditcli.training import finetune

    source = source_file(tmp_path / "ours.safetensors", names=None, num_classes=10)
    state = source.state_dict
    torch.save(state, tmp_path / "released.pt")
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(image_size=64, num_classes=10)},
               tmp_path / "train.pt")
    to_diffusers(source, tmp_path / "pipe", vae=None)
    target = replace(source.config, num_classes=4)
    fresh = DiT(target).state_dict()
    for name in ("ours.safetensors", "released.pt", "train.pt", "pipe"):
        init = finetune.init_from(str(tmp_path / name), target, fresh, None)
        assert init.labels.matched_by == "id" and init.labels.copied == 4, name
        assert torch.equal(init.state_dict[TABLE][:4], state[TABLE][:4]) and torch.equal(init.state_dict[TABLE][4],
                                                                                           state[TABLE][10])
        assert all(torch.equal(init.state_dict[k], v) for k, v in state.items() if k != TABLE), name


# A source whose EMA is still mostly its initial weights: 30 steps at DiT's decay 0.9999 leave it 99.7% initial.

def watched(tmp_path, data, name, **overrides) -> tuple[Trainer, list[str]]:
    """A Trainer that records the messages of its warning events."""
    events = []
    config = TrainConfig(data=str(data), out=str(tmp_path / name), **{**TINY, "steps": 1, **overrides})
    return Trainer(config, on_event=lambda kind, info: events.append((kind, info))), events


def warnings(events: list) -> list[str]:
    return [info["message"] for kind, info in events if kind == "warning"]


@pytest.fixture(scope="module")
def stale_base(tmp_path_factory):
    """A short base run at decay 0.9999: (its data, the trained Trainer, its checkpoint, its warnings)."""
    root = tmp_path_factory.mktemp("base")
    data = npz(root / "x.npz", ["a", "b", "c"])
    base, events = watched(root, data, "run", steps=30, lr=3e-3, ema_decay=0.9999)
    base.run()
    return data, base, str(root / "run" / "ckpt-0000030.pt"), warnings(events)


def test_a_stale_ema_source_starts_from_its_model_weights_and_says_so(stale_base, tmp_path):
    data, base, ckpt, _ = stale_base
    tuned, events = watched(tmp_path, data, "tuned", init_from=ckpt)
    tuned.setup()
    scratch = trainer(tmp_path, data, "scratch")
    assert tuned.config.init_weights is None and tuned.init.weights == "model"
    tuned_loss, scratch_loss = fixed_loss(tuned, tuned.model), fixed_loss(scratch, scratch.model)
    assert tuned_loss == pytest.approx(fixed_loss(base, base.model), rel=1e-5)  # where the base run ended
    assert tuned_loss < 0.5 * scratch_loss, (tuned_loss, scratch_loss)
    assert fixed_loss(base, base.ema) > 0.8 * scratch_loss  # what the EMA would have given: nearly scratch
    [line] = warnings(events)
    assert line.startswith(f"warning: --init-from {ckpt}: starting from its model weights, not its EMA weights, "
                           "which have followed only 30 steps at decay 0.9999") and "--init-weights ema" in line
    assert tuned.summary()["init_from"] == f"{ckpt} (ditcli training checkpoint, model weights: its EMA is 100% " \
                                           "initial weights)"
    args = ["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--model", "DiT-S/2", "--hidden-size",
            "32", "--depth", "2", "--num-heads", "2", "--image-size", "8", "--vae", "none", "--channels", "1",
            "--global-batch", "8", "--steps", "1", "--init-from", ckpt]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and result.output.count("starting from its model weights") == 1, result.output


def test_an_explicit_ema_choice_is_kept_with_a_warning(stale_base, tmp_path):
    data, base, ckpt, _ = stale_base
    kept, events = watched(tmp_path, data, "kept", init_from=ckpt, init_weights="ema")
    kept.setup()
    assert kept.init.weights == "ema"
    assert fixed_loss(kept, kept.model) == pytest.approx(fixed_loss(base, base.ema), rel=1e-5)
    [line] = warnings(events)
    assert "gives its EMA weights (--init-weights ema), which have followed only 30 steps" in line
    assert line.endswith("so the fine-tune starts near scratch; pass --init-weights model, or train the source longer")
    assert kept.summary()["init_from"].endswith("(ditcli training checkpoint, ema weights, 100% initial weights)")
    raw, events = watched(tmp_path, data, "raw", init_from=ckpt, init_weights="model")
    raw.setup()
    assert raw.init.weights == "model" and warnings(events) == []


def test_a_single_weights_source_with_a_stale_ema_keeps_it_and_warns(tmp_path):
    source = source_file(tmp_path / "stale.safetensors", ema=EmaRecord(0.9999, False, 30))
    data = npz(tmp_path / "x.npz", NAMES)
    tuned, events = watched(tmp_path, data, "tuned", init_from=str(tmp_path / "stale.safetensors"))
    tuned.setup()
    assert tuned.init.weights == "ema"
    assert all(torch.equal(tuned.model.state_dict()[k], v) for k, v in source.state_dict.items())
    [line] = warnings(events)
    assert "stale.safetensors gives only EMA weights, which have followed only 30 steps at decay 0.9999" in line
    assert "train the source longer" in line and "--init-weights model" in line
    assert tuned.summary()["init_from"].endswith("(safetensors, ema weights, 100% initial weights)")
    # An EMA that has moved on, or one that started from its own source's weights, is no reason to warn.
    for ema in (EmaRecord(0.9999, False, 50_000), EmaRecord(0.9999, False, 30, from_source=True)):
        source_file(tmp_path / "ok.safetensors", ema=ema)
        fine, events = watched(tmp_path, data, "fine", init_from=str(tmp_path / "ok.safetensors"))
        fine.setup()
        assert warnings(events) == [] and fine.summary()["init_from"].endswith("(safetensors, ema weights)")
        (tmp_path / "ok.safetensors").unlink()


def test_a_fine_tunes_ema_counts_from_its_source_not_from_noise(stale_base, tmp_path):
    data, _, ckpt, base_warnings = stale_base
    noise = "samples will look like noise"
    assert any(noise in line for line in base_warnings)  # from scratch, the short run does warn
    assert noise in stale_weights(load_checkpoint(ckpt))[0]
    config = TrainConfig(data=str(data), out=str(tmp_path / "tuned"), init_from=ckpt,
                         **{**TINY, "steps": 3, "ema_decay": 0.9999})
    events = []
    Trainer(config, on_event=lambda kind, info: events.append((kind, info)), resume="auto").run()
    assert not any(noise in line for line in warnings(events))
    assert "so 100% of them are still the --init-from source's weights" in warnings(events)[-1]  # the end's line
    tuned = tmp_path / "tuned" / "ckpt-0000003.pt"
    assert load_checkpoint(tuned).ema == EmaRecord(0.9999, False, 3, from_source=True)
    assert noise not in stale_weights(load_checkpoint(tuned))[0]
    # A resume without --init-from, and a conversion, keep the record.
    events.clear()
    Trainer(TrainConfig(**{**config.to_dict(), "init_from": None, "steps": 4}),
            on_event=lambda kind, info: events.append((kind, info)), resume="auto").run()
    assert [noise in line for line in warnings(events)] == [False]
    save_safetensors(load_checkpoint(tmp_path / "tuned" / "ckpt-0000004.pt"), tmp_path / "tuned.safetensors")
    converted = load_checkpoint(tmp_path / "tuned.safetensors")
    assert converted.ema == EmaRecord(0.9999, False, 4, from_source=True) and noise not in stale_weights(converted)[0]
