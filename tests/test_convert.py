"""`dit convert`: lossless formats, the diffusers key map checked by diffusers itself, and hostile files refused."""

import argparse
import json
import pickle
import random
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import GOLDEN, ok, perturbed, tiny_config
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.diffusion.ddpm import named_betas
from ditcli.errors import UserError
from ditcli.model.dit import DiT, DiTConfig, count_parameters
from ditcli.weights.checkpoint import (
    TRAIN_FORMAT,
    load_checkpoint,
    load_model,
    save_safetensors,
)
from ditcli.weights.convert import convert, info, parity_inputs
from ditcli.weights.diffusers_format import (
    from_diffusers_weights,
    read_diffusers,
    to_diffusers_state,
)
from ditcli.weights.record import Checkpoint

GOLDEN_PT = "tiny-dit.official.pt"
CLASS_NAMES = [f"class {i}, alias {i}" for i in range(10)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(*args):
    result = CliRunner().invoke(app, ["convert", *map(str, args)])
    return result.exit_code, result.output


def tiny_checkpoint(seed: int = 0, **overrides) -> Checkpoint:
    model = perturbed(DiT(tiny_config(**overrides)), seed=seed)
    return Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, model.config, "test",
                      class_names=CLASS_NAMES[: model.config.num_classes],
                      codec={"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"})


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random AutoencoderKL folder, so the exported pipeline has a VAE without the network."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], block_out_channels=[8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8)
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_vae):
    """A tiny model saved as our safetensors, then converted to a DiTPipeline folder through the CLI."""
    root = tmp_path_factory.mktemp("export")
    source = tiny_checkpoint()
    save_safetensors(source, root / "source.safetensors")
    code, output = run(root / "source.safetensors", root / "pipe", "--to", "diffusers", "--vae", tiny_vae, "--json")
    assert code == 0, output
    return source, root / "pipe", json.loads(output)


def test_golden_official_pt_to_safetensors_gives_identical_outputs(tmp_path, golden, golden_model):
    _, vectors = golden
    report = convert(GOLDEN / GOLDEN_PT, tmp_path / "tiny.safetensors", num_heads=4)
    assert report.parity["roundtrip"]["identical_weights"] and report.parity["roundtrip"]["max_abs_diff"] == 0
    model = load_model(tmp_path / "tiny.safetensors")  # no --num-heads: the metadata rebuilds the model
    with torch.no_grad():
        out = model(vectors["forward.x"], vectors["forward.t"], vectors["forward.y"])
        ref = golden_model(vectors["forward.x"], vectors["forward.t"], vectors["forward.y"])
    assert torch.equal(out, ref)
    assert torch.allclose(out, vectors["forward.out"], atol=1e-4 * vectors["forward.out"].abs().max().item())


def test_reference_train_checkpoint_with_namespace_converts(tmp_path):
    ema, raw = tiny_checkpoint(seed=1), tiny_checkpoint(seed=2)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]).state_dict()
    args = argparse.Namespace(image_size=64, num_classes=10, vae="mse", global_seed=0, epochs=1400)
    torch.save({"model": raw.state_dict, "ema": ema.state_dict, "opt": opt, "args": args}, tmp_path / "0100000.pt")
    for weights, expected in (("ema", ema), ("model", raw)):
        out = tmp_path / f"{weights}.safetensors"
        code, output = run(tmp_path / "0100000.pt", out, "--weights", weights, "--num-heads", 2)
        assert code == 0, output
        loaded = load_checkpoint(out)
        assert loaded.weights == weights and loaded.codec["vae"] == "stabilityai/sd-vae-ft-mse"
        assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.state_dict.items())


def test_fp16_output_stores_half_weights(tmp_path):
    save_safetensors(tiny_checkpoint(), tmp_path / "a.safetensors")
    report = convert(tmp_path / "a.safetensors", tmp_path / "b.safetensors", dtype="fp16")
    assert {v.dtype for v in load_file(str(tmp_path / "b.safetensors")).values()} == {torch.float16}
    assert report.parity["roundtrip"]["identical_weights"]  # equal to the source rounded to fp16
    assert 0 < report.parity["roundtrip"]["max_abs_diff"] < 1e-2


def test_key_map_splits_qkv_in_order_and_copies_embedders_into_every_block():
    source = tiny_checkpoint(depth=3)
    state, warnings = to_diffusers_state(source.state_dict, source.config)
    assert warnings == [] and "pos_embed" not in state and not any(k.startswith("pos_embed.pos") for k in state)
    qkv = source.state_dict["blocks.2.attn.qkv.weight"]
    for i, name in enumerate(("attn1.to_q", "attn1.to_k", "attn1.to_v")):
        assert torch.equal(state[f"transformer_blocks.2.{name}.weight"], qkv[i * 32:(i + 1) * 32])
    for i in range(3):
        assert torch.equal(state[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"],
                           source.state_dict["y_embedder.embedding_table.weight"])
    back, warnings = from_diffusers_weights(state, source.config)
    assert warnings == [] and back.keys() == source.state_dict.keys()
    assert all(torch.equal(back[k], v) for k, v in source.state_dict.items())


def test_import_keeps_block_0_embedders_and_warns_about_differing_copies():
    source = tiny_checkpoint(depth=3)
    state, _ = to_diffusers_state(source.state_dict, source.config)
    state["transformer_blocks.2.norm1.emb.timestep_embedder.linear_2.bias"] += 0.5
    back, warnings = from_diffusers_weights(state, source.config)
    assert len(warnings) == 1 and "linear_2.bias" in warnings[0] and "blocks 2 " in warnings[0]
    assert torch.equal(back["t_embedder.mlp.2.bias"], source.state_dict["t_embedder.mlp.2.bias"])


def test_import_refuses_a_missing_or_misshapen_key():
    source = tiny_checkpoint()
    state, _ = to_diffusers_state(source.state_dict, source.config)
    with pytest.raises(UserError, match="missing key transformer_blocks.1.attn1.to_k.bias"):
        from_diffusers_weights({k: v for k, v in state.items() if k != "transformer_blocks.1.attn1.to_k.bias"},
                               source.config)
    state["proj_out_2.weight"] = state["proj_out_2.weight"][:-1]
    with pytest.raises(UserError, match="proj_out_2.weight has shape"):
        from_diffusers_weights(state, source.config)


def test_diffusers_export_loads_in_diffusers_and_matches_once_its_timestep_shift_is_undone(exported):
    from diffusers import DiTTransformer2DModel

    source, pipe, report = exported
    drift = report["parity"]["diffusers"]
    assert drift["expected"] and drift["max_abs_diff"] > 1e-4  # the documented 127-vs-128 frequency drift
    model = DiTTransformer2DModel.from_pretrained(pipe / "transformer", local_files_only=True,
                                                  low_cpu_mem_usage=False).eval()
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # the reference's frequencies
    x, t, y = parity_inputs(source.config)
    with torch.no_grad():
        ours = source.build()(x, t, y)
        theirs = model(x, timestep=t, class_labels=y).sample
    assert (ours - theirs).abs().max().item() < 1e-5 * ours.abs().max().item()


def test_diffusers_pipeline_loads_offline_and_samples(exported):
    from diffusers import DDIMScheduler, DiTPipeline

    source, pipe, _ = exported
    pipeline = DiTPipeline.from_pretrained(pipe, local_files_only=True, low_cpu_mem_usage=False)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.get_label_ids(["alias 3", "class 7"]) == [3, 7]
    images = pipeline([3, 7], guidance_scale=1.0, num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_diffusers_round_trip_is_bit_exact(exported, tmp_path):
    source, pipe, report = exported
    assert report["parity"]["roundtrip"]["identical_weights"] and report["parity"]["roundtrip"]["max_abs_diff"] == 0
    code, output = run(pipe, tmp_path / "back.safetensors")
    assert code == 0, output
    back = load_checkpoint(tmp_path / "back.safetensors")
    assert back.config == source.config and back.class_names == source.class_names and back.codec == source.codec
    assert back.state_dict.keys() == source.state_dict.keys()
    assert all(torch.equal(back.state_dict[k], v) for k, v in source.state_dict.items())
    # The weight file alone, inside transformer/, finds its config.json.
    assert read_diffusers(pipe / "transformer" / "diffusion_pytorch_model.safetensors").config == source.config


def test_bare_diffusers_weights_without_config_are_refused(exported, tmp_path):
    _, pipe, _ = exported
    save_file(load_file(str(pipe / "transformer" / "diffusion_pytorch_model.safetensors")),
              str(tmp_path / "loose.safetensors"))
    code, output = run(tmp_path / "loose.safetensors", tmp_path / "out.safetensors")
    assert code == 2 and output.startswith("error:") and "input size" in output


class CreatesFile:
    """Unpickling this calls open(path, "w"): code that a weight file must never get to run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, writer):
    def write(target, path):
        payload = {"model": {"w": torch.zeros(2)}, "args": CreatesFile(target)}
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f, protocol=2)  # torch.load's own protocol, so the unpickler meets the global

    # The payload is live: an unsafe load does create its file.
    write(tmp_path / "proof", tmp_path / "proof.pt")
    if writer == "torch.save":
        torch.load(tmp_path / "proof.pt", weights_only=False)
    else:
        with open(tmp_path / "proof.pt", "rb") as f:
            pickle.load(f)
    assert (tmp_path / "proof").exists()

    write(tmp_path / "pwned", tmp_path / "evil.pt")
    code, output = run(tmp_path / "evil.pt", tmp_path / "out.safetensors")
    assert code == 2 and output.startswith("error: refusing to load") and output.count("\n") == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()
    code, output = run("--info", tmp_path / "evil.pt")
    assert code == 2 and not (tmp_path / "pwned").exists()


def _damaged(kind, tmp_path):
    good = tiny_checkpoint()
    if kind == "empty.pt":
        (tmp_path / kind).write_bytes(b"")
    elif kind == "truncated.pt":
        torch.save(good.state_dict, tmp_path / "full.pt")
        data = (tmp_path / "full.pt").read_bytes()
        (tmp_path / kind).write_bytes(data[: len(data) // 2])
    elif kind == "truncated.safetensors":
        save_safetensors(good, tmp_path / "full.safetensors")
        data = (tmp_path / "full.safetensors").read_bytes()
        (tmp_path / kind).write_bytes(data[: len(data) // 2])
    elif kind == "corrupt.pt":  # seed 2 makes the weights-only unpickler raise IndexError, not UnpicklingError
        (tmp_path / kind).write_bytes(random.Random(2).randbytes(4096))
    elif kind == "corrupt.safetensors":
        (tmp_path / kind).write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all, really!!!!!}" + b"\0" * 64)
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["empty.pt", "truncated.pt", "truncated.safetensors", "corrupt.pt",
                                  "corrupt.safetensors"])
def test_damaged_files_give_one_line_errors(tmp_path, kind):
    path = _damaged(kind, tmp_path)
    code, output = run(path, tmp_path / "out.safetensors")
    assert code == 2, output
    assert output.startswith("error:") and output.count("\n") == 1 and "Traceback" not in output
    assert not (tmp_path / "out.safetensors").exists()


def test_random_bytes_never_escape_as_a_raw_exception(tmp_path):
    """Garbage read as a legacy pickle trips the unpickler in many ways (IndexError, KeyError, UnicodeDecodeError)."""
    path = tmp_path / "random.pt"
    for seed in range(300):
        path.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(UserError, match="is not a readable checkpoint"):  # the torch path, not safetensors
            load_checkpoint(path)


@pytest.mark.parametrize("to", ["safetensors", "diffusers"])
def test_existing_output_needs_force(tmp_path, to):
    save_safetensors(tiny_checkpoint(), tmp_path / "src.safetensors")
    target = tmp_path / ("out.safetensors" if to == "safetensors" else "pipe")
    if to == "safetensors":
        target.write_bytes(b"keep")
    else:
        target.mkdir()
        (target / "keep").write_bytes(b"keep")
    args = [tmp_path / "src.safetensors", target, "--to", to, "--vae", "none"]
    code, output = run(*args)
    assert code == 2 and output.startswith("error:") and "--force" in output and output.count("\n") == 1
    assert (target.read_bytes() if to == "safetensors" else (target / "keep").read_bytes()) == b"keep"
    code, output = run(*args, "--force")
    assert code == 0, output
    assert load_checkpoint(target).config == tiny_config()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_output_format_is_required_when_the_name_does_not_say(tmp_path):
    save_safetensors(tiny_checkpoint(), tmp_path / "src.safetensors")
    code, output = run(tmp_path / "src.safetensors", tmp_path / "out.bin")
    assert code == 2 and output.startswith("error: cannot tell the output format") and "--to" in output


def test_info_describes_files(tmp_path, golden):
    data = info(GOLDEN / GOLDEN_PT, num_heads=4)
    meta, _ = golden
    assert data["format"] == "official DiT state dict" and data["config"] == DiTConfig(**meta["config"]).to_dict()
    assert data["timestep_convention"] == "reference"
    assert data["parameters"] == count_parameters(load_checkpoint(GOLDEN / GOLDEN_PT, 4).config)
    assert data["dtype"] == ["float32"] and data["ema"] is None  # a bare state dict does not say

    checkpoint = tiny_checkpoint()
    checkpoint.weights = "model"
    save_safetensors(checkpoint, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    code, output = run("--info", tmp_path / "m.safetensors", "--json")
    assert code == 0, output
    data = json.loads(output)
    assert (data["format"], data["dtype"], data["weights"], data["ema"], data["class_names"]) == (
        "safetensors", ["bfloat16"], "model", False, 10)
    assert data["codec"] == {"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"}

    code, output = run("--info", tmp_path / "m.safetensors")
    assert code == 0 and "parameters" in output and f"{count_parameters(tiny_config()):,}" in output


def test_reads_transformer_folders_diffusers_itself_wrote(exported, tmp_path):
    from diffusers import DiTTransformer2DModel

    source, pipe, _ = exported
    model = DiTTransformer2DModel.from_pretrained(pipe / "transformer", local_files_only=True, low_cpu_mem_usage=False)
    for safe in (True, False):  # diffusion_pytorch_model.safetensors, then .bin through the weights-only loader
        model.save_pretrained(tmp_path / f"safe-{safe}", safe_serialization=safe)
        back = load_checkpoint(tmp_path / f"safe-{safe}")  # no ditcli record: diffusers' forward
        assert back.format == "diffusers" and back.config == replace(source.config, timestep_convention="diffusers")
        assert all(torch.equal(back.state_dict[k], v) for k, v in source.state_dict.items())


def test_reads_the_hub_layout_with_the_old_class_name_and_default_eps(exported, tmp_path):
    source, pipe, _ = exported
    shutil.copytree(pipe / "transformer", tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    del config["norm_eps"]
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    back = read_diffusers(tmp_path / "transformer")
    assert back.config == replace(source.config, timestep_convention="diffusers", norm_eps=1e-5)
    config["norm_type"] = "ada_norm"
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="norm_type='ada_norm'"):
        read_diffusers(tmp_path / "transformer")


def test_ditcli_training_checkpoint_carries_its_schedule_into_the_scheduler(tmp_path):
    from diffusers import DDIMScheduler

    source = tiny_checkpoint()
    torch.save({"format": TRAIN_FORMAT, "step": 7, "config": {"model": source.config.to_dict(),
                                                              "train": {"schedule": "cosine"}},
                "model": source.state_dict, "ema": source.state_dict, "class_names": None, "codec": None},
               tmp_path / "ckpt.pt")
    code, output = run(tmp_path / "ckpt.pt", tmp_path / "pipe", "--to", "diffusers", "--vae", "none")
    assert code == 0, output
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "pipe" / "scheduler", local_files_only=True)
    assert torch.allclose(scheduler.betas.double(), torch.from_numpy(named_betas("cosine")), atol=1e-7)


def test_bad_options_are_one_line_errors(tmp_path):
    save_safetensors(tiny_checkpoint(), tmp_path / "src.safetensors")
    for args, message in (([tmp_path / "src.safetensors", tmp_path / "o.safetensors", "--dtype", "fp8"], "--dtype"),
                          ([tmp_path / "src.safetensors", tmp_path / "o", "--to", "onnx"], "output format"),
                          ([tmp_path / "src.safetensors"], "SRC and DST"),
                          ([tmp_path / "missing.pt", tmp_path / "o.safetensors"], "not found")):
        code, output = run(*args)
        assert code == 2 and output.startswith("error:") and message in output, output


def test_an_exported_folder_has_the_permissions_of_plain_files(exported):
    """Every file a plain open() would create readable by others is so (safetensors' own files start as 0600)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in exported[1].rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o666 & ~umask for p in files}


# Options that contradict the file's record, and the sampling defaults `dit convert` records (issue 22).

def _train_checkpoint(path, source: Checkpoint):
    torch.save({"format": TRAIN_FORMAT, "step": 7, "config": {"model": source.config.to_dict(), "train": {}},
                "model": source.state_dict, "ema": source.state_dict, "class_names": None, "codec": None}, path)
    return path


def _one_line_error(code: int, output: str, *needles: str) -> None:
    assert code == 2 and output.startswith("error:") and output.count("\n") == 1, output
    assert all(needle in output for needle in needles), output


@pytest.mark.parametrize("kind", ["safetensors", "train", "diffusers"])
def test_num_heads_contradicting_the_recorded_config_is_refused(tmp_path, kind):
    from ditcli.weights.diffusers_format import to_diffusers

    source = tiny_checkpoint()  # records num_heads 2
    if kind == "safetensors":
        save_safetensors(source, src := tmp_path / "src.safetensors")
    elif kind == "train":
        src = _train_checkpoint(tmp_path / "ckpt.pt", source)
    else:
        to_diffusers(source, src := tmp_path / "pipe", vae=None)
    out = tmp_path / "out.safetensors"
    _one_line_error(*run(src, out, "--num-heads", 4), "--num-heads 4", "num_heads 2", "drop --num-heads")
    assert not out.exists()
    _one_line_error(*run("--info", src, "--num-heads", 4), "--num-heads 4", "num_heads 2")
    code, output = run(src, out, "--num-heads", 2)  # the recorded number itself is fine
    assert code == 0, output
    assert load_checkpoint(out).config.num_heads == 2


def test_weights_contradicting_a_diffusers_folder_record_are_refused(exported, tmp_path):
    _, pipe, _ = exported  # records ema weights
    _one_line_error(*run(pipe, tmp_path / "out.safetensors", "--weights", "model"), "--weights model", "ema")
    assert not (tmp_path / "out.safetensors").exists()


def test_info_refuses_the_options_of_a_conversion(tmp_path):
    save_safetensors(tiny_checkpoint(), tmp_path / "src.safetensors")
    _one_line_error(*run("--info", tmp_path / "src.safetensors", "--dtype", "fp16", "--steps", 10), "--info",
                    "--steps", "--dtype")


def test_sampling_options_are_recorded_and_read_back(tmp_path):
    from safetensors import safe_open

    from ditcli.diffusion.objectives import DDPM
    from ditcli.diffusion.samplers import SamplingDefaults

    save_safetensors(tiny_checkpoint(), tmp_path / "src.safetensors")  # records no sampling defaults
    code, output = run(tmp_path / "src.safetensors", tmp_path / "a.safetensors", "--sampler", "dpm++2m", "--steps",
                       10, "--cfg", 4, "--guidance-interval", "82,578", "--guidance-channels", "all")
    assert code == 0, output
    recorded = SamplingDefaults("dpm++2m", 10, 4.0, (82.0, 578.0), "all")
    assert load_checkpoint(tmp_path / "a.safetensors").sampling == recorded
    # Options not given keep the source's record; 'none' drops the interval.
    code, output = run(tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--steps", 20, "--guidance-interval",
                       "none")
    assert code == 0, output
    assert load_checkpoint(tmp_path / "b.safetensors").sampling == replace(recorded, steps=20, interval=None)
    # A source without a record starts from what `dit sample` gives it.
    code, output = run(tmp_path / "src.safetensors", tmp_path / "c.safetensors", "--cfg", 1.5)
    assert code == 0, output
    assert load_checkpoint(tmp_path / "c.safetensors").sampling == replace(DDPM.default_sampling, cfg=1.5)
    # Without the options the record is copied exactly: no channels key where none was set.
    code, output = run(tmp_path / "c.safetensors", tmp_path / "d.safetensors")
    assert code == 0, output
    texts = [safe_open(str(tmp_path / f"{name}.safetensors"), "pt").metadata()["sampling"] for name in "cd"]
    assert texts[0] == texts[1] == json.dumps({"sampler": "ddpm", "steps": 250, "cfg": 1.5})
    assert SamplingDefaults.from_dict(recorded.to_dict()) == recorded


def _flow_file(path):
    from ditcli.diffusion.objectives import FlowObjective

    source = tiny_checkpoint()
    source.objective = FlowObjective("noise-to-data")
    save_safetensors(source, path)
    return path


@pytest.mark.parametrize("args, needles", [
    (["--sampler", "dopri5"], ["--sampler dopri5", "DDPM model", "dpm++2m"]),
    (["--sampler", "plms"], ["--sampler 'plms'"]),
    (["--steps", 0], ["--steps", ">= 1"]),
    (["--cfg", -1], ["--cfg -1"]),
    (["--cfg", "inf"], ["--cfg inf"]),
    (["--guidance-interval", "578,82"], ["--guidance-interval", "LOW <= HIGH"]),
    (["--guidance-interval", "82"], ["--guidance-interval", "LOW,HIGH"]),
    (["--guidance-channels", "half"], ["--guidance-channels 'half'", "paper or all"]),
    (["--steps", 10, "--to", "diffusers", "--vae", "none"], ["--steps", ".safetensors"]),
    (["flow", "--sampler", "ddpm"], ["--sampler ddpm", "flow-matching", "dopri5"]),
    (["flow", "--guidance-interval", "82,578"], ["--guidance-interval 82,578", "[0, 1]"]),
    (["nodrop", "--cfg", 4], ["--cfg 4", "null class"]),
])
def test_bad_sampling_values_are_one_line_errors(tmp_path, args, needles):
    if args[0] == "flow":
        src = _flow_file(tmp_path / "src.safetensors")
    else:
        save_safetensors(tiny_checkpoint(**({"class_dropout_prob": 0.0} if args[0] == "nodrop" else {})),
                         src := tmp_path / "src.safetensors")
    args = args[1:] if args[0] in ("flow", "nodrop") else args
    out = tmp_path / ("pipe" if "diffusers" in args else "out.safetensors")
    _one_line_error(*run(src, out, *args), *needles)
    assert not out.exists()


def test_a_flow_model_records_flow_samplers_and_flow_time(tmp_path):
    from ditcli.diffusion.samplers import SamplingDefaults

    code, output = run(_flow_file(tmp_path / "src.safetensors"), tmp_path / "out.safetensors", "--sampler", "heun",
                       "--guidance-interval", "0,0.7")
    assert code == 0, output
    # Flow samplers and flow time fit; the steps not given are those `dit sample` gives a flow model (dopri5's 50).
    assert load_checkpoint(tmp_path / "out.safetensors").sampling == SamplingDefaults("heun", 50, 4.0, (0.0, 0.7))


def test_converting_a_file_onto_itself_rewrites_it_atomically(tmp_path):
    source = tiny_checkpoint()
    save_safetensors(source, path := tmp_path / "fm.safetensors")
    before = path.read_bytes()
    _one_line_error(*run(path, path, "--steps", 10), "SRC itself", "--force")
    assert path.read_bytes() == before
    code, output = run(path, path, "--force", "--sampler", "dpm++2m", "--steps", 10, "--cfg", 4,
                       "--guidance-interval", "82,578")
    assert code == 0, output
    back = load_checkpoint(path)
    assert (back.sampling.sampler, back.sampling.steps, back.sampling.interval) == ("dpm++2m", 10, (82.0, 578.0))
    assert all(torch.equal(back.state_dict[k], v) for k, v in source.state_dict.items())
    assert [p.name for p in tmp_path.iterdir()] == ["fm.safetensors"]  # no temporary leftovers


def test_sample_guides_the_channels_a_file_records_unless_told(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    source = tiny_checkpoint(in_channels=1)
    source.codec = {"kind": "pixel", "channels": 1}
    save_safetensors(source, tmp_path / "src.safetensors")
    code, output = run(tmp_path / "src.safetensors", tmp_path / "all.safetensors", "--guidance-channels", "all")
    assert code == 0, output
    common = ["sample", "--ckpt", tmp_path / "all.safetensors", "--num", 1, "--steps", 1, "--sampler", "ddim",
              "--device", "cpu"]
    for extra, channels in (([], "all"), (["--guidance-channels", "paper"], "paper")):
        out = tmp_path / f"out-{channels}"
        ok(*common, *extra, "--out", out)
        assert json.loads((out / "provenance.json").read_text())["guidance_channels"] == channels
