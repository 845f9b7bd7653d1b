"""The GPU suite: what only a CUDA device can show. `benchmarks/gpu.sh` runs it with the DiT-XL/2 timings.

Each test runs on CUDA when there is one and otherwise, where it means something, on the CPU at a tiny size; what
needs CUDA is skipped with the reason. With DIT_GPU_REPORT=DIR each test adds its figures to DIR/gpu-tests.json.
"""

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturbed

from ditcli.data.sources import ImageSet
from ditcli.diffusion.ddpm import Diffusion
from ditcli.diffusion.guidance import Guidance, ImageNoise
from ditcli.diffusion.objectives import FlowObjective
from ditcli.diffusion.samplers import plan_sampler
from ditcli.model.dit import DiT, preset, training_flops
from ditcli.runtime import set_backend_flags
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import sample_latents
from ditcli.training.config import TrainConfig
from ditcli.training.trainer import Trainer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
pytestmark = pytest.mark.gpu


@pytest.fixture
def report(request):
    """report(key=value, ...) records this test's figures in $DIT_GPU_REPORT/gpu-tests.json."""
    figures = {}
    yield figures.update
    folder = os.environ.get("DIT_GPU_REPORT")
    if folder and figures:
        path = Path(folder) / "gpu-tests.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data[request.node.name] = {"device": str(DEVICE), **figures}
        path.write_text(json.dumps(data, indent=1))


def model_for_device(seed: int = 0) -> DiT:
    """DiT-B/2 at 32x32 latents (256 px) on CUDA; a 2-block, 64-wide DiT at 8x8 on the CPU."""
    if CUDA:
        config = preset("DiT-B/2", input_size=32)
    else:
        config = preset("DiT-S/2", input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    torch.manual_seed(seed)
    return perturbed(DiT(config), seed=seed, std=0.02).to(DEVICE)


def xl_model_for_device(seed: int = 0) -> DiT:
    """DiT-XL/2 at 32x32 latents on CUDA, built and perturbed on the GPU (drawing its 675M weights on one CPU thread
    takes about 20 s); the CPU's tiny DiT of `model_for_device` otherwise."""
    if not CUDA:
        return model_for_device(seed)
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = DiT(preset("DiT-XL/2", input_size=32))
    generator = torch.Generator(DEVICE).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":  # as conftest's `perturbed`, with the draws on the GPU
                p.add_(torch.randn(p.shape, generator=generator, device=DEVICE) * 0.02)
    return model.eval()


def synchronize():
    if CUDA:
        torch.cuda.synchronize()


def batch_for(model: DiT, n: int):
    c = model.config
    g = torch.Generator().manual_seed(1)
    x_start = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x_start.shape, generator=g)
    y = torch.randint(0, c.num_classes, (n,), generator=g)
    return [v.to(DEVICE) for v in (x_start, t, noise, y)]


def loss_and_grad(model: DiT, diffusion: Diffusion, batch, dtype: torch.dtype):
    x_start, t, noise, y = batch
    model.zero_grad(set_to_none=True)
    x_t = diffusion.q_sample(x_start, t, noise)
    with torch.autocast(DEVICE.type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(x_t, t, y)
    loss = diffusion.training_losses(out.float(), x_start, x_t, t, noise)["loss"].mean()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grad


def test_bf16_training_step_is_finite_and_close_to_fp32(report):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_for_device().train()
    diffusion = Diffusion.create("")
    batch = batch_for(model, 16)
    loss32, grad32 = loss_and_grad(model, diffusion, batch, torch.float32)
    loss16, grad16 = loss_and_grad(model, diffusion, batch, torch.bfloat16)
    cosine = torch.nn.functional.cosine_similarity(grad32, grad16, dim=0).item()
    report(loss_fp32=loss32, loss_bf16=loss16, grad_cosine=cosine)
    assert torch.isfinite(torch.tensor(loss16)) and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert cosine > 0.99


def test_flow_training_step_bf16(report, tmp_path):
    """Four steps of `dit train --objective flow --precision bf16` through the Trainer: bf16 autocast over fp32 master
    weights, fused AdamW, EMA. DiT-XL/2 at 32x32 (a 256 px latent's 256 tokens; in pixel space, since the Trainer
    takes 1 or 3 channels without a VAE) at batch 32 on CUDA; the tiny DiT at 8x8, batch 16, on the CPU."""
    set_backend_flags()  # TF32 and cuDNN autotuning, as `dit train` sets them
    size, batch = (32, 32) if CUDA else (8, 16)
    shape = {} if CUDA else dict(hidden_size=64, depth=2, num_heads=2)
    classes = 1000 if CUDA else 10
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (4 * batch, size, size, 3), dtype=np.uint8), np.arange(4 * batch) % classes,
                      [str(i) for i in range(classes)], "synthetic")
    config = TrainConfig(data="synthetic", out=str(tmp_path / "run"), model="DiT-XL/2" if CUDA else "DiT-S/2",
                         image_size=size, vae=None, objective="flow", precision="bf16", global_batch=batch, steps=4,
                         device=DEVICE.type, **shape)
    trainer = Trainer(config, images=images)
    trainer.setup()
    model = trainer.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    dtypes = set()
    model.final_layer.linear.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))

    # Step 1 warms up (cuBLAS handles, autotuning); steps 2-4 are timed.
    steps, seconds = [], []
    for _ in range(config.steps):
        synchronize()
        start = time.perf_counter()
        steps.append(trainer.train_step())
        synchronize()
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[1:])
    losses = [m["loss"] for m in steps]
    report(model=config.model, batch=batch, losses=losses, step_ms=1e3 * step_s, img_per_s=batch / step_s,
           tflops=training_flops(trainer.model_config) * batch / step_s / 1e12)

    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and not m["skipped"] for m in steps)
    assert dtypes == {torch.bfloat16}  # the forward ran under bf16 autocast
    # adaLN-Zero: each step's gradients reach further into the zero init (the output layer, then the modulations and
    # the patch embedding, then the rest), so after 3 steps every weight has moved.
    unmoved = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[name])]
    assert not unmoved, f"{len(unmoved)} weights never moved, e.g. {unmoved[:3]}"
    assert torch.equal(model.pos_embed, before["pos_embed"])  # the fixed table stays fixed
    # The master weights, their EMA and AdamW's moments stay fp32.
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0]
    tensors = [*model.parameters(), *trainer.ema.parameters(), *state]
    assert {t.dtype for t in tensors} == {torch.float32}


@needs_cuda
def test_compiled_model_matches_eager(report):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_for_device().eval()
    x, t, _, y = batch_for(model, 8)
    with torch.no_grad():
        eager = model(x, t, y)
        compiled = torch.compile(model)(x, t, y)
    scale = eager.abs().max().item()
    drift = (compiled - eager).abs().max().item()
    report(max_abs_drift=drift, scale=scale)
    assert drift <= 1e-3 * scale


@needs_cuda
def test_sdpa_runs_a_fused_kernel_not_math(report):
    """With the math backend ruled out the forward must still run, and the profiler must see a fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    model = model_for_device().eval()
    x, t, _, y = batch_for(model, 8)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            model(x, t, y)  # raises "No available kernel" if only the math path would do
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x, t, y)
            torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    fused = sorted(n for n in names if any(k in n.lower() for k in ("flash", "fmha", "efficient_attention")))
    report(attention_kernels=fused[:4])
    assert fused, f"no flash/efficient attention kernel among {sorted(names)[:20]}"


def test_bf16_sampling_drift_against_fp32(report):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = model_for_device().eval()
    steps = 25 if CUDA else 5
    plan = plan_sampler("ddim", steps, model.config.learn_sigma)
    latents = {}
    for precision in ("fp32", "bf16"):
        config = GenerateConfig(labels=tuple(range(8)), seed=0, sampler="ddim", steps=steps, precision=precision)
        latents[precision] = sample_latents(model, plan, config, list(range(8)), 8, DEVICE)[0]
    rms = latents["fp32"].pow(2).mean().sqrt().item()
    drift = (latents["bf16"] - latents["fp32"]).pow(2).mean().sqrt().item()
    report(steps=steps, rms_fp32=rms, rms_drift=drift, relative_drift=drift / rms)
    assert torch.isfinite(latents["bf16"]).all()
    assert drift <= 0.1 * rms


def flow_sample(model: DiT, sampler: str, steps: int, precision: str) -> tuple[torch.Tensor, float]:
    """Images 0-7 (classes 0-7) of a cfg-4 run of a SiT-direction flow model from seed 0: the latents and the
    milliseconds per step."""
    config = GenerateConfig(labels=tuple(range(8)), seed=0, sampler=sampler, steps=steps, guidance=Guidance(4.0),
                            precision=precision, objective=FlowObjective("noise-to-data"))
    plan = config.plan(model.config.learn_sigma)
    synchronize()
    start = time.perf_counter()
    latents = sample_latents(model, plan, config, list(range(8)), 8, DEVICE)[0]
    synchronize()
    return latents, 1e3 * (time.perf_counter() - start) / steps


def test_flow_sampling_bf16_drift(report):
    """Heun and Euler with cfg 4 in bf16 against fp32 (TF32 off) from the same noise: DiT-XL/2 at 32x32, 25 steps, on
    CUDA; the tiny DiT, 5 steps, on the CPU.

    A flow sample is its starting noise plus what the model moved it, and the noise is the same in both runs, so the
    error of image i is RMS(bf16_i - fp32_i) / RMS(fp32_i - noise_i): relative to the move, not to the image. Measured
    on the CPU it is 0.9-1.2% for the tiny DiT, a 28-block one and DiT-XL/2 (8x8 latents), at 5 and 25 steps, for
    both samplers: bf16's unit roundoff (0.4%) a few times over, not growing with the steps. Keeping the sampler's
    state in bf16 instead gives 9-25% (Euler, 25 steps). The bound, 3%, leaves 2.5x headroom for CUDA's kernels and
    stays 3x below that.
    """
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = xl_model_for_device()
    steps = 25 if CUDA else 5
    for precision in ("fp32", "bf16"):  # warm-up: kernels and their heuristics, out of the timings
        flow_sample(model, "euler", 1, precision)
    for sampler in ("heun", "euler"):
        (fp32, ms_fp32), (bf16, ms_bf16) = (flow_sample(model, sampler, steps, p) for p in ("fp32", "bf16"))
        noise = ImageNoise(0, range(8))(fp32)  # the first draw of each image's generator: where sampling started
        dims = tuple(range(1, fp32.ndim))
        error = (bf16 - fp32).pow(2).mean(dims).sqrt() / (fp32 - noise).pow(2).mean(dims).sqrt()  # (8,)
        report(**{f"{sampler}_steps": steps, f"{sampler}_ms_per_step_fp32": ms_fp32,
                  f"{sampler}_ms_per_step_bf16": ms_bf16, f"{sampler}_max_error": error.max().item(),
                  f"{sampler}_mean_error": error.mean().item()})
        assert torch.isfinite(bf16).all()
        assert error.max().item() <= 0.03, sampler



def test_meanflow_training_step_bf16(report, tmp_path):
    """Four steps of `dit train --objective meanflow --precision bf16` through the Trainer, DMF's recipe: the decoupled
    form (blocks 0-19 of DiT-XL/2 see t, the rest r), model guidance 0.6 on t in [0, 0.7], REPA's time direction. Each
    step is one differentiable forward through DDP, the guidance's doubled forward and the JVP (math attention) on the
    unwrapped module. DiT-XL/2 at 32x32, batch 32, on CUDA; the tiny DiT at 8x8 on the CPU."""
    set_backend_flags()
    size, batch = (32, 32) if CUDA else (8, 16)
    shape = dict(decoupled_depth=20) if CUDA else dict(hidden_size=64, depth=2, num_heads=2, decoupled_depth=1)
    classes = 1000 if CUDA else 10
    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 256, (4 * batch, size, size, 3), dtype=np.uint8), np.arange(4 * batch) % classes,
                      [str(i) for i in range(classes)], "synthetic")
    config = TrainConfig(data="synthetic", out=str(tmp_path / "run"), model="DiT-XL/2" if CUDA else "DiT-S/2",
                         image_size=size, vae=None, objective="meanflow", time_direction="data-to-noise",
                         learn_sigma=False, train_guidance="model", train_omega=0.6, train_guidance_interval="0,0.7",
                         precision="bf16", global_batch=batch, steps=4, device=DEVICE.type, **shape)
    trainer = Trainer(config, images=images)
    trainer.setup()
    steps, seconds = [], []
    for _ in range(config.steps):  # step 1 warms up; 2-4 are timed
        synchronize()
        start = time.perf_counter()
        steps.append(trainer.train_step())
        synchronize()
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[1:])
    report(model=config.model, batch=batch, losses=[m["loss"] for m in steps], mse=[m["mse"] for m in steps],
           step_ms=1e3 * step_s, img_per_s=batch / step_s,
           peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if CUDA else None)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and not m["skipped"] for m in steps)


def test_meanflow_one_step_sampling_throughput(report):
    """One-step sampling of a decoupled mean-flow DiT-XL/2 (random weights) in bf16 at batch 64, no runtime guidance:
    the flow map from noise to data in one forward per image; images per second, and a finite result."""
    from ditcli.diffusion.objectives import MeanFlowObjective

    set_backend_flags()
    if CUDA:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = DiT(preset("DiT-XL/2", input_size=32, mean_flow_form="decoupled", decoupled_depth=20)).eval()
        batch, rounds = 64, 5
    else:
        model = DiT(preset("DiT-S/2", input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                           mean_flow_form="decoupled", decoupled_depth=1)).eval()
        batch, rounds = 8, 2
    config = GenerateConfig(labels=tuple(i % 10 for i in range(batch)), sampler="flow-map", steps=1,
                            precision="bf16", batch_size=batch, objective=MeanFlowObjective("data-to-noise"))
    plan = config.plan(model.config.learn_sigma)
    sample_latents(model, plan, config, list(range(batch)), batch, DEVICE)  # warm-up
    synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        latents = sample_latents(model, plan, config, list(range(batch)), batch, DEVICE)[0]
    synchronize()
    seconds = (time.perf_counter() - start) / rounds
    report(model="DiT-XL/2" if CUDA else "tiny", batch=batch, nfe=plan.nfe, seconds_per_batch=seconds,
           img_per_s=batch / seconds)
    assert plan.nfe == 1 and torch.isfinite(latents).all()


@pytest.mark.slow
def test_one_process_torchrun_train_then_resume(report, tmp_path):
    """`torchrun --nproc-per-node 1`: a process group of one (nccl on CUDA, gloo on the CPU) and DDP, then a resume
    that continues to the same weights as a straight run."""
    import numpy as np

    from ditcli.io import safe_torch_load

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "D.npz", images=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
             labels=np.arange(32) % 4)
    common = ["--data", str(tmp_path / "D.npz"), "--vae", "none", "--image-size", "16", "--model", "DiT-S/4",
              "--hidden-size", "48", "--depth", "2", "--num-heads", "3", "--global-batch", "8", "--lr", "1e-3",
              "--device", DEVICE.type, "--ckpt-every", "3", "--json"]

    def train(out: str, steps: int, *extra: str):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                   "-m", "ditcli", "train", *common, "--out", str(tmp_path / out), "--steps", str(steps), *extra]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-2000:]

    train("straight", 6)
    train("resumed", 3)
    train("resumed", 6, "--resume", "auto")
    a = safe_torch_load(tmp_path / "straight" / "ckpt-0000006.pt")
    b = safe_torch_load(tmp_path / "resumed" / "ckpt-0000006.pt")
    drift = max((a["ema"][k] - b["ema"][k]).abs().max().item() for k in a["ema"])
    report(backend="nccl" if CUDA else "gloo", max_abs_ema_drift=drift)
    assert drift <= (1e-4 if CUDA else 0.0)


@needs_cuda
def test_inception_features_on_cuda_equal_the_cpu(report):
    """The FID network on CUDA (TF32 off) against the CPU, to 1e-4 of the features' scale; torch-fidelity's weights
    when they are in the cache, else seeded random ones (the kernels are what is compared; the device machines have no
    network to fetch the weights)."""
    from ditcli.downloads import home_dir
    from ditcli.evaluation.inception import WEIGHTS_NAME, InceptionV3, load_inception

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    weights = home_dir() / WEIGHTS_NAME
    if weights.is_file():
        cpu = load_inception(weights)
    else:  # Kaiming-normal convolutions keep the features O(1) through the network (default init: ~1e-7)
        torch.manual_seed(0)
        cpu = InceptionV3()
        for module in cpu.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
        cpu.fold_batchnorm().to(memory_format=torch.channels_last)  # prepared as load_inception returns it
    cpu = cpu.eval()
    images = torch.randint(0, 256, (8, 3, 256, 256), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        ref = cpu(images)
        got = cpu.to("cuda")(images.cuda())
    report(weights="torch-fidelity" if weights.is_file() else "random")
    for name, a, b in zip(ref._fields, ref, got):
        scale = a.abs().max().item()
        drift = (b.cpu() - a).abs().max().item()
        report(**{f"{name}_relative_drift": drift / scale})
        assert drift <= 1e-4 * scale, name
