"""The race of issue 21: the whole `dit sample` command against a script that runs diffusers' DiTPipeline, start-up
included, on the same weights, in alternating rounds.

    python benchmarks/race_pipeline.py --model DiT-B/2 --rounds 3 --precision bf16 fp32
    python benchmarks/race_pipeline.py --model DiT-B/2 --rounds 3 --build-first    # later runs: auto loads a package
    python benchmarks/race_pipeline.py --model DiT-XL/2 --vae-layout sd --device cuda --rounds 2   # the GPU suite's

Both sides use the same random DiT (perturbed so it is not the zero init), written once as our .safetensors and,
through `dit convert --to diffusers`, as a DiTPipeline folder. Both use the same small random AutoencoderKL at
256 px. The job is 8 images in one batch, DDIM 10 steps, cfg 4. Each of our rounds gets a fresh --out, because
`dit sample` resumes a finished folder. The CPU model and the bf16 and fp32 matmul peaks are measured at the start and
at the end and recorded with the timings in benchmarks/results/race-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_precision import cpu_model, matmul_peak

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINE_SCRIPT = """
import sys, torch
from diffusers import DDIMScheduler, DiTPipeline
folder, dtype, steps, images = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = DiTPipeline.from_pretrained(folder, torch_dtype=dtype).to(sys.argv[5])
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
out = pipe(class_labels=[207] * images, num_inference_steps=steps, guidance_scale=4.0,
           generator=torch.Generator().manual_seed(0), output_type="np")
assert out.images.shape[0] == images
"""
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
# AutoencoderKL layouts: "small" keeps a CPU race short; "sd" is sd-vae-ft-ema's (84M parameters), with random weights.
VAE_LAYOUTS = {
    "small": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1),
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, scaling_factor=0.18215),
}


def make_files(root: Path, model: str, layout: str = "small", image_size: int = 256) -> tuple[Path, Path, Path]:
    """Our .safetensors (with the VAE folder as its codec), the VAE folder and the DiTPipeline folder."""
    from diffusers import AutoencoderKL

    from ditcli.model.dit import DiT, preset
    from ditcli.weights.checkpoint import save_safetensors
    from ditcli.weights.record import Checkpoint

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, sample_size=image_size,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **VAE_LAYOUTS[layout])
    vae.save_pretrained(root / "vae")
    dit = DiT(preset(model, input_size=image_size // 8))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn_like(p) * 0.02)
    weights = root / "model.safetensors"
    save_safetensors(Checkpoint(dit.state_dict(), dit.config, "safetensors",
                                codec={"kind": "vae", "vae": str(root / "vae")}), weights)
    subprocess.run([sys.executable, "-m", "ditcli", "convert", str(weights), str(root / "pipe"), "--to", "diffusers",
                    "--vae", str(root / "vae")], check=True, capture_output=True)
    return weights, root / "vae", root / "pipe"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def peaks(device: str) -> dict:
    """The bf16 and fp32 matmul peaks (GFLOP/s) of the device that races."""
    if device == "cuda":
        from bench_model import measure_peaks

        return measure_peaks(torch.device("cuda"))
    return {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=list(DTYPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--extra", nargs="*", default=[], help="More `dit sample` options, e.g. --compile.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for both sides.")
    parser.add_argument("--build-first", action="store_true",
                        help="Run `dit sample --compile` once, untimed, before the rounds: they then race a user's "
                             "later runs, whose `--compile auto` finds the package built.")
    parser.add_argument("--vae-layout", default="small", choices=list(VAE_LAYOUTS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "race-cpu.json")
    args = parser.parse_args()
    result = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "model": args.model, "images": args.images,
              "steps": args.steps, "extra": args.extra, "torch": torch.__version__, "device": device_name(args.device),
              "vae_layout": args.vae_layout, "image_size": args.image_size, "peaks_before": peaks(args.device)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights, vae, pipe = make_files(root, args.model, args.vae_layout, args.image_size)
        for precision in args.precision:
            def ours(out: str, *more: str) -> list[str]:
                return [sys.executable, "-m", "ditcli", "sample", "--ckpt", str(weights), "--vae", str(vae),
                        "--sampler", "ddim", "--steps", str(args.steps), "--cfg", "4", "--guidance-channels", "all",
                        "--num-images", str(args.images), "--batch-size", str(args.images), "--precision",
                        precision, "--device", args.device, "--out", str(root / out), *args.extra, *more]

            built = timed(ours(f"build-{precision}", "--compile")) if args.build_first else None
            rounds = []
            for i in range(args.rounds):
                mine = timed(ours(f"ours-{precision}-{i}"))
                theirs = timed([sys.executable, "-c", PIPELINE_SCRIPT, str(pipe), DTYPES[precision],
                                str(args.steps), str(args.images), args.device])
                record = json.loads((root / f"ours-{precision}-{i}" / "provenance.json").read_text())
                rounds.append({"dit_sample_s": mine, "dit_pipeline_s": theirs, "ratio": theirs / mine,
                               "compile": record["compile"]})
                print(json.dumps({"precision": precision, **rounds[-1]}), flush=True)
            result[precision] = {"rounds": rounds, "build_first_s": built,
                                 "median_dit_sample_s": statistics.median(r["dit_sample_s"] for r in rounds),
                                 "median_dit_pipeline_s": statistics.median(r["dit_pipeline_s"] for r in rounds)}
            result[precision]["ratio_of_medians"] = (result[precision]["median_dit_pipeline_s"]
                                                     / result[precision]["median_dit_sample_s"])
    result["peaks_after"] = peaks(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k]["ratio_of_medians"] for k in args.precision}), f"wrote {args.out}")


if __name__ == "__main__":
    main()
