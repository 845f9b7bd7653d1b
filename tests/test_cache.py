"""Feature caching (`--cache`): threshold 0 is the uncached run bit for bit; a threshold reuses the deep blocks and
says how often; the state never crosses batches; the run key and provenance name it."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import ok, perturbed, tiny_config
from PIL import Image

from ditcli.diffusion.guidance import Guidance
from ditcli.model.codec import PixelCodec
from ditcli.model.dit import DiT
from ditcli.sampling.block_cache import BlockCache
from ditcli.sampling.config import ADDED_FIELDS, GenerateConfig
from ditcli.sampling.forward import inference_model
from ditcli.sampling.generate import generate_images
from ditcli.weights.checkpoint import save_safetensors
from ditcli.weights.record import Checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(DiT(tiny_config(depth=4)), seed=1, std=0.05).eval()


def run(model, cache, sampler="dpm++2m", steps=12, precision="fp32", labels=tuple(range(8)), batch_size=8):
    config = GenerateConfig(labels=labels, seed=3, sampler=sampler, steps=steps, guidance=Guidance(4.0),
                            batch_size=batch_size, precision=precision, cache=cache)
    return list(generate_images(model, PixelCodec(model.config.in_channels), config, range(len(labels)), CPU))


@pytest.mark.parametrize("sampler, precision", [("dpm++2m", "fp32"), ("ddim", "bf16"), ("ddpm", "fp32")])
def test_threshold_zero_gives_the_uncached_images_bit_for_bit(model, sampler, precision):
    plain, cached = run(model, None, sampler, precision=precision), run(model, 0.0, sampler, precision=precision)
    assert [b.reused for b in cached] == [0]
    assert torch.equal(plain[0].images, cached[0].images)


def test_a_threshold_reuses_the_deep_blocks_and_stays_near_the_uncached_images(model):
    plain, loose, tight = run(model, None)[0], run(model, 2.0)[0], run(model, 1.0)[0]
    assert 0 < tight.reused < loose.reused < loose.nfe == plain.nfe == 12
    error = lambda batch: (batch.images.float() - plain.images.float()).abs().mean().item()  # noqa: E731
    assert error(tight) <= error(loose) and 0 < error(loose) < 1  # uint8 levels, mean per pixel


def test_the_first_evaluation_of_every_batch_runs_every_block(model):
    calls = []
    original = BlockCache.may_reuse
    BlockCache.may_reuse = lambda self, residual: calls.append(self.previous is None) or original(self, residual)
    try:
        batches = run(model, 1e9, labels=tuple(range(8)), batch_size=4)
    finally:
        BlockCache.may_reuse = original
    assert len(batches) == 2 and calls.count(True) == 2  # one fresh cache per batch
    assert [b.reused for b in batches] == [11, 11]  # an endless threshold still computes the first evaluation


def test_blocks_run_with_the_cast_weights(model):
    net = inference_model(model, "bf16")
    cache = BlockCache(net, 0.1)
    assert cache.dit is net.inner and cache.dtype == torch.bfloat16
    x = torch.randn(2, model.config.in_channels, model.config.input_size, model.config.input_size)
    out = cache(x, torch.tensor([10.0, 20.0]), torch.tensor([0, 1]))
    assert out.dtype == torch.float32 and (cache.full, cache.reused) == (1, 0)
    torch.testing.assert_close(out, net(x, torch.tensor([10.0, 20.0]), torch.tensor([0, 1])))


def test_the_run_key_changes_with_a_threshold_only_where_pixels_do():
    base = GenerateConfig(labels=(0, 1), steps=10)
    key = lambda **kw: GenerateConfig(labels=(0, 1), steps=10, **kw).run_key("sha", {})  # noqa: E731
    assert key() == base.run_key("sha", {}) == key(cache=0.0)
    assert key(cache=0.1) != key() and key(cache=0.1) != key(cache=0.2)
    fields = {**{k: v for k, v in dataclasses.asdict(base).items() if k not in ADDED_FIELDS},
              "labels": hashlib.sha256(np.arange(2, dtype=np.int64).tobytes()).hexdigest(),
              "checkpoint": "sha", "codec": {}}
    fields.pop("batch_size"), fields.pop("compile")
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    assert key() == digest  # a DDPM run without a cache keeps the key it had before these fields existed


def test_a_cached_config_cannot_be_compiled_or_negative():
    with pytest.raises(ValueError, match="compile"):
        GenerateConfig(labels=(0,), cache=0.1, compile=True)
    with pytest.raises(ValueError, match=">= 0"):
        GenerateConfig(labels=(0,), cache=-1.0)


def test_dit_sample_cache_reports_and_records_the_reuse(tmp_path, offline, model):
    path = tmp_path / "m.safetensors"
    save_safetensors(Checkpoint(model.state_dict(), model.config, "safetensors", "ema", None,
                                {"kind": "pixel", "channels": model.config.in_channels}), path)
    common = ("sample", "--ckpt", path, "--num", 4, "--steps", 10, "--sampler", "dpm++2m", "--json")
    report = json.loads(ok(*common, "--cache", "2", "--out", tmp_path / "cached").stdout.splitlines()[-1])
    plain = json.loads(ok(*common, "--out", tmp_path / "plain").stdout.splitlines()[-1])
    assert 0 < report["cache_reused"] < 1 and plain["cache_reused"] is None
    record = json.loads((tmp_path / "cached" / "provenance.json").read_text())
    assert record["cache"] == 2.0 and record["compile"]["why"].startswith("eager: --cache")
    assert record["vae_dtype"] is None  # a pixel model has no VAE
    grids = [np.asarray(Image.open(tmp_path / d / "grid.png")) for d in ("cached", "plain")]
    assert grids[0].shape == grids[1].shape and not np.array_equal(*grids)


@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_a_cached_image_does_not_depend_on_the_batch_it_shares(model, threshold):
    """Each row decides for itself: image i is the same alone in a batch of 4 as among 8 (and so under torchrun)."""
    together = run(model, threshold, labels=tuple(range(8)), batch_size=8)
    apart = run(model, threshold, labels=tuple(range(8)), batch_size=4)
    assert sum(b.reused for b in together) > 0
    assert torch.equal(together[0].images, torch.cat([b.images for b in apart]))


def test_only_the_rows_over_their_threshold_run_the_deep_blocks(model):
    cache = BlockCache(model, 0.05)
    size = (model.config.in_channels, model.config.input_size, model.config.input_size)
    x, t, y = torch.randn(8, *size), torch.full((8,), 500.0), torch.arange(8)
    cache(x, t, y)
    moved = x.clone()
    moved[:3] = torch.randn(3, *size)  # rows 0-2 change, rows 3-7 do not
    shapes = []
    hook = model.blocks[1].register_forward_pre_hook(lambda module, args: shapes.append(args[0].shape[0]))
    try:
        out = cache(moved, t, y)
    finally:
        hook.remove()
    assert shapes == [4]  # three rows, padded to the 4-row quantum
    assert (cache.full, cache.reused) == (2, 5 / 8)
    with torch.no_grad():
        plain = model(moved, t, y)
        first = model(x, t, y)
    assert torch.equal(out[:3], plain[:3])  # a row that runs gets the model's own output
    torch.testing.assert_close(out[3:], first[3:])  # a row that skips keeps its cached tail on an unchanged input
