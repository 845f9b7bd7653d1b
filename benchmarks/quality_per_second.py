"""Quality per second for the embedded Fashion-MNIST DiT: Fréchet distance and KID in the judge's features against
NFE for each sampler, and the fastest configuration that reaches DDPM-250's quality on this machine.

    python benchmarks/quality_per_second.py speed            # img/s of the levers (bf16, compile, batch) + CPU peaks
    python benchmarks/quality_per_second.py sweep            # sample every row (1,000 images each), resumable
    python benchmarks/quality_per_second.py sweep --seed 1 --rows ddpm-250 dpm++2m-15-gi
    python benchmarks/quality_per_second.py score            # FD, KID and judge accuracy of every cached row
    python benchmarks/quality_per_second.py compare          # DDPM-250's seeds pooled against equal-count slices
    python benchmarks/quality_per_second.py race --winner dpm++2m-15-gi   # (a) and (b) side by side
    python benchmarks/quality_per_second.py cache --rows dpm++2m-25-gi-c0.1   # img/s with and without --cache
    python benchmarks/quality_per_second.py report           # table (stdout) and docs/images/fashion-mnist-fd-nfe.png

Every row's images and scores are cached under benchmarks/results/scratch/quality/<weights>-<sha256>/ (git-ignored),
so an interrupted run resumes where it stopped and other weights (--ckpt) never mix with them; the summary goes to
benchmarks/results/quality_per_second.json (--summary).

The reference for every row is the 60k train split; the floor is 1,000 real test images (100 per class, as the
samples) against it. A row "-gi" guides only inside GUIDANCE_SIGMAS (EDM2's interval, Kynkaanniemi et al. 2024),
mapped to training timesteps of the model's schedule.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ditcli.data.sources import load_fashion_mnist
from ditcli.diffusion.ddpm import named_betas
from ditcli.diffusion.guidance import Guidance
from ditcli.evaluation.judge import load_judge
from ditcli.evaluation.scores import frechet_distance, kernel_inception_distance
from ditcli.model.codec import PixelCodec
from ditcli.sampling.config import GenerateConfig
from ditcli.sampling.generate import class_labels, generate_images, mean_nfe
from ditcli.weights.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRATCH = RESULTS / "scratch" / "quality"
CKPT = ROOT / "weights" / "fashion-mnist-ddpm.safetensors"  # the default summary and plot are the DDPM model's
SUMMARY = RESULTS / "quality_per_second.json"
PLOT = ROOT / "docs" / "images" / "fashion-mnist-fd-nfe.png"
PER_CLASS = 100
SMALL_PER_CLASS = 10  # the DDPM-250 row's count per class; larger rows are also scored in slices of this size
CFG = 4.0
GUIDANCE_SIGMAS = (0.28, 5.42)  # EDM2-XXL's guidance interval in sigma = sqrt((1 - alpha_bar) / alpha_bar)
SAMPLER_STEPS = {"ddpm": (250,), "ddim": (25, 50), "dpm++2m": (10, 15, 20, 25), "unipc": (10, 20), "heun": (10,)}
# A flow model's rows (dopri5's steps do not apply: its row is "dopri5-1").
FLOW_SAMPLER_STEPS = {"euler": (5, 10, 15, 25), "heun": (4, 5, 7, 10), "sde": (10, 15, 25, 50), "dopri5": (1,)}
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "unipc": "UniPC", "heun": "Heun"}
FLOW_COLOURS = {"euler": "tab:purple", "heun": "tab:brown", "sde": "tab:pink", "dopri5": "tab:olive"}
FLOW_LABELS = {"euler": "flow Euler", "heun": "flow Heun", "sde": "flow SDE (Euler-Maruyama)", "dopri5": "flow dopri5"}
# A mean-flow model's rows: the flow map at cfg 1, its guidance being trained in (runtime CFG hurts there).
MEANFLOW_SAMPLER_STEPS = {"flow-map": (1, 2, 4)}
MEANFLOW_COLOURS = {"flow-map": "tab:cyan"}
MEANFLOW_LABELS = {"flow-map": "mean flow, flow map"}
SAMPLER_LABELS = {"ddpm": LABELS, "flow": FLOW_LABELS, "meanflow": MEANFLOW_LABELS}


def flow_guidance_interval(flow, sigmas: tuple[float, float] = GUIDANCE_SIGMAS) -> tuple[float, float]:
    """The flow times whose EDM sigma lies in `sigmas`: x_t / alpha = x + (s / (1 - s)) eps at noise level s, so
    s = sigma / (1 + sigma)."""
    ends = sorted(float(flow.time_at(sigma / (1 + sigma))) for sigma in sigmas)
    return round(ends[0], 4), round(ends[1], 4)


def interval_of(checkpoint) -> tuple[float, float] | None:
    """GUIDANCE_SIGMAS on the model's own clock: training timesteps, or flow time (None for mean flow)."""
    if checkpoint.objective.name == "meanflow":
        return None
    if checkpoint.objective.name == "flow":
        return flow_guidance_interval(checkpoint.process())
    return guidance_interval(checkpoint.schedule)


def guidance_interval(schedule: str = "linear", sigmas: tuple[float, float] = GUIDANCE_SIGMAS) -> tuple[int, int]:
    """The training timesteps whose noise level sigma lies in `sigmas`: (first, last)."""
    alphas_cumprod = np.cumprod(1 - named_betas(schedule))
    sigma = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    inside = np.nonzero((sigma > sigmas[0]) & (sigma <= sigmas[1]))[0]
    return int(inside[0]), int(inside[-1])


def row_name(sampler: str, steps: int, interval: bool, precision: str = "fp32", cache: float | None = None,
             cfg: float = CFG) -> str:
    """sampler-steps[-gi][-g<cfg>][-c<threshold>][-bf16], e.g. dpm++2m-25-gi-c0.1 or euler-9-gi-g3 (cfg 3; the
    default cfg 4 is left out of the name)."""
    return (f"{sampler}-{steps}{'-gi' if interval else ''}{f'-g{cfg:g}' if cfg != CFG else ''}"
            f"{f'-c{cache:g}' if cache is not None else ''}{'-bf16' if precision != 'fp32' else ''}")


def parse_row(name: str) -> dict:
    parts = name.split("-")
    precision = "bf16" if parts[-1] == "bf16" else "fp32"
    parts = parts[:-1] if precision == "bf16" else parts
    cache = float(parts[-1][1:]) if parts[-1][:1] == "c" and parts[-1][1:2].isdigit() else None
    parts = parts[:-1] if cache is not None else parts
    scaled = parts[-1][:1] == "g" and parts[-1][1:2].isdigit()
    cfg = float(parts[-1][1:]) if scaled else CFG
    parts = parts[:-1] if scaled else parts
    interval = parts[-1] == "gi"
    parts = parts[:-1] if interval else parts
    return {"sampler": "-".join(parts[:-1]), "steps": int(parts[-1]), "interval": interval, "precision": precision,
            "cache": cache, "cfg": cfg}


def all_rows(objective: str = "ddpm") -> list[str]:
    if objective == "meanflow":
        return [row_name(s, n, False, cfg=1.0) for s, steps in MEANFLOW_SAMPLER_STEPS.items() for n in steps]
    table = FLOW_SAMPLER_STEPS if objective == "flow" else SAMPLER_STEPS
    rows = [row_name(s, n, False) for s, steps in table.items() for n in steps]
    return rows + [row_name(s, n, True) for s, steps in table.items() for n in steps]


def config_of(row: dict, seed: int, labels: list[int], batch_size: int, compile_model: bool,
              checkpoint) -> GenerateConfig:
    interval = interval_of(checkpoint) if row["interval"] else None
    return GenerateConfig(labels=tuple(labels), seed=seed, sampler=row["sampler"], steps=row["steps"],
                          guidance=Guidance(row["cfg"], "all", interval), batch_size=batch_size,
                          precision=row["precision"], compile=compile_model and row.get("cache") is None,
                          schedule=checkpoint.schedule, objective=checkpoint.objective, cache=row.get("cache"))


def weights_dir(ckpt: Path) -> Path:
    """The cache of one set of weights, named by its tensors (not its metadata): retrained weights start a fresh
    cache, new sampling defaults in the file's metadata do not."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_checkpoint(ckpt).state_dict.items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return SCRATCH / f"{ckpt.stem}-{digest.hexdigest()[:12]}"


def sample_row(model, checkpoint, work: Path, name: str, seed: int, per_class: int, batch_size: int,
               compile_model: bool) -> dict:
    """Sample (or load the cache of) one row, `per_class` images per class, caching each batch; returns its record."""
    path = work / "samples" / f"{name}-seed{seed}-n{10 * per_class}.npz"
    record_path = path.with_suffix(".json")
    if record_path.exists():
        return json.loads(record_path.read_text())
    row = parse_row(name)
    config = config_of(row, seed, class_labels(range(10), per_class), batch_size, compile_model, checkpoint)
    chunks, seconds, counts, reused = [], 0.0, [], []
    for start in range(0, config.num_images, batch_size):
        chunk = path.with_suffix(f".part{start:05d}.npz")
        if not chunk.exists():
            started = time.perf_counter()
            indices = range(start, min(start + batch_size, config.num_images))
            batch = next(generate_images(model, PixelCodec(1), config, indices, torch.device("cpu")))
            chunk.parent.mkdir(parents=True, exist_ok=True)
            np.savez(chunk, images=batch.images.numpy(), seconds=time.perf_counter() - started, nfe=batch.nfe,
                     reused=batch.reused)
        data = np.load(chunk)
        chunks.append(data["images"])
        seconds = seconds + float(data["seconds"])
        counts.append(int(data["nfe"]))
        reused.append(float(data["reused"]) if "reused" in data else 0.0)
    nfe = mean_nfe(counts)  # an adaptive solver's differs from batch to batch
    images = np.concatenate(chunks)  # (N, 28, 28, 1)
    np.savez(path, images=images, labels=np.array(config.labels))
    record = {"row": name, **row, "objective": checkpoint.objective.name, "seed": seed,
              "interval_t": list(config.guidance.interval or []) or None,
              "nfe": nfe, "forwards_per_image": forwards_per_image(config, nfe), "images": len(images),
              "seconds": seconds, "batch_size": batch_size, "compile": config.compile,
              "reused_share": round(sum(reused) / sum(counts), 4) if config.cache is not None else None,
              "threads": torch.get_num_threads()}
    record_path.write_text(json.dumps(record, indent=1))
    return record


def forwards_per_image(config: GenerateConfig, nfe: int | float | None = None) -> int | float:
    """Model passes per image: 2 per guided evaluation (cond + uncond), 1 per unguided one."""
    from ditcli.diffusion.samplers import SOLVERS, make_scheduler, plan_sampler

    if config.objective.name == "meanflow":  # one forward per flow-map step, two where runtime CFG is on
        return config.steps * (1 if config.guidance.scale in (0, 1) else 2)
    if config.objective.name == "flow":
        return flow_forwards_per_image(config, nfe)
    plan = plan_sampler(config.sampler, config.steps, True, schedule=config.schedule)
    if config.sampler in SOLVERS:
        timesteps = [float(t) for t in make_scheduler(config.sampler, plan.process, config.steps).timesteps]
    else:
        timesteps = [float(t) for t in plan.process.model_timesteps(torch.arange(plan.process.num_steps))]
    assert len(timesteps) == plan.nfe, (config.sampler, len(timesteps), plan.nfe)
    return sum(2 if config.guidance.active(t) else 1 for t in timesteps)


def flow_forwards_per_image(config: GenerateConfig, nfe: int | float | None) -> int | float:
    """A flow sampler's passes: each step's evaluations (Heun's two) doubled where guidance is on at its start;
    dopri5's measured NFE, doubled where guided (its evaluation times are not fixed in advance)."""
    if config.sampler == "dopri5":  # its evaluation times are chosen as it runs: known only without an interval
        return nfe * (1 if config.guidance.scale in (0, 1) else 2) if config.guidance.interval is None else None
    plan = config.plan(learn_sigma=False)
    grid = plan.process.time_grid(config.steps, config.flow.shift, config.flow.last_step if config.sampler == "sde"
                                  else 0.0)
    per_step = 2 if config.sampler == "heun" else 1
    return sum(per_step * (2 if config.guidance.active(t) else 1) for t in grid[:-1])


# Scoring.

def judge_features(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 128) penultimate features and (N,) predicted classes of uint8 (N, 28, 28, 1) images."""
    judge = load_judge()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 1, 28, 28)
    with torch.no_grad():
        feats = torch.cat([judge.features(chunk) for chunk in x.split(1000)])
        predicted = judge.head(feats).argmax(1)
    return feats, predicted


def reference() -> torch.Tensor:
    path = SCRATCH / "train-features.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(judge_features(load_fashion_mnist(split="train").images)[0], path)
    return torch.load(path)


def stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def score(features: torch.Tensor, ref: torch.Tensor) -> dict:
    kid, kid_std = kernel_inception_distance(features, ref)
    return {"fd": frechet_distance(*stats(features), *stats(ref)), "kid": kid, "kid_std": kid_std}


def balanced_subsets(labels: np.ndarray, per_class: int) -> list[np.ndarray]:
    """Disjoint index sets holding `per_class` images of each class: the equal-count slices of a larger row."""
    by_class = [np.nonzero(labels == c)[0] for c in range(10)]
    count = min(len(idx) for idx in by_class) // per_class
    return [np.concatenate([idx[k * per_class:(k + 1) * per_class] for idx in by_class]) for k in range(count)]


def score_features(feats: torch.Tensor, correct: np.ndarray, labels: np.ndarray, ref: torch.Tensor) -> dict:
    """FD, KID and accuracy of the whole set, and of each disjoint 10-per-class slice (the DDPM-250 row's count)."""
    result = {**score(feats, ref), "accuracy": float(correct.mean())}
    slices = balanced_subsets(labels, SMALL_PER_CLASS)
    if len(slices) > 1:
        result["slices"] = [{**score(feats[torch.from_numpy(idx)], ref), "accuracy": float(correct[idx].mean())}
                            for idx in slices]
    return result


def score_row(path: Path, ref: torch.Tensor) -> dict:
    out = path.with_suffix(".score.json")
    if out.exists():
        return json.loads(out.read_text())
    data = np.load(path)
    feats, predicted = judge_features(data["images"])
    result = score_features(feats, predicted.numpy() == data["labels"], data["labels"], ref)
    out.write_text(json.dumps(result))
    return result


def floor(ref: torch.Tensor, seed: int) -> dict:
    """1,000 real test images, 100 per class (the first 100 of each class, or a random 100 for seed > 0)."""
    test = load_fashion_mnist(split="test")
    rng = np.random.default_rng(seed)
    picks = [np.nonzero(test.labels == c)[0] for c in range(10)]
    picks = np.concatenate([p[:PER_CLASS] if seed == 0 else rng.choice(p, PER_CLASS, replace=False) for p in picks])
    feats, predicted = judge_features(test.images[picks])
    labels = test.labels[picks]
    return {**score_features(feats, predicted.numpy() == labels, labels, ref), "seed": seed}


# Speed.

def matmul_peaks() -> dict:
    from bench_model import measure_peaks

    return measure_peaks(torch.device("cpu"))


def time_config(model, checkpoint, name: str, images: int, batch_size: int, compile_model: bool,
                repeats: int = 1) -> float:
    """Median images/second of row `name` over `repeats` runs (after one warm-up run only when compiled)."""
    row = parse_row(name)
    labels = class_labels(range(10), -(-images // 10))[:images]
    config = config_of(row, 0, labels, batch_size, False, checkpoint)  # compiled once here, not per call
    net = torch.compile(model) if compile_model else model
    times = []
    for _ in range(repeats + int(compile_model)):
        started = time.perf_counter()
        for _ in generate_images(net, PixelCodec(1), config, range(images), torch.device("cpu")):
            pass
        times.append(time.perf_counter() - started)
    return images / statistics.median(times[int(compile_model):])


def widen_null_class(transformer, num_classes: int, pipeline_null: int = 1000) -> None:
    """DiTPipeline hard-codes ImageNet's null class 1000: give the twin's label table that row, holding our null
    class's embedding (row `num_classes`). Same weights, same cost per forward."""
    for block in transformer.transformer_blocks:
        old = block.norm1.emb.class_embedder.embedding_table
        table = torch.nn.Embedding(pipeline_null + 1, old.embedding_dim)
        with torch.no_grad():
            table.weight[: num_classes + 1] = old.weight[: num_classes + 1]
            table.weight[pipeline_null] = old.weight[num_classes]
        block.norm1.emb.class_embedder.embedding_table = table


def dit_pipeline_rate(model, images: int, batch_size: int, repeats: int = 1) -> float:
    """diffusers' DiTPipeline at its defaults (DDIM 50, cfg 4 on all channels) on the same weights, images/second."""
    from bench_model import dit_pipeline

    pipe = dit_pipeline(model, torch.device("cpu"))
    widen_null_class(pipe.transformer, model.config.num_classes)
    labels = class_labels(range(10), -(-images // 10))[:images]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, images, batch_size):
                pipe(labels[start:start + batch_size], guidance_scale=CFG, num_inference_steps=50, output_type="pt",
                     generator=torch.Generator().manual_seed(start))
        times.append(time.perf_counter() - started)
    return images / statistics.median(times)


def machine() -> dict:
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": name, "threads": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in flags,
            "amx": "amx_bf16" in flags, "torch": torch.__version__}


def save_json(work: Path, name: str, data) -> Path:
    path = work / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def cmd_speed(model, checkpoint, args) -> None:
    """The levers on the winning row: fp32/bf16, batch size and (with --compile) torch.compile; with the matmul peaks
    before and after."""
    result = {"machine": machine(), "peaks_before": matmul_peaks(), "rows": []}
    print(json.dumps(result), flush=True)
    for precision in ("fp32", "bf16"):
        for compile_model in (False, True) if args.compile else (False,):
            for batch in args.batches:
                name = row_name("dpm++2m", 10, True, precision)
                rate = time_config(model, checkpoint, name, args.images, batch, compile_model)
                result["rows"].append({"row": name, "precision": precision, "compile": compile_model,
                                       "batch": batch, "images": args.images, "img_per_s": rate})
                print(json.dumps(result["rows"][-1]), flush=True)
    result["peaks_after"] = matmul_peaks()
    print(f"wrote {save_json(weights_dir(args.ckpt), 'speed.json', result)}")


def cmd_cache(model, checkpoint, args) -> None:
    """Images/second of each --rows row with and without its cache, alternating in rounds, in one process."""
    result = {"machine": machine(), "peaks_before": matmul_peaks(), "images": args.images,
              "batch_size": args.batch_size, "rounds": args.rounds, "rows": []}
    for name in args.rows:
        row = parse_row(name)
        plain = row_name(row["sampler"], row["steps"], row["interval"], row["precision"], cfg=row["cfg"])
        rates = {plain: [], name: []}
        for _ in range(args.rounds):
            for timed in (plain, name):
                rates[timed].append(time_config(model, checkpoint, timed, args.images, args.batch_size, False))
        medians = {key: statistics.median(values) for key, values in rates.items()}
        result["rows"].append({"row": name, "uncached": plain, "img_per_s": medians, "rates": rates,
                               "speedup": medians[name] / medians[plain]})
        print(json.dumps(result["rows"][-1]), flush=True)
    result["peaks_after"] = matmul_peaks()
    print(f"wrote {save_json(weights_dir(args.ckpt), 'cache.json', result)}")


def cmd_sweep(model, checkpoint, args) -> None:
    for name in args.rows or all_rows(checkpoint.objective.name):
        record = sample_row(model, checkpoint, weights_dir(args.ckpt), name, args.seed, args.per_class,
                            args.batch_size, args.compile)
        print(json.dumps(record), flush=True)


def cmd_score(args) -> None:
    ref = reference()
    floors = []
    for seed in (0, 1):
        path = SCRATCH / f"floor-seed{seed}.score.json"
        if not path.exists():
            path.write_text(json.dumps(floor(ref, seed)))
        floors.append(json.loads(path.read_text()))
    rows, work = [], weights_dir(args.ckpt)
    for record_path in sorted((work / "samples").glob("*.json")):
        if record_path.name.endswith(".score.json"):
            continue
        record = json.loads(record_path.read_text())
        rows.append({**record, **score_row(record_path.with_suffix(".npz"), ref)})
        print(json.dumps({k: rows[-1][k] for k in ("row", "seed", "nfe", "fd", "kid", "kid_std", "accuracy")}),
              flush=True)
    summary = {"checkpoint": str(args.ckpt), "weights": work.name, "cfg": CFG, "per_class": PER_CLASS,
               "reference": "fashion-mnist train split (60,000), judge features", "floor": floors, "rows": rows,
               "objective": load_checkpoint(args.ckpt).objective.to_metadata(),
               "guidance_interval_t": list(interval_of(load_checkpoint(args.ckpt)) or []),
               "guidance_interval_sigma": list(GUIDANCE_SIGMAS)}
    for race in sorted(work.glob("race*.json")):  # race.json is the latest; race-N.json earlier runs kept by hand
        summary[race.stem] = json.loads(race.read_text())
    for name in ("speed", "compare", "cache"):
        if (work / f"{name}.json").exists():
            summary[name] = json.loads((work / f"{name}.json").read_text())
    args.summary.write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.summary}")


def cmd_compare(args) -> None:
    """DDPM-250 pooled over its seeds against every 1,000-image row cut into disjoint slices of the same count."""
    ref, work = reference(), weights_dir(args.ckpt)
    pooled = [np.load(path) for path in sorted((work / "samples").glob("ddpm-250-seed*-n100.npz"))]
    images = np.concatenate([d["images"] for d in pooled])
    labels = np.concatenate([d["labels"] for d in pooled])
    per_class = len(images) // 10
    feats, predicted = judge_features(images)
    result = {"ddpm-250": {**score(feats, ref), "accuracy": float((predicted.numpy() == labels).mean()),
                           "images": len(images), "seeds": len(pooled)}, "per_class": per_class, "rows": {}}
    print(json.dumps(result["ddpm-250"]), flush=True)
    for path in sorted((work / "samples").glob("*-n1000.npz")):
        data = np.load(path)
        feats, predicted = judge_features(data["images"])
        correct = predicted.numpy() == data["labels"]
        slices = [{**score(feats[torch.from_numpy(idx)], ref), "accuracy": float(correct[idx].mean())}
                  for idx in balanced_subsets(data["labels"], per_class)]
        result["rows"][path.stem] = {key: (statistics.mean(s[key] for s in slices),
                                           statistics.stdev(s[key] for s in slices) if len(slices) > 1 else None)
                                     for key in ("fd", "kid", "accuracy")}
        print(path.stem, json.dumps(result["rows"][path.stem]), flush=True)
    print(f"wrote {save_json(work, 'compare.json', result)}")


def cmd_race(model, checkpoint, args) -> None:
    """(a) DDPM-250 and (b) DiTPipeline against the winner (fp32 and bf16) on the same images, on this machine.

    (a) and (b) run --baseline-ckpt (a DDPM model; default --ckpt), the winner --ckpt, so a flow model's sampler races
    the DDPM model's protocols. The short runs are timed before and after each DDPM-250 run and their median kept, so
    they bracket it in time.
    """
    base_checkpoint = load_checkpoint(args.baseline_ckpt) if args.baseline_ckpt else checkpoint
    base = base_checkpoint.build("cpu").eval() if args.baseline_ckpt else model
    result = {"machine": machine(), "peaks_before": matmul_peaks(), "images": args.images,
              "batch_size": args.batch_size, "rounds": [], "ckpt": str(args.ckpt),
              "baseline_ckpt": str(args.baseline_ckpt or args.ckpt)}
    bf16 = args.winner if args.winner.endswith("-bf16") else f"{args.winner}-bf16"
    fp32 = bf16.removesuffix("-bf16")
    short = {"winner_fp32": lambda: time_config(model, checkpoint, fp32, args.images, args.batch_size, False),
             "winner_bf16": lambda: time_config(model, checkpoint, bf16, args.images, args.batch_size, False),
             "dit_pipeline": lambda: dit_pipeline_rate(base, args.images, args.batch_size)}
    for _ in range(args.rounds):
        before = {name: fn() for name, fn in short.items()}
        ddpm = time_config(base, base_checkpoint, "ddpm-250", args.images, args.batch_size, False)
        after = {name: fn() for name, fn in short.items()}
        rates = {**{name: statistics.median([before[name], after[name]]) for name in short}, "ddpm-250": ddpm}
        result["rounds"].append({"rates": rates, "before": before, "after": after})
        print(json.dumps(rates), flush=True)
    result["peaks_after"] = matmul_peaks()
    median = {k: statistics.median(r["rates"][k] for r in result["rounds"]) for k in result["rounds"][0]["rates"]}
    result["img_per_s"] = median
    for name in ("winner_fp32", "winner_bf16"):
        result[f"{name}_vs_ddpm250"] = median[name] / median["ddpm-250"]
        result[f"{name}_vs_dit_pipeline"] = median[name] / median["dit_pipeline"]
    result["winner"] = {"row": fp32, **parse_row(fp32), "interval_t": list(interval_of(checkpoint))}
    print(json.dumps(median), flush=True)
    print(f"wrote {save_json(weights_dir(args.ckpt), 'race.json', result)}")


def cmd_report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = json.loads(args.summary.read_text())
    for extra in args.also or []:  # another model's summary (the flow model's), drawn and listed alongside
        summary["rows"] += json.loads(extra.read_text())["rows"]
    rows = [r for r in summary["rows"] if r["precision"] == "fp32" and r["seed"] == 0 and r.get("cfg", CFG) == CFG]
    fig, (big, small) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    colours = {"ddpm": dict(zip(LABELS, ("black", "tab:blue", "tab:orange", "tab:green", "tab:red"))),
               "flow": FLOW_COLOURS, "meanflow": MEANFLOW_COLOURS}
    for key, label in [*((("ddpm", s), l) for s, l in LABELS.items()),
                       *((("flow", s), l) for s, l in FLOW_LABELS.items()),
                       *((("meanflow", s), l) for s, l in MEANFLOW_LABELS.items())]:
        objective, sampler = key
        for interval, style in ((False, "-o"), (True, "--s")):
            pts = sorted((r["nfe"], r) for r in rows if r["sampler"] == sampler and r["interval"] == interval
                         and r.get("objective", "ddpm") == objective)
            name = f"{label}{' + guidance interval' if interval else ''}"
            colour = colours[objective][sampler]
            whole = [(n, r["fd"]) for n, r in pts if r["images"] >= 10 * PER_CLASS]
            if whole:
                big.plot(*zip(*whole), style, color=colour, label=name)
            sliced = [(n, *slice_fd(r)) for n, r in pts]
            if sliced:
                nfe, mean, sd = zip(*sliced)
                small.errorbar(nfe, mean, yerr=sd, fmt=style, color=colour, capsize=3, label=name)
    for ddpm in (r for r in summary["rows"] if r["sampler"] == "ddpm" and r["images"] <= 10 * SMALL_PER_CLASS):
        small.plot(ddpm["nfe"], ddpm["fd"], "o", color="black")
    for axis, key, title in ((big, "fd", "FD, 1,000 samples"), (small, None, "FD at 100 samples (slices mean ± sd)")):
        level = statistics.mean(f["fd"] if key else slice_fd(f)[0] for f in summary["floor"])
        axis.axhline(level, color="gray", lw=1)
        axis.text(10, level + 2, "floor: real test images", color="gray", fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("NFE per image (a guided step's doubled batch counts once)")
        axis.set_title(title, fontsize=10)
    big.set_ylabel("FD in fashion-judge features vs the train split")
    small.legend(fontsize=7)
    fig.suptitle(f"Embedded Fashion-MNIST DiT (annealed), cfg {summary['cfg']:g}; every row 1,000 images",
                 fontsize=10)
    fig.tight_layout()
    out = args.plot
    fig.savefig(out, dpi=100)
    print("| sampler | steps | guidance interval | NFE | forwards/image | seed | images | FD | FD at 100 | KID | "
          "judge accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in summary["floor"]:
        print(f"| floor: real test images | | | | | {f['seed']} | 1,000 | {f['fd']:.2f} | {small_fd(f)} | "
              f"{f['kid']:.1f} ± {f['kid_std']:.1f} | {f['accuracy'] * 100:.1f}% |")
    def label(r: dict) -> str:
        return SAMPLER_LABELS[r.get("objective", "ddpm")][r["sampler"]]

    for r in sorted(summary["rows"], key=lambda r: (r.get("objective", "ddpm"), r["interval"], label(r), r["steps"],
                                                    r["precision"], r["seed"])):
        whole = f"{r['fd']:.2f}" if r["images"] >= 10 * PER_CLASS else "-"
        cfg = f" cfg {r['cfg']:g}" if r.get("cfg", CFG) != CFG else ""
        print(f"| {label(r)}{' bf16' if r['precision'] == 'bf16' else ''}{cfg} | {r['steps']} | "
              f"{'yes' if r['interval'] else 'no'} | {r['nfe']} | {r['forwards_per_image']} | {r['seed']} | "
              f"{r['images']:,} | {whole} | {small_fd(r)} | {r['kid']:.1f} ± {r['kid_std']:.1f} | "
              f"{r['accuracy'] * 100:.1f}% |")
    print(f"wrote {out}")


def slice_fd(record: dict) -> tuple[float, float]:
    """FD of 100 images: the mean and spread over a row's disjoint 10-per-class slices, or its own (spread 0)."""
    if "slices" not in record:
        return record["fd"], 0.0
    values = [s["fd"] for s in record["slices"]]
    return statistics.mean(values), statistics.stdev(values)


def small_fd(record: dict) -> str:
    if "slices" not in record and record.get("images", 1000) > 10 * SMALL_PER_CLASS:
        return "-"
    mean, sd = slice_fd(record)
    return f"{mean:.1f} ± {sd:.1f}" if "slices" in record else f"{mean:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["speed", "sweep", "score", "compare", "race", "cache", "report"])
    parser.add_argument("--rows", nargs="*", help=f"Rows to sample (default: all): {' '.join(all_rows())}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="Images per class in each sweep row.")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--batches", type=int, nargs="*", default=[20, 100])
    parser.add_argument("--images", type=int, default=20, help="Images per timed run (speed, race).")
    parser.add_argument("--winner", default="dpm++2m-15-gi")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ckpt", type=Path, default=CKPT, help="The weights to measure (default: the shipped ones).")
    parser.add_argument("--baseline-ckpt", type=Path, help="race: the DDPM model that runs DDPM-250 and DiTPipeline "
                                                             "(default: --ckpt).")
    parser.add_argument("--summary", type=Path, default=SUMMARY, help="Where score writes and report reads.")
    parser.add_argument("--plot", type=Path, default=PLOT, help="Where report draws FD against NFE.")
    parser.add_argument("--also", type=Path, nargs="*", help="report: more summaries (another model's) to draw and "
                                                              "list beside --summary's rows.")
    args = parser.parse_args()
    if args.command == "score":
        return cmd_score(args)
    if args.command == "report":
        return cmd_report(args)
    if args.command == "compare":
        return cmd_compare(args)
    checkpoint = load_checkpoint(args.ckpt)
    model = checkpoint.build("cpu").eval()
    {"speed": cmd_speed, "sweep": cmd_sweep, "race": cmd_race, "cache": cmd_cache}[args.command](model, checkpoint,
                                                                                                 args)


if __name__ == "__main__":
    main()
