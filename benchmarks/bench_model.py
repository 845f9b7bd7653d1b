"""Side-by-side timings on one machine: our DiT against diffusers' DiTTransformer2DModel and a reference-style
training step, with medians over repeats, ratios and MFU against the matmul peak measured in the same run.

    python benchmarks/bench_model.py                      # CPU: writes benchmarks/results/<device>.json
    python benchmarks/bench_model.py --device cuda --compile --models DiT-XL/2 --train-model DiT-XL/2

(a) denoiser forward, (b) a whole sampling loop with CFG, (c) a training step. FID feature extraction (d) is
benchmarks/bench_fid.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ditcli.diffusion.ddpm import Diffusion, named_betas
from ditcli.diffusion.guidance import Guidance, ImageNoise, guided_model_fn
from ditcli.diffusion.samplers import plan_sampler
from ditcli.model.dit import DiT, count_parameters, forward_macs, preset, training_flops
from ditcli.sampling.forward import compiled as freezing_compile
from ditcli.sampling.forward import inference_model

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(variants: dict, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each callable, timed in alternation so that load from other processes hits all alike."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, max_size: int = 8192, repeats: int = 5) -> float:
    """GFLOP/s of a square matmul, the peak for MFU: the size doubles from 256 while one product takes < 50 ms."""
    size = 256
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds = median_seconds(lambda: a @ b, device, repeats)
        if seconds > 0.05 or size >= max_size:
            return 2 * size ** 3 / seconds / 1e9
        size *= 2


def measure_peaks(device: torch.device) -> dict:
    return {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}


def random_dit(name: str, device: torch.device, seed: int = 0) -> DiT:
    """A DiT at 256 px with weights moved off the zero init, so every layer does real work."""
    torch.manual_seed(seed)
    model = DiT(preset(name, input_size=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.to(device).eval()


def diffusers_twin(model: DiT, device: torch.device):
    """diffusers' DiTTransformer2DModel carrying the same weights, through our key map."""
    from diffusers import DiTTransformer2DModel

    from ditcli.weights.diffusers_format import to_diffusers_state, transformer_config

    config = {k: v for k, v in transformer_config(model.config).items() if not k.startswith("_")}
    twin = DiTTransformer2DModel(**config)
    state, _ = to_diffusers_state({k: v.cpu() for k, v in model.state_dict().items()}, model.config)
    twin.load_state_dict(state)
    return twin.to(device).eval()


def inputs(config, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    y = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
    return x, t, y


def bench_forward(name: str, batch: int, device: torch.device, repeats: int, compile_model: bool,
                  peaks: dict) -> list[dict]:
    """(a) One denoiser forward: ours (fp32, bf16, optionally compiled) against diffusers fp32 and bf16."""
    model = random_dit(name, device)
    twin = diffusers_twin(model, device)
    x, t, y = inputs(model.config, batch, device)
    flops = 2 * forward_macs(model.config) * batch
    rows = []
    with torch.inference_mode():
        reference = twin(x, timestep=t, class_labels=y).sample.float()
        fp32_out = model(x, t, y)
        variants = [("diffusers", "fp32", lambda: twin(x, timestep=t, class_labels=y)),
                    ("ours", "fp32", lambda: model(x, t, y))]
        if bf16_viable(peaks):
            variants += [("diffusers", "bf16", lambda: _autocast(device, lambda: twin(x, timestep=t, class_labels=y))),
                         ("ours", "bf16", lambda: _autocast(device, lambda: model(x, t, y)))]
        if bf16_viable(peaks):  # the inference path of `dit sample --precision bf16`: weights cast once
            cast = inference_model(model, "bf16")
            variants.append(("ours-cast", "bf16", lambda: cast(x, t, y)))
        if compile_model:
            compiled = torch.compile(model)
            variants.append(("ours+compile", "fp32", lambda: compiled(x, t, y)))
            if bf16_viable(peaks):
                variants.append(("ours+compile", "bf16", lambda: _autocast(device, lambda: compiled(x, t, y))))
                frozen = freezing_compile(inference_model(model, "bf16"))
                variants.append(("ours-cast+freeze", "bf16", lambda: frozen(x, t, y)))
            if bf16_viable(peaks) and device.type == "cuda":
                tuned = freezing_compile(inference_model(model, "bf16"), autotune=True)
                variants.append(("ours-cast+max-autotune", "bf16", lambda: tuned(x, t, y)))
        timed = interleaved_seconds({(impl, precision): fn for impl, precision, fn in variants}, device, repeats,
                                    warmup=2 if compile_model else 1)
        for impl, precision, fn in variants:
            seconds = timed[(impl, precision)]
            row = {"bench": "forward", "model": name, "batch": batch, "impl": impl, "precision": precision,
                   "seconds": seconds, "img_per_s": batch / seconds,
                   "gflops": flops / seconds / 1e9}
            if impl != "diffusers" and precision != "fp32":
                out = fn()
                out = out.sample if hasattr(out, "sample") else out
                row["max_abs_drift_vs_fp32"] = (out.float() - fp32_out).abs().max().item()
            rows.append(row)
        rows.append({"bench": "forward", "model": name, "impl": "diffusers-vs-ours", "precision": "fp32",
                     "max_abs_diff": (reference - fp32_out).abs().max().item(),
                     "note": "diffusers divides timestep frequencies by 127, not 128 (see docs/formats.md)"})
    base = next(r["seconds"] for r in rows if r.get("impl") == "diffusers" and r.get("precision") == "fp32")
    for row in rows:
        if "seconds" in row:
            row["speedup_vs_diffusers_fp32"] = base / row["seconds"]
    return rows


def bf16_viable(peaks: dict) -> bool:
    """bf16 is timed only where the hardware has it: on CPUs without AVX-512 BF16/AMX it is far slower than fp32."""
    return peaks["bf16"] > peaks["fp32"] / 2


def _autocast(device: torch.device, fn):
    with torch.autocast(device.type, dtype=torch.bfloat16):
        return fn()


class LatentPassThrough(torch.nn.Module):
    """Stands in for the VAE in DiTPipeline so that both sides time the denoising loop alone."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.device = device  # DiffusionPipeline asks its modules where they live

    def decode(self, latents):
        return SimpleNamespace(sample=latents)


def dit_pipeline(model: DiT, device: torch.device):
    """diffusers' DiTPipeline around the twin transformer, with a DDIM scheduler on our linear betas."""
    from diffusers import DDIMScheduler, DiTPipeline

    betas = named_betas("linear")
    scheduler = DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas, clip_sample=False,
                              set_alpha_to_one=False)
    pipe = DiTPipeline(transformer=diffusers_twin(model, device), vae=LatentPassThrough(device), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_sampling(name: str, batch: int, steps: int, device: torch.device, repeats: int, compile_model: bool,
                   peaks: dict) -> list[dict]:
    """(b) A whole DDIM loop at cfg 4 (doubled batch) and cfg 1 (one pass per step), ours against DiTPipeline.

    DiTPipeline gets a pass-through VAE, so both sides time the denoising loop from noise to latents alone.
    """
    model = random_dit(name, device)
    net = torch.compile(model) if compile_model else model
    pipe = dit_pipeline(model, device)
    precision = "bf16" if bf16_viable(peaks) else "fp32"
    labels = torch.arange(batch, device=device) % model.config.num_classes
    rows = []
    for cfg in (4.0, 1.0):
        plan = plan_sampler("ddim", steps, model.config.learn_sigma)
        guided = guided_model_fn(net, labels, plan.process, Guidance(cfg, "all"), model.config.num_classes)

        def model_fn(x, index):
            return _autocast(device, lambda: guided(x, index)).float() if precision == "bf16" else guided(x, index)

        noise = ImageNoise(0, range(batch))
        x = noise(torch.empty(batch, 4, 32, 32, device=device))

        def ours():
            with torch.inference_mode():
                plan.sample(model_fn, x, plan.process, noise)

        def theirs():
            def run():
                pipe(labels.tolist(), guidance_scale=cfg, num_inference_steps=steps, output_type="pt",
                     generator=torch.Generator(device).manual_seed(0))

            with torch.inference_mode():
                _autocast(device, run) if precision == "bf16" else run()

        timed = interleaved_seconds({"DiTPipeline": theirs, "ours+compile" if compile_model else "ours": ours},
                                    device, repeats, warmup=1)
        passes = 2 if cfg != 1.0 else 1
        flops = 2 * forward_macs(model.config) * batch * passes * steps
        for impl, seconds in timed.items():
            rows.append({"bench": "sampling", "model": name, "batch": batch, "steps": steps, "cfg": cfg,
                         "impl": impl, "precision": precision, "seconds": seconds, "img_per_s": batch / seconds,
                         "gflops": flops / seconds / 1e9, "speedup_vs_dit_pipeline": timed["DiTPipeline"] / seconds})
    return rows


def reference_style_step(model: DiT, diffusion: Diffusion, batch_data, optimizer):
    """The reference train.py step: fp32, label dropout inside forward from the global RNG, plain AdamW."""
    x_start, y = batch_data
    t = torch.randint(0, diffusion.num_steps, (x_start.shape[0],), device=x_start.device)
    noise = torch.randn_like(x_start)
    x_t = diffusion.q_sample(x_start, t, noise)
    loss = diffusion.training_losses(model(x_t, t, y), x_start, x_t, t, noise)["loss"].mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def bench_training(name: str, batch: int, device: torch.device, repeats: int, compile_model: bool,
                   peaks: dict) -> list[dict]:
    """(c) A training step: reference-style fp32 against ours (the Trainer's step) in fp32 and bf16."""
    rows = []
    diffusion = Diffusion.create("")
    config = preset(name, input_size=32)
    x_start = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    model = random_dit(name, device).train()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, foreach=False)
    variants = [("ours", "fp32", False)] + ([("ours", "bf16", False)] if bf16_viable(peaks) else [])
    if compile_model:
        variants.append(("ours+compile", "bf16" if bf16_viable(peaks) else "fp32", True))
    trainers = {("reference-style", "fp32"): lambda: reference_style_step(model, diffusion, (x_start, y), plain)}
    trainers |= {(impl, precision): _synthetic_trainer(name, batch, device, precision, compiled).train_step
                for impl, precision, compiled in variants}
    timed = interleaved_seconds(trainers, device, repeats, warmup=2 if compile_model else 1)
    for impl, precision in trainers:
        rows.append({"bench": "train_step", "model": name, "batch": batch, "impl": impl, "precision": precision,
                     "seconds": timed[(impl, precision)]})
    base = rows[0]["seconds"]
    for row in rows:
        row["img_per_s"] = batch / row["seconds"]
        row["speedup_vs_reference_fp32"] = base / row["seconds"]
        row["gflops"] = training_flops(config) * batch / row["seconds"] / 1e9
    return rows


def _synthetic_trainer(name: str, batch: int, device: torch.device, precision: str, compiled: bool):
    """Our Trainer over random 32x32 RGB arrays in memory, so the step is timed without data loading.

    A pixel model at 32x32 has a 256 px latent's tokens; only the patch embedding and the final layer see 3 channels
    instead of 4 (training takes 1 or 3 channels without a VAE), under 0.1% of the step's FLOPs at S/2 and above.
    """
    import numpy as np

    from ditcli.data.sources import ImageSet
    from ditcli.training.config import TrainConfig
    from ditcli.training.trainer import Trainer

    images = ImageSet(np.random.default_rng(0).integers(0, 256, (4 * batch, 32, 32, 3), dtype=np.uint8),
                      np.arange(4 * batch) % 1000, [str(i) for i in range(1000)], "synthetic")
    config = TrainConfig(data="synthetic", out=str(RESULTS / "scratch"), model=name, image_size=32, channels=3,
                         vae=None, global_batch=batch, precision=precision, device=str(device), steps=10**9,
                         compile=compiled)
    trainer = Trainer(config, images=images)
    trainer.setup()
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-model", default="DiT-S/2")
    parser.add_argument("--sample-batch", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--train-model", default="DiT-S/2")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    peaks = measure_peaks(device)
    print(json.dumps({"matmul_peak_gflops": peaks}), flush=True)
    rows = []
    for name in args.models:
        rows += bench_forward(name, args.batch, device, args.repeats, args.compile, peaks)
        print(json.dumps(rows[-1]), flush=True)
    rows += bench_sampling(args.sample_model, args.sample_batch, args.sample_steps, device, args.repeats,
                           args.compile, peaks)
    rows += bench_training(args.train_model, args.train_batch, device, args.repeats, args.compile, peaks)
    # The peak again at the end: MFU uses the better of the two, so a busy moment cannot inflate it.
    final = measure_peaks(device)
    peaks = {k: max(v, final[k]) for k, v in peaks.items()}
    for row in rows:
        if "gflops" in row:
            row["mfu"] = row["gflops"] / peaks[row["precision"]]
    result = {"device": _describe(device), "torch": str(torch.__version__), "threads": torch.get_num_threads(),
              "matmul_peak_gflops": peaks, "parameters": {n: count_parameters(preset(n)) for n in args.models},
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out or RESULTS / f"model-{device.type}.json")
    out.write_text(json.dumps(result, indent=1))
    for row in rows:
        print(json.dumps(row))
    print(f"wrote {out}")


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
