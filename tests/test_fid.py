"""`dit fid`: the TF Inception port, ADM's metrics and the command, on random weights and tiny images.

The full Inception costs about 6 GFLOP per image at 299x299 whatever the input size, so only a few tests run it, on 3
or 4 images each; the rest use a tiny TorchScript extractor through the same `--features` path users have.
"""

import copy
import hashlib
import http.server
import json
import math
import socket
import threading
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from conftest import assert_user_error
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from ditcli.cli.app import app
from ditcli.data.sources import center_crop_arr
from ditcli.errors import UserError
from ditcli.evaluation import features, fid, inception, scores
from ditcli.evaluation.inception import (
    InceptionV3,
    fetch_weights,
    load_inception,
    resize_bilinear_tf1,
)

CPU = torch.device("cpu")


# Fixtures and helpers.

SMALL = 75  # the smallest input the graph accepts: every layer runs at 1/16 of the cost of 299


def inception_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in InceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}


def random_inception_state(seed: int = 0, scale_spread: float = 0.0) -> dict[str, torch.Tensor]:
    """He-initialised convolutions, with BatchNorm statistics calibrated on random images (one small forward in
    train mode): every channel is centred and scaled, so features keep varying between images through all 94 layers
    instead of collapsing to a shared constant as deep random ReLU nets do. BatchNorm scales are 1, or uniform in
    1 +- scale_spread / 2 (drawn before the calibration, which then sees them)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in inception_shapes().items():
        if key.endswith("conv.weight"):
            state[key] = torch.randn(shape, generator=generator) * math.sqrt(2 / shape[1:].numel())
        elif key.endswith("bn.weight"):
            state[key] = 1 + (torch.rand(shape, generator=generator) - 0.5) * scale_spread
        elif key.endswith("bn.running_var"):
            state[key] = torch.ones(shape)
        else:  # BatchNorm shifts and means, the softmax layer
            state[key] = torch.randn(shape, generator=generator) * 0.1
    model = InceptionV3().load_weights(state)
    model.input_size = SMALL
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # running statistics become the calibration batch's
    calibration = torch.from_numpy(image_set(8, 0, 256, seed=seed + 100)).permute(0, 3, 1, 2)  # (8, 3, H, W)
    with torch.no_grad():
        model.train()(calibration)
    return model.state_dict()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / inception.WEIGHTS_NAME
    torch.save(random_inception_state(), path)
    return path


@pytest.fixture(scope="session")
def net(weights_file) -> InceptionV3:
    return load_inception(weights_file)


@pytest.fixture(scope="session")
def small_net(weights_file) -> InceptionV3:
    model = load_inception(weights_file)
    model.input_size = SMALL
    return model


def image_set(n: int, low: int, high: int, seed: int, size: int = 24) -> np.ndarray:
    """uint8 (n, size, size, 3): smooth random blobs in [low, high), so sets from different ranges differ."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)  # (n, 3, size, size)
    return (low + smooth * (high - low)).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="session")
def sets():
    return image_set(4, 0, 160, seed=1), image_set(4, 90, 256, seed=2)


@pytest.fixture(scope="session")
def inception_acts(small_net, sets):
    """Our extraction of both sets with the random Inception, 4 images per batch."""
    return [features.extract(iter([images]), small_net, CPU) for images in sets]


class TinyFeatures(nn.Module):
    """A cheap extractor with the full output contract: pool, spatial and logits."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(128, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.adaptive_avg_pool2d(torch.relu(self.conv(images.float() / 127.5 - 1)), 4)  # (N, 8, 4, 4)
        pool = x.flatten(1)  # (N, 128)
        return {"pool": pool, "spatial": x[:, :2].flatten(1), "logits": self.fc(pool)}


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.jit.script(TinyFeatures().eval()).save(str(path))
    return path


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def save_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


def run(*args: str):
    return CliRunner().invoke(app, ["fid", *map(str, args)])


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# The network.

def test_state_dict_has_torch_fidelity_layout():
    shapes = inception_shapes()
    assert len(shapes) == 94 * 5 + 2  # 94 conv+BatchNorm nodes and the 2048 -> 1008 softmax layer
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_6d.branch1x1.bn.running_var"] == (192,)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048)


def test_load_weights_rejects_other_layouts(tmp_path):
    with torch.device("meta"):
        model = InceptionV3()
    state = {k: torch.empty(shape, device="meta") for k, shape in inception_shapes().items()}
    state["extra.weight"] = state.pop("fc.bias")
    with pytest.raises(UserError, match="1 keys missing and 1 unexpected"):
        model.load_weights(state)
    state["fc.bias"] = state.pop("extra.weight")
    state["fc.weight"] = state["fc.weight"][:1000]
    with pytest.raises(UserError, match=r"fc.weight has shape \(1000, 2048\)"):
        model.load_weights(state)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read the Inception weights"):
        load_inception(tmp_path / "bad.pth")


def test_resize_matches_tf1_sampling():
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    # TF1 samples at i * in / out = 0, 0.5, 1, 1.5: the last column repeats the edge (no half-pixel centres).
    assert resize_bilinear_tf1(row, 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    assert not torch.equal(resize_bilinear_tf1(row, 4), F.interpolate(row, size=(4, 4), mode="bilinear"))
    ramp = torch.arange(16.0).view(1, 1, 4, 4)
    assert resize_bilinear_tf1(ramp, 2)[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]  # rows and columns 0 and 2
    image = torch.rand(2, 3, 299, 299)
    assert torch.equal(resize_bilinear_tf1(image, 299), image)


def test_random_inception_features_are_not_degenerate(inception_acts):
    for acts in inception_acts:
        mu, sigma = acts.pool.stats()
        assert mu.shape == (2048,) and torch.isfinite(sigma).all()
        assert (sigma.diagonal() > 1e-6 * mu.abs().max() ** 2).float().mean() > 0.3  # many features vary
        assert acts.pool_features.shape == (4, 2048)
    assert 1.0 < inception_acts[0].scores.score() < 1008


def test_full_size_forward_gives_adm_features(net, sets):
    images = torch.from_numpy(sets[0][:1]).permute(0, 3, 1, 2)  # (1, 3, H, W)
    captured = {}
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: captured.update(out=out))
    with torch.inference_mode():
        features = net(images)
    handle.remove()
    assert features.pool.shape == (1, 2048) and features.logits.shape == (1, 1008)
    expected = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(1, -1)  # (1, 17 * 17 * 7), NHWC as ADM
    assert expected.shape == (1, 2023) and torch.equal(features.spatial, expected)
    assert torch.allclose(features.logits, features.pool @ net.fc.weight.T)  # no bias, as ADM's softmax input


# Inference preparation: folded BatchNorm and channels-last weights compute the graph's function.

@pytest.fixture(scope="session")
def perturbed_state() -> dict[str, torch.Tensor]:
    """Random calibrated weights with BatchNorm scales in [0.5, 1.5], so that folding has every term to get right."""
    return random_inception_state(seed=5, scale_spread=1.0)


@pytest.fixture(scope="session")
def perturbed_file(tmp_path_factory, perturbed_state) -> Path:
    path = tmp_path_factory.mktemp("perturbed") / inception.WEIGHTS_NAME
    torch.save(perturbed_state, path)
    return path


def graph_module(state: dict[str, torch.Tensor]) -> InceptionV3:
    """The graph as written, node by node: convolution, BatchNorm, ReLU in NCHW (torch-fidelity's structure)."""
    model = InceptionV3().load_weights(state)
    model.input_size = SMALL
    return model


def test_fold_batchnorm_is_the_same_function_in_float64():
    generator = torch.Generator().manual_seed(0)
    node = inception.ConvBN(6, 5, (3, 1), stride=2, padding=(1, 0)).double().eval()
    with torch.no_grad():
        for tensor in (node.conv.weight, node.bn.weight, node.bn.bias, node.bn.running_mean):
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
        node.bn.running_var.copy_(torch.rand(5, generator=generator, dtype=torch.float64) + 0.1)
    x = torch.randn(2, 6, 9, 7, generator=generator, dtype=torch.float64)
    expected = node(x)
    node.fold_batchnorm()
    assert isinstance(node.bn, nn.Identity) and node.conv.bias is not None
    assert (expected > 0).float().mean() > 0.3  # the ReLU passes a good share
    assert torch.allclose(node(x), expected, rtol=1e-12, atol=1e-12)


def test_load_inception_folds_batchnorm_into_channels_last_convolutions(net):
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 94 and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(conv.bias is not None for conv in convs)
    assert net.Mixed_5b.branch3x3dbl_2.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.Mixed_5b.branch3x3dbl_2.conv.weight.is_contiguous()


def test_fast_inception_features_equal_the_graph(perturbed_state, perturbed_file, sets):
    """Features to 1e-4 of their scale against the graph node by node in float64, and in float32 as torchmetrics
    runs it: what folding and channels-last change is float32 rounding only."""
    fast = load_inception(perturbed_file)
    fast.input_size = SMALL
    exact, float32 = graph_module(perturbed_state).double(), graph_module(perturbed_state)
    images = torch.from_numpy(np.concatenate(sets)).permute(0, 3, 1, 2)  # (8, 3, H, W)
    with torch.inference_mode():
        ours, truth, theirs = fast(images), exact(images), float32(images)
    for name in ("pool", "spatial", "logits"):
        scale = getattr(truth, name).abs().max()
        assert scale > 0 and getattr(truth, name).std(dim=0).mean() > 1e-3 * scale  # features vary between images
        for other in (truth, theirs):
            assert (getattr(ours, name).double() - getattr(other, name)).abs().max() <= 1e-4 * scale, name


def test_fast_inception_fid_equals_torchmetrics_on_the_graph(perturbed_state, perturbed_file, sets):
    """`dit fid`'s extraction with the module load_inception returns against torchmetrics' FID driving the graph as
    written (torch-fidelity's structure): FID equal to 1e-3 relative."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    reference = FrechetInceptionDistance(feature=PoolOnly(graph_module(perturbed_state)))
    for images, real in zip(sets, (True, False)):
        reference.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=real)
    fast = load_inception(perturbed_file)
    fast.input_size = SMALL
    ref_acts, sample_acts = (features.extract(iter([images]), fast, CPU) for images in sets)
    ours = scores.frechet_distance(*sample_acts.pool.stats(), *ref_acts.pool.stats())
    assert ours > 1e-3
    assert rel(ours, float(reference.compute())) < 1e-3


# Metrics against peers and closed forms.

class PoolOnly(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.num_features = 2048

    def forward(self, images):
        return self.net(images).pool


def test_fid_matches_torchmetrics_with_our_inception(small_net, sets, inception_acts):
    from torchmetrics.image.fid import FrechetInceptionDistance

    reference = FrechetInceptionDistance(feature=PoolOnly(small_net))
    for images, real in zip(sets, (True, False)):
        reference.update(torch.from_numpy(images).permute(0, 3, 1, 2), real=real)
    theirs = float(reference.compute())
    ours = scores.frechet_distance(*inception_acts[1].pool.stats(), *inception_acts[0].pool.stats())
    assert ours > 1e-3
    assert rel(ours, theirs) < 1e-6


def test_inception_batch_size_does_not_matter(small_net, sets):
    """In float64 kernel rounding vanishes, so any dependence on the batch would show; in float32 random calibrated
    layers amplify the kernels' batch-dependent rounding to ~1e-5 (the batch 1 vs 37 test below uses float32)."""
    net64 = copy.deepcopy(small_net).double()
    batched = features.extract(iter([sets[0]]), net64, CPU)
    one_by_one = features.extract((image[None] for image in sets[0]), net64, CPU)
    for ours, reference in ((one_by_one.pool, batched.pool), (one_by_one.spatial, batched.spatial)):
        for a, b in zip(ours.stats(), reference.stats()):
            assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    assert rel(one_by_one.scores.score(), batched.scores.score()) < 1e-10
    assert torch.allclose(one_by_one.pool_features, batched.pool_features, rtol=1e-6, atol=0)


def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    # Commuting covariances: |dmu|^2 + sum (sqrt a - sqrt b)^2.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert rel(scores.frechet_distance(mu1, q @ a.diag().double() @ q.T, mu2, q @ b.diag().double() @ q.T),
               expected) < 1e-12
    # Non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 with positive eigenvalues.
    s1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    m = s1 @ s2
    expected = float(s1.trace() + s2.trace() - 2 * torch.sqrt(m.trace() + 2 * torch.sqrt(torch.linalg.det(m))))
    assert rel(scores.frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2), expected) < 1e-12
    assert scores.frechet_distance(mu1, a.diag(), mu1, a.diag()) == pytest.approx(0.0, abs=1e-12)
    assert scores.frechet_distance(mu1, torch.zeros(3, 3), mu2, torch.zeros(3, 3)) == 5.0  # point masses


def test_frechet_distance_agrees_with_adm_sqrtm_on_full_rank_statistics():
    generator = np.random.default_rng(0)
    x, y = generator.normal(size=(400, 32)), generator.normal(size=(300, 32)) @ generator.normal(size=(32, 32)) + 0.3
    mu1, sigma1, mu2, sigma2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real  # ADM's FIDStatistics.frechet_distance
    adm = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert rel(scores.frechet_distance(*map(torch.from_numpy, (mu1, sigma1, mu2, sigma2))), adm) < 1e-9


def test_moments_match_numpy_cov_for_any_batching():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 7
    for sizes in ([50], [1] * 50, [37, 13], [5, 20, 25]):
        moments = features.Moments()
        for chunk in x.split(sizes):
            moments.update(chunk)
        mu, sigma = moments.stats()
        assert torch.allclose(mu, x.mean(0), rtol=0, atol=1e-12)
        assert np.allclose(sigma.numpy(), np.cov(x.numpy(), rowvar=False), rtol=0, atol=1e-12)


def test_inception_score_uses_adm_splits():
    logits = torch.randn(12000, 10, generator=torch.Generator().manual_seed(0)) * 2
    p = torch.softmax(logits.double(), dim=1).numpy()
    expected = []
    for start in range(0, len(p), 5000):  # splits of 5000, 5000 and 2000 as ADM's compute_inception_score
        part = p[start:start + 5000]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        expected.append(np.exp(kl))
    for batch in (12000, 37, 4999):
        splits = features.ScoreSplits()
        for chunk in logits.split(batch):
            splits.update(chunk)
        assert splits.sizes == [5000, 5000, 2000]
        assert rel(splits.score(), float(np.mean(expected))) < 1e-10


def brute_force_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    def sq(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    ref_radii = np.sort(sq(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(sq(samples, samples), axis=1)[:, k]
    d = sq(ref, samples)  # (R, S)
    return float((d <= ref_radii[:, None]).any(0).mean()), float((d <= sample_radii[None]).any(1).mean())


def test_precision_recall_follow_adm_manifold_semantics():
    generator = np.random.default_rng(0)
    ref = generator.integers(-8, 8, size=(60, 5)).astype(np.float32)
    samples = np.concatenate([ref[:20] + 0.5, generator.integers(20, 40, size=(30, 5))]).astype(np.float32)
    precision, recall = scores.precision_recall(torch.from_numpy(ref), torch.from_numpy(samples))
    assert (precision, recall) == brute_force_pr(ref, samples)
    assert 0 < precision < 1 and 0 < recall < 1
    assert scores.precision_recall(torch.from_numpy(ref), torch.from_numpy(ref)) == (1.0, 1.0)


def direct_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 with the cubic polynomial kernel, written out as sums over pairs."""
    def k(a, b):
        return (a @ b / len(a) + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_through_the_cli_matches_a_direct_computation(tmp_path, tiny_file):
    # Equal counts on both sides: every subset holds every image, so each subset's estimate is the full one.
    sample_images, ref_images = image_set(12, 0, 200, seed=21, size=16), image_set(12, 40, 256, seed=22, size=16)
    samples, ref = save_npz(tmp_path / "s.npz", arr_0=sample_images), save_npz(tmp_path / "r.npz", arr_0=ref_images)
    scores = json.loads(run(samples, "--ref", ref, "--features", tiny_file, "--json").stdout)
    extractor, _ = features.load_feature_extractor(str(tiny_file), CPU)
    x, y = (features.extract([images], extractor, CPU).pool_features.double().numpy()
            for images in (sample_images, ref_images))
    assert scores["kid"] == pytest.approx(direct_mmd2(x, y), rel=1e-6) and scores["kid"] > 0  # float32 features
    assert scores["kid_std"] == pytest.approx(0, abs=1e-6 * abs(scores["kid"]))  # only summation order differs


def test_kid_subsets_are_unbiased_estimates_with_a_spread():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=generator), torch.randn(50, 5, generator=generator) + 0.5
    kid, std = scores.kernel_inception_distance(x, y, subsets=20, subset_size=10)
    subset_values = [scores.polynomial_mmd2(x[torch.randperm(60)[:10]], y[torch.randperm(50)[:10]])
                     for _ in range(200)]
    assert std > 0 and abs(kid - np.mean(subset_values)) < 3 * std
    assert scores.polynomial_mmd2(x, y) == pytest.approx(direct_mmd2(x.double().numpy(), y.double().numpy()))
    assert scores.kernel_inception_distance(x, y, subsets=20, subset_size=10) == (kid, std)  # fixed seed
    with pytest.raises(UserError, match="KID needs at least 2 images"):
        scores.kernel_inception_distance(x[:1], y)


def test_distances_round_through_float16_and_fall_back_on_overflow():
    u = torch.tensor([[1.0, 2.0001]])
    v = torch.tensor([[0.0, 0.0]])
    assert scores.adm_sq_distances(u, v).item() == float(torch.tensor(5.0004).half())
    big = torch.full((1, 4), 300.0)  # |u|^2 = 360000 overflows float16
    assert scores.adm_sq_distances(big, torch.zeros(1, 4)).item() == 360000.0


# The pipeline end to end, with the tiny extractor.

def test_batch_1_and_37_give_the_same_scores(tmp_path, tiny_file):
    samples = save_npz(tmp_path / "samples.npz", arr_0=image_set(40, 0, 200, seed=3, size=16))
    ref = save_pngs(tmp_path / "ref", image_set(30, 40, 256, seed=4, size=16))
    results = [fid.evaluate(fid.FidConfig(samples, ref, batch_size=bs, features=str(tiny_file)), CPU)
               for bs in (1, 37)]
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert rel(getattr(results[0], name), getattr(results[1], name)) < 1e-6, name
    assert results[0].fid > 1e-3 and results[0].num_samples == 40 and results[0].num_ref == 30


def test_make_ref_then_score_through_the_cli(tmp_path, tiny_file):
    sizes = [(40, 30), (30, 40), (24, 24), (50, 26)]
    originals = [image_set(1, 0, 256, seed=i, size=32)[0] for i in range(4)]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, ((w, h), image) in enumerate(zip(sizes, originals)):
        Image.fromarray(image).resize((w, h)).save(folder / f"{i}.png")
    result = run("--make-ref", folder, "-o", tmp_path / "ref.npz", "--resize", 16, "--features", tiny_file, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_images"] == 4
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["arr_0"].shape == (4, 16, 16, 3) and ref["arr_0"].dtype == np.uint8
        with Image.open(folder / "3.png") as image:
            assert np.array_equal(ref["arr_0"][3], center_crop_arr(image.convert("RGB"), 16))
        assert ref["mu"].shape == (128,) and ref["sigma"].shape == (128, 128) and ref["mu_s"].shape == (32,)
        arr_0, sigma, sigma_s = ref["arr_0"], ref["sigma"], ref["sigma_s"]
    save_npz(tmp_path / "samples.npz", arr_0=arr_0)
    result = run(tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", "--features", tiny_file, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert abs(scores["fid"]) < 1e-9 * np.trace(sigma) and abs(scores["sfid"]) < 1e-9 * np.trace(sigma_s)
    assert scores["precision"] == scores["recall"] == 1.0
    assert scores["ref_stats"].startswith("stored mu/sigma/mu_s/sigma_s")
    assert any("only 4 samples for 128 features: the covariance is rank-deficient" in w for w in scores["warnings"])


def test_self_fid_with_inception_round_trip(tmp_path, weights_file, sets, monkeypatch):
    monkeypatch.setattr(InceptionV3, "input_size", SMALL)
    folder = save_pngs(tmp_path / "ref", sets[0])
    result = run("--make-ref", folder, "-o", tmp_path / "ref.npz", "--resize", 24,
                 "--inception-weights", weights_file, "--device", "cpu")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma_s"].shape == (3 * 3 * 7, 3 * 3 * 7)  # 17x17 at 299
        assert np.array_equal(ref["arr_0"], sets[0])
        trace = np.trace(ref["sigma"])
    result = run(tmp_path / "ref.npz", "--ref", tmp_path / "ref.npz", "--inception-weights", weights_file,
                 "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert trace > 1e-6 and abs(scores["fid"]) < 1e-9 * trace
    assert scores["precision"] == scores["recall"] == 1.0


def test_sample_folder_skips_grid_and_reports_warnings(tmp_path, tiny_file):
    images = image_set(6, 0, 200, seed=5, size=16)
    images[0] = 7  # a flat image, as NaN latents decode to
    folder = save_pngs(tmp_path / "samples", images)
    Image.new("RGB", (64, 48)).save(folder / "grid.png")
    (folder / "provenance.json").write_text(json.dumps({"run_key": "x", "complete": False}))
    ref = save_npz(tmp_path / "ref.npz", arr_0=image_set(5, 0, 256, seed=6, size=32))
    result = run(folder, "--ref", ref, "--features", tiny_file, "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["num_samples"] == 6
    warnings = " ".join(scores["warnings"])
    assert "1 of 6 sample images are a single flat colour" in warnings
    assert "samples are 16x16 but the reference is 32x32" in warnings
    assert "run has not finished" in warnings
    result = run(folder, "--ref", ref, "--features", tiny_file)
    assert result.exit_code == 0 and "FID" in result.stdout and "warning:" in result.stdout


def test_registered_and_safetensors_extractors(tmp_path):
    seen = []

    def factory(path, device):
        seen.append(path)
        return lambda images: images.float().mean(dim=(2, 3))  # (N, 3)

    features.register_feature_extractor("test-mean-colour", factory)
    samples = save_npz(tmp_path / "s.npz", arr_0=image_set(5, 0, 200, seed=7, size=8))
    ref = save_npz(tmp_path / "r.npz", arr_0=image_set(5, 50, 256, seed=8, size=8))
    scores = json.loads(run(samples, "--ref", ref, "--features", "test-mean-colour", "--json").stdout)
    assert scores["sfid"] is None and scores["inception_score"] is None and scores["fid"] > 0
    tagged = tmp_path / "judge.safetensors"
    save_file({"w": torch.zeros(1)}, str(tagged), metadata={"feature_extractor": "test-mean-colour"})
    result = run(samples, "--ref", ref, "--features", tagged, "--json")
    assert result.exit_code == 0, result.output
    assert seen == [None, tagged] and json.loads(result.stdout)["fid"] == pytest.approx(scores["fid"])


def test_fashion_judge_file_selects_its_extractor(tmp_path):
    from ditcli.evaluation.judge import FashionJudge, save_judge

    torch.manual_seed(0)
    save_judge(FashionJudge(), tmp_path / "judge.safetensors", accuracy=0.0)
    samples = save_npz(tmp_path / "s.npz", arr_0=image_set(6, 0, 200, seed=15, size=28))
    ref = save_npz(tmp_path / "r.npz", arr_0=image_set(6, 50, 256, seed=16, size=28))
    result = run(samples, "--ref", ref, "--features", tmp_path / "judge.safetensors", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert scores["features"] == "judge.safetensors" and scores["fid"] > 0 and scores["sfid"] is None
    assert 1.0 <= scores["inception_score"] <= 10.0  # 10 classes bound the score


# Weights download.

@pytest.fixture()
def file_server(tmp_path):
    payload = b"inception weights stand-in" * 100
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "w.pth").write_bytes(payload)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/w.pth", payload
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{inception.WEIGHTS_NAME}"


def test_download_checks_the_checksum(tmp_path, file_server):
    url, payload = file_server
    dest = tmp_path / "cache" / "w.pth"
    with pytest.raises(UserError, match="checksum does not match"):
        fetch_weights(url, sha256="0" * 64, dest=dest)
    assert not dest.exists() and not dest.with_name("w.pth.part").exists()
    assert fetch_weights(url, sha256=hashlib.sha256(payload).hexdigest(), dest=dest) == dest
    assert dest.read_bytes() == payload
    assert fetch_weights(closed_port_url(), dest=dest) == dest  # cached: no network needed


def test_offline_without_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(inception, "WEIGHTS_URL", closed_port_url())
    samples = save_npz(tmp_path / "s.npz", arr_0=image_set(2, 0, 256, seed=9, size=8))
    where = str(tmp_path / "home" / inception.WEIGHTS_NAME)
    result = run(samples, "--ref", samples, "--device", "cpu")
    assert_user_error(result, "download failed: no connection", where, inception.WEIGHTS_URL, "--inception-weights")
    monkeypatch.setenv("DIT_OFFLINE", "1")
    assert_user_error(run(samples, "--ref", samples), "downloads are off", where, inception.WEIGHTS_URL)


# Bad input.

@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "has no arr_0 (it holds images)"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "arr_0 is float32 with shape (2, 8, 8, 3), expected uint8"),
    ({"arr_0": np.zeros((2, 8, 8, 2), np.uint8)},
     "arr_0 is uint8 with shape (2, 8, 8, 2), expected uint8 (N, H, W, 3), (N, H, W, 1) or (N, H, W)"),
])
def test_bad_npz_samples(tmp_path, arrays, message):
    samples = save_npz(tmp_path / "s.npz", **arrays)
    ref = save_npz(tmp_path / "r.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert_user_error(run(samples, "--ref", ref), message)


def test_missing_reference_and_samples(tmp_path):
    samples = save_npz(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert_user_error(run(samples, "--ref", tmp_path / "nope.npz"), "reference not found", "VIRTUAL_imagenet256")
    assert_user_error(run(tmp_path / "nope.npz", "--ref", samples), "samples not found")
    assert_user_error(run(samples), "--ref is required")
    assert_user_error(run("--make-ref", tmp_path), "needs -o PATH")
    assert_user_error(run(samples, "--ref", samples, "--features", "resnet"), "unknown feature extractor 'resnet'")
    assert_user_error(run(samples, "--ref", samples, "--features", "x.pt", "--inception-weights", "w.pth"),
                      "--inception-weights only applies")
    (tmp_path / "not.npz").write_bytes(b"plain text")
    assert_user_error(run(samples, "--ref", tmp_path / "not.npz"), "not.npz is not an .npz", "no zip")


def test_corrupt_and_mixed_images(tmp_path, tiny_file):
    ref = save_npz(tmp_path / "r.npz", arr_0=image_set(3, 0, 256, seed=10, size=8))
    folder = save_pngs(tmp_path / "garbage", image_set(2, 0, 256, seed=11, size=8))
    (folder / "broken.png").write_bytes(b"not a png")
    assert_user_error(run(folder, "--ref", ref, "--features", tiny_file), "cannot read image", "broken.png")

    folder = save_pngs(tmp_path / "truncated", image_set(2, 0, 256, seed=12, size=64))
    data = (folder / "000001.png").read_bytes()
    (folder / "000001.png").write_bytes(data[:len(data) // 2])
    assert_user_error(run(folder, "--ref", ref, "--features", tiny_file), "cannot decode image", "000001.png")

    folder = save_pngs(tmp_path / "mixed", image_set(2, 0, 256, seed=13, size=8))
    Image.fromarray(image_set(1, 0, 256, seed=14, size=12)[0]).save(folder / "big.png")
    assert_user_error(run(folder, "--ref", ref, "--features", tiny_file), "mixed image sizes", "--resize")
    result = run(folder, "--ref", ref, "--features", tiny_file, "--resize", 8, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_samples"] == 3


def test_a_corrupt_safetensors_extractor_or_judge_is_one_line(tmp_path):
    from ditcli.errors import UserError
    from ditcli.evaluation.judge import load_judge

    bad = tmp_path / "features.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        features.load_feature_extractor(str(bad), torch.device("cpu"))
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        load_judge(bad)
