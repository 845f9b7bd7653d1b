"""Hub ids (`org/name[@rev]`) as checkpoints, resolved by huggingface_hub itself from a real cache layout, offline."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from conftest import perturbed, tiny_config
from typer.testing import CliRunner

import ditcli.hub
import ditcli.weights.registry
from ditcli.cli.app import app
from ditcli.errors import UserError
from ditcli.hub import parse_hub_id, repo_of, resolve_source
from ditcli.model.dit import DiT
from ditcli.weights.checkpoint import load_checkpoint
from ditcli.weights.diffusers_format import to_diffusers
from ditcli.weights.record import Checkpoint
from ditcli.weights.registry import REGISTRY, resolve_weights

runner = CliRunner()


@pytest.fixture(autouse=True)
def hub_cache(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE, offline; huggingface_hub also refuses every HTTP request, so nothing reaches out."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "dit-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def pipeline(folder: Path, seed: int, record: bool = True) -> tuple[Path, Checkpoint]:
    """A diffusers DiTPipeline folder of a tiny pixel DiT; without `record`, no `_ditcli` entry (a foreign folder)."""
    torch.manual_seed(seed)
    config = tiny_config(in_channels=1, num_classes=3)
    model = perturbed(DiT(config), seed=seed, std=0.02)
    checkpoint = Checkpoint(model.state_dict(), config, "test", class_names=["a", "b", "c"],
                            codec={"kind": "pixel", "channels": 1})
    to_diffusers(checkpoint, folder, vae=None)
    if not record:
        index = json.loads((folder / "model_index.json").read_text())
        del index["_ditcli"]
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder, checkpoint


def cache_repo(cache: Path, repo: str, folder: Path, refs=("main",), extra: dict | None = None) -> str:
    """Put `folder` into the hub cache as huggingface_hub lays it out: blobs, a snapshot of links, refs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    files.update(extra or {})
    commit = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()) \
        .hexdigest()
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def tiny_repo(tmp_path, hub_cache):
    """org/tiny-dit: main and the tag v1 (other weights), plus files a DiT does not need."""
    first, source = pipeline(tmp_path / "first", seed=1)
    second, other = pipeline(tmp_path / "second", seed=2)
    unneeded = {"vae/diffusion_pytorch_model.safetensors": b"not needed", "README.md": b"# tiny"}
    main = cache_repo(hub_cache, "org/tiny-dit", first, extra=unneeded)
    v1 = cache_repo(hub_cache, "org/tiny-dit", second, refs=("v1",))
    return {"main": main, "v1": v1, "source": source, "other": other}


def same_weights(a: Checkpoint, b: Checkpoint) -> bool:
    return all(torch.equal(a.state_dict[k], v) for k, v in b.state_dict.items())


def test_hub_ids_are_told_from_paths():
    assert parse_hub_id("facebook/DiT-XL-2-256") == parse_hub_id("facebook/DiT-XL-2-256@main").__class__(
        "facebook/DiT-XL-2-256")
    assert parse_hub_id("org/name@v1.0").revision == "v1.0"
    for path in ("runs/ckpt-0000100.pt", "out/model.safetensors", "a/b/c", "model.pt", "/abs/path", "org/a--b"):
        assert parse_hub_id(path) is None, path
    assert repo_of("/x/models--facebook--DiT-XL-2-256/snapshots/abc/transformer") == "facebook/DiT-XL-2-256"


def test_a_hub_id_resolves_through_the_cache_with_revisions(tiny_repo):
    main = load_checkpoint("org/tiny-dit")
    assert main.format == "diffusers" and main.class_names == ["a", "b", "c"]
    assert same_weights(main, tiny_repo["source"]) and main.config == tiny_repo["source"].config
    for revision in ("v1", tiny_repo["v1"]):  # a tag, and a commit
        assert same_weights(load_checkpoint(f"org/tiny-dit@{revision}"), tiny_repo["other"])


def test_only_the_files_a_dit_needs_are_asked_for(tiny_repo, monkeypatch):
    asked = []
    real = huggingface_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        asked.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    load_checkpoint("org/tiny-dit")
    assert asked == ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"]


def test_a_local_path_of_the_same_spelling_wins(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline(tmp_path / "org" / "tiny-dit", seed=3)
    local = load_checkpoint("org/tiny-dit")
    assert not same_weights(local, tiny_repo["source"]) and resolve_source("org/tiny-dit") == Path("org/tiny-dit")


@pytest.mark.parametrize("source, message", [
    ("org/missing", "hub repo org/missing is not in the Hugging Face cache"),
    ("org/tiny-dit@v9", "revision 'v9' of hub repo org/tiny-dit is not in the Hugging Face cache (cached: main, v1"),
])
def test_missing_repo_or_revision_is_one_line(tiny_repo, source, message):
    for args in (["convert", "--info", source], ["sample", "--ckpt", source, "--num", "1"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error: ") and message in result.output, result.output


def test_sample_and_convert_take_hub_ids(tiny_repo, tmp_path):
    result = runner.invoke(app, ["sample", "--ckpt", "org/tiny-dit@v1", "--num", "2", "--steps", "2",
                                 "--out", str(tmp_path / "s"), "--json"])
    assert result.exit_code == 0, result.output
    provenance = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert tiny_repo["v1"] in provenance["checkpoint"]
    result = runner.invoke(app, ["convert", "org/tiny-dit", str(tmp_path / "m.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    assert same_weights(load_checkpoint(tmp_path / "m.safetensors"), tiny_repo["source"])


def test_registry_falls_back_to_its_hub_copy(tmp_path, hub_cache, monkeypatch):
    folder, source = pipeline(tmp_path / "pipe", seed=4, record=False)
    cache_repo(hub_cache, "facebook/DiT-XL-2-256", folder)
    entry = replace(REGISTRY[("DiT-XL/2", 256)], url=(tmp_path / "gone.pt").as_uri())  # the direct URL fails
    monkeypatch.setattr(ditcli.weights.registry, "weights_dirs", lambda: [tmp_path / "dit-home"])
    monkeypatch.delenv("HF_HUB_OFFLINE")  # online as far as ditcli knows; huggingface_hub still refuses HTTP
    for offline in (False, True):
        found = load_checkpoint(resolve_weights(entry, offline=offline))
        assert same_weights(found, source)
        # The hub's facebook/DiT-XL-2-* folders are conversions of the released .pt: the reference's forward.
        assert found.config.timestep_convention == "reference" and found.config.norm_eps == 1e-6
    with pytest.raises(UserError, match="cannot download DiT-XL-2-512x512.pt.*the hub copy facebook/DiT-XL-2-512 "
                                        "failed too: .*not in the Hugging Face cache"):
        resolve_weights(replace(REGISTRY[("DiT-XL/2", 512)], url=(tmp_path / "gone.pt").as_uri()))


def test_the_cli_resolves_through_huggingface_hubs_own_environment(tiny_repo, hub_cache, tmp_path):
    """A fresh process: HF_HUB_CACHE and HF_HUB_OFFLINE as huggingface_hub reads them at import."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "DIT_HOME": str(tmp_path / "h")}
    env.pop("HF_HOME", None)
    out = subprocess.run([sys.executable, "-m", "ditcli", "convert", "--info", "org/tiny-dit@v1", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "diffusers" and info["timestep_convention"] == "reference"
    shutil.rmtree(hub_cache / "models--org--tiny-dit")
    out = subprocess.run([sys.executable, "-m", "ditcli", "convert", "--info", "org/tiny-dit"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 2 and "is not in the Hugging Face cache" in out.stderr, out.stderr


def test_init_from_takes_a_hub_id(tiny_repo, tmp_path):
    import numpy as np

    from ditcli.training.config import TrainConfig
    from ditcli.training.trainer import Trainer

    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "abc.npz", images=images, labels=np.arange(6) % 3, class_names=np.array(["c", "b", "a"]))
    trainer = Trainer(TrainConfig(data=str(tmp_path / "abc.npz"), out=str(tmp_path / "run"), model="DiT-S/2",
                                  hidden_size=32, depth=2, num_heads=2, image_size=8, channels=1, vae=None,
                                  steps=1, init_from="org/tiny-dit@v1"))
    trainer.setup()
    source = tiny_repo["other"].state_dict
    table = trainer.model.state_dict()["y_embedder.embedding_table.weight"]
    assert torch.equal(table, source["y_embedder.embedding_table.weight"][[2, 1, 0, 3]])  # by name, then null
    assert torch.equal(trainer.ema.state_dict()["blocks.1.mlp.fc2.weight"], source["blocks.1.mlp.fc2.weight"])
    assert trainer.summary()["init_from"] == "org/tiny-dit@v1 (diffusers, ema weights)"


def test_a_pipeline_whose_own_vae_was_not_fetched_says_which_vae_is_assumed(tmp_path, hub_cache):
    torch.manual_seed(5)
    config = tiny_config()  # a latent model
    checkpoint = Checkpoint(perturbed(DiT(config)).state_dict(), config, "test")
    to_diffusers(checkpoint, tmp_path / "pipe", vae=None)
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    del index["_ditcli"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    cache_repo(hub_cache, "someone/custom-dit", tmp_path / "pipe")
    cache_repo(hub_cache, "facebook/DiT-XL-2-512", tmp_path / "pipe")
    custom = load_checkpoint("someone/custom-dit")
    assert custom.codec == {"kind": "vae", "vae": "stabilityai/sd-vae-ft-ema"}
    assert any("the SD VAE ema is assumed: pass --vae" in w for w in custom.warnings)
    assert not load_checkpoint("facebook/DiT-XL-2-512").warnings


def test_a_dead_network_answers_from_the_cache_at_once(tiny_repo, monkeypatch):
    """Not offline, but no connection: the cache serves, and what it lacks fails at once, without hub retries."""
    def refuse(*args, **kwargs):
        raise OSError(-2, "Name or service not known")

    asked = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ditcli.hub.socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *args, **kwargs: asked.append(kwargs["local_files_only"]) or real(*args, **kwargs))
    assert same_weights(load_checkpoint("org/tiny-dit"), tiny_repo["source"])
    assert asked and all(asked)
    with pytest.raises(UserError, match="out of reach"):
        load_checkpoint("org/missing")
