"""Known checkpoints and where to find them: --ckpt, the weights directories, then a resumable download.

Progress is reported through a `progress(done_bytes, total_bytes)` callback; nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ditcli.diffusion.objectives import FlowObjective, Objective
from ditcli.diffusion.samplers import SamplingDefaults
from ditcli.downloads import DownloadError, ProgressFn, download, home_dir
from ditcli.errors import UserError
from ditcli.hub import HubId, fetch_dit, is_offline
from ditcli.model.codec import LATENT_DOWNSAMPLE
from ditcli.model.dit import DiTConfig
from ditcli.model.dit import preset as preset_config


@dataclass(frozen=True)
class KnownWeights:
    """A checkpoint the tool knows by name, with the sampling defaults that suit it.

    size and sha256 are checked after a download, and of a file found in a weights folder, where known (None where
    they have not been published); `preset` names the DiT preset whose keys and shapes a release without them holds,
    checked instead (ditcli.weights.locate). `hub` names a diffusers copy on the Hugging Face hub, the second source
    when the direct download fails; the registry's hub repos are conversions of the released weights, so they keep
    the reference's timestep convention.
    """

    model: str
    image_size: int | None
    filename: str
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    sampler: str = "ddpm"
    steps: int = 250
    cfg: float = 4.0
    interval: tuple[float, float] | None = None  # guidance interval in training timesteps; None guides every step
    licence: str = ""
    hub: str | None = None
    objective: Objective | None = None  # for weights that do not record theirs: SiT's flow, say
    preset: str | None = None  # the architecture of a release without a published size and sha256

    @property
    def sampling(self) -> SamplingDefaults:
        """The registry's defaults; a file's own metadata, where it has some, takes precedence."""
        return SamplingDefaults(self.sampler, self.steps, self.cfg, self.interval)

    def config(self) -> DiTConfig | None:
        """The model the release holds: its preset at the latent size of its images (1000 ImageNet classes, learned
        sigma, as DiT's and SiT's releases); None without a preset."""
        if self.preset is None or self.image_size is None:
            return None
        return preset_config(self.preset, input_size=self.image_size // LATENT_DOWNSAMPLE)


DIT_RELEASE = "https://dl.fbaipublicfiles.com/DiT/models"
# The embedded models as the repository's weights/ folder ships them: (file, url, size, sha256). A rewrite of a file
# (its metadata included) must update its line here; tests/test_bad_records.py checks that they agree.
FASHION_FLOW = ("fashion-mnist.safetensors", None, 8_361_408,
                "e6ac5262a1744244a1f3958945d985642353c03610a77b4f21dae2293ffc3cba")
FASHION_DDPM = ("fashion-mnist-ddpm.safetensors", None, 8_367_512,
                "335dd80a31eccd7db47b64d6407de62987dca3155b6caf218cf7c4706a6e088d")
FASHION_MEANFLOW = ("fashion-mnist-meanflow.safetensors", None, 8_361_464,
                    "606cf004d857ddc01e939d3a9ec60154c87f9968f3338543b44f6c16ec14406e")
SIT_RELEASE = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
               "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0")  # the link of SiT's README and download.py
REGISTRY: dict[tuple[str, int | None], KnownWeights] = {
    ("DiT-XL/2", 256): KnownWeights("DiT-XL/2", 256, "DiT-XL-2-256x256.pt", f"{DIT_RELEASE}/DiT-XL-2-256x256.pt",
                                    licence="CC-BY-NC 4.0", hub="facebook/DiT-XL-2-256", preset="DiT-XL/2"),
    ("DiT-XL/2", 512): KnownWeights("DiT-XL/2", 512, "DiT-XL-2-512x512.pt", f"{DIT_RELEASE}/DiT-XL-2-512x512.pt",
                                    licence="CC-BY-NC 4.0", hub="facebook/DiT-XL-2-512", preset="DiT-XL/2"),
    # SiT (Ma et al., 2024): DiT-XL/2's exact layout (32 output channels, 4 used), trained as a flow from noise (t = 0)
    # to data (t = 1), which the file does not say. Its sample.py defaults: SDE, 250 steps, cfg 4 (FID: cfg 1.5).
    ("SiT-XL/2", 256): KnownWeights("SiT-XL/2", 256, "SiT-XL-2-256x256.pt", SIT_RELEASE, sampler="sde", steps=250,
                                    cfg=4.0, licence="MIT", objective=FlowObjective("noise-to-data"),
                                    preset="DiT-XL/2"),
    # Shipped in the repository's weights/ folder; no URL. The flow and DDPM models are DiT-S/4 at width 192 trained
    # 12,017 steps at batch 128 by `dit train`, scored on 1,000 images by the judge (docs/flow.md,
    # docs/fashion-mnist.md). The flow model at Euler 9 and cfg 3, guided for flow time in [0.156, 0.781] (15 forwards
    # per image), scored FD 22.3 and 97.7% against the DDPM model's 48.0 and 97.2% at its own best 15-forward setting.
    # The mean-flow model, the flow model fine-tuned within the same budget into a decoupled mean-flow model (4 of 6
    # blocks on t, guidance 3 trained in by distilling the flow model's guided velocity, docs/meanflow.md), matches
    # that at 2 forwards per image (the flow map in 2 steps: FD 21.8 against 22.9 over seeds 0-2, judge 97.4% against
    # 97.9%) at 5x and more the images per second, so it is `fashion-mnist`; its file records the same defaults.
    **{(name, None): KnownWeights(name, None, *FASHION_MEANFLOW, sampler="flow-map", steps=2, cfg=1.0, licence="MIT")
       for name in ("fashion-mnist", "fashion-mnist-meanflow")},
    # The flow model (`fashion-mnist` until 2026-12-07) by its own name. cfg 3 beat 2.5, 3.5 and 4.
    ("fashion-mnist-flow", None): KnownWeights("fashion-mnist-flow", None, *FASHION_FLOW, sampler="euler", steps=9,
                                               cfg=3.0, interval=(0.156, 0.781), licence="MIT",
                                               objective=FlowObjective("noise-to-data")),
    # cfg 4 gave the lowest Fréchet distance of cfg 1, 2 and 4; dpm++2m at 10 steps, guided only for t in [82, 578]
    # (EDM2's sigma interval 0.28-5.42 on the linear betas), reached DDPM-250's FD at 15 forwards per image.
    ("fashion-mnist-ddpm", None): KnownWeights("fashion-mnist-ddpm", None, *FASHION_DDPM, sampler="dpm++2m",
                                               steps=10, cfg=4.0, interval=(82.0, 578.0), licence="MIT"),
}


def reference_repos() -> set[str]:
    """Hub repos known to hold conversions of the released reference weights."""
    return {entry.hub for entry in REGISTRY.values() if entry.hub}


def registry_models() -> list[str]:
    return list(dict.fromkeys(model for model, _ in REGISTRY))


def known_weights(model: str, image_size: int | None = None) -> KnownWeights | None:
    """The registry entry for `--model` and `--image-size` (256 by default for sized models); None if unknown."""
    if (model, None) in REGISTRY:
        return REGISTRY[(model, None)]
    sizes = sorted(size for name, size in REGISTRY if name == model)
    if not sizes:
        return None
    size = image_size or (256 if 256 in sizes else sizes[0])
    if size not in sizes:
        raise UserError(f"{model} was released at image sizes {', '.join(map(str, sizes))}, not {size}",
                        f"pass --image-size {sizes[0]}")
    return REGISTRY[(model, size)]


CHECKOUT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"  # the repository's weights/ folder


def weights_dirs() -> list[Path]:
    """Directories searched for known weights, in order: the home directory, then a checkout's weights/ folder."""
    dirs = [home_dir()]
    if CHECKOUT_WEIGHTS.is_dir():
        dirs.append(CHECKOUT_WEIGHTS)
    return dirs


def resolve_weights(entry: KnownWeights, offline: bool = False, progress: ProgressFn = None) -> Path:
    """The local path of a known checkpoint: found in a weights directory, downloaded to the home directory, or
    (when that fails) its hub copy, fetched or found in the Hugging Face cache."""
    for folder in weights_dirs():
        if (folder / entry.filename).is_file():
            return folder / entry.filename
    target = home_dir() / entry.filename
    if entry.url is None:
        raise UserError(f"{entry.filename} was not found in {' or '.join(map(str, weights_dirs()))}",
                        f"it ships in the repository's weights/ folder; copy it to {home_dir()} or pass --ckpt PATH")
    if is_offline(offline):
        return _from_hub(entry, "downloads are off (offline)", True,
                         f"download {entry.url} and put it in {home_dir()}, or pass --ckpt PATH")
    try:
        download(entry.url, target, entry.size, entry.sha256, progress)
    except DownloadError as exc:
        return _from_hub(entry, f"cannot download {entry.filename}: {exc}", False,
                         f"download {entry.url} by hand and put it in {home_dir()}, or pass --ckpt PATH")
    return target


def _from_hub(entry: KnownWeights, failure: str, offline: bool, hint: str) -> Path:
    """The second source: the entry's hub repo; the error names both failures when it fails too."""
    what = failure if failure.startswith("cannot") else f"{entry.filename} is not in {home_dir()} and {failure}"
    if entry.hub is None:
        raise UserError(what, hint)
    try:
        return fetch_dit(HubId(entry.hub), offline)
    except UserError as exc:
        raise UserError(f"{what}; the hub copy {entry.hub} failed too: {exc.what}", hint) from None


