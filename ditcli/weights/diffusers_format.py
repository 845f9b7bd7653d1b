"""The diffusers format: DiTTransformer2DModel keys, DiTPipeline folders, and the explicit key map between them and ours.

The key map is explicit and checked: both sides must hold exactly the expected keys with the expected shapes, depth
comes from the config, the fused qkv projection is split into to_q/to_k/to_v and joined back, and `pos_embed` (a fixed
sin-cos table that diffusers does not store) is dropped on export and recomputed on import. Nothing here prints: every
problem found on the way is recorded in `Checkpoint.warnings` or returned.

Imports state, io, codec, diffusion, model, hub, weights; ditcli.weights.checkpoint and ditcli.weights.convert import this, never
the other way round.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from ditcli.diffusion.ddpm import BETA_SCHEDULES, TRAIN_TIMESTEPS, named_betas
from ditcli.errors import UserError
from ditcli.hub import WEIGHT_FILES, repo_of
from ditcli.io import (
    atomic_write_dir,
    read_json,
    read_safetensors,
    refuse_existing,
    safe_torch_load,
    write_json,
)
from ditcli.model.codec import VAE_ALIASES, default_codec_spec
from ditcli.model.dit import (
    MAX_DEPTH,
    MAX_HIDDEN_SIZE,
    MAX_IMAGE_SIZE,
    REFERENCE_NORM_EPS,
    TIMESTEP_CONVENTIONS,
    DiT,
    DiTConfig,
    sincos_2d,
)
from ditcli.weights.fields import (
    MAX_CLASSES,
    WEIGHT_CHOICES,
    Field,
    is_kind,
    read_choice,
    read_codec,
    read_config,
    read_ema,
    read_fields,
    read_object,
    read_sampling,
    read_schedule,
    read_value,
    refuse,
)
from ditcli.weights.record import (
    Checkpoint,
    check_keys,
    check_state_dict,
    describe,
    state_shapes,
)
from ditcli.weights.registry import reference_repos

TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT folders use the older name
WEIGHTS_NAME, PICKLED_WEIGHTS_NAME = WEIGHT_FILES  # a model folder's weights: safetensors, else pickled
DITCLI_KEY = "_ditcli"  # model_index.json entry diffusers ignores (leading underscore); keeps codec and weights
DIFFUSERS_NORM_EPS = 1e-5  # DiTTransformer2DModel's default norm_eps, which the hub's DiT folders leave in place
CONVENTION_KEY = "timestep_convention"  # in the `_ditcli` entry: the forward the weights were trained with
PIPELINE_NULL_CLASS = 1000  # the label DiTPipeline hard-codes as the null class for guidance
# The fields of a DiTTransformer2DModel config.json that give our config, each within the limits of ours.
TRANSFORMER_FIELDS = {
    "num_attention_heads": Field(int, 1, MAX_HIDDEN_SIZE), "attention_head_dim": Field(int, 1, MAX_HIDDEN_SIZE),
    "in_channels": Field(int, 1, MAX_HIDDEN_SIZE),
    "out_channels": Field(int, 1, MAX_HIDDEN_SIZE, required=False, nullable=True),
    "num_layers": Field(int, 1, MAX_DEPTH), "sample_size": Field(int, 1, MAX_IMAGE_SIZE),
    "patch_size": Field(int, 1, MAX_IMAGE_SIZE), "num_embeds_ada_norm": Field(int, 0, MAX_CLASSES),
    "norm_eps": Field(float, 0, open="low", required=False),
}
VAE_SCALE = Field(float, 0, open="low", required=False, nullable=True)  # an AutoencoderKL's scaling_factor

# One-to-one tensors outside the blocks: (ours, diffusers).
TOP_PAIRS = (
    ("x_embedder.proj.weight", "pos_embed.proj.weight"),
    ("x_embedder.proj.bias", "pos_embed.proj.bias"),
    ("final_layer.adaLN_modulation.1.weight", "proj_out_1.weight"),
    ("final_layer.adaLN_modulation.1.bias", "proj_out_1.bias"),
    ("final_layer.linear.weight", "proj_out_2.weight"),
    ("final_layer.linear.bias", "proj_out_2.bias"),
)
# One-to-one tensors inside block i: (ours under `blocks.i.`, diffusers under `transformer_blocks.i.`).
BLOCK_PAIRS = (
    ("attn.proj.weight", "attn1.to_out.0.weight"),
    ("attn.proj.bias", "attn1.to_out.0.bias"),
    ("mlp.fc1.weight", "ff.net.0.proj.weight"),
    ("mlp.fc1.bias", "ff.net.0.proj.bias"),
    ("mlp.fc2.weight", "ff.net.2.weight"),
    ("mlp.fc2.bias", "ff.net.2.bias"),
    ("adaLN_modulation.1.weight", "norm1.linear.weight"),
    ("adaLN_modulation.1.bias", "norm1.linear.bias"),
)
# Our shared embedders, of which diffusers keeps one copy in every block (under `transformer_blocks.i.`).
EMBEDDER_PAIRS = (
    ("t_embedder.mlp.0.weight", "norm1.emb.timestep_embedder.linear_1.weight"),
    ("t_embedder.mlp.0.bias", "norm1.emb.timestep_embedder.linear_1.bias"),
    ("t_embedder.mlp.2.weight", "norm1.emb.timestep_embedder.linear_2.weight"),
    ("t_embedder.mlp.2.bias", "norm1.emb.timestep_embedder.linear_2.bias"),
    ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight"),
)
# The fused attention input projection `attn.qkv` is split, in this order, into these diffusers projections.
QKV_SPLIT = ("attn1.to_q", "attn1.to_k", "attn1.to_v")

# The key map.

def one_to_one_pairs(depth: int) -> list[tuple[str, str]]:
    """Every tensor copied unchanged, (ours, diffusers), for a model of `depth` blocks."""
    pairs = list(TOP_PAIRS)
    for i in range(depth):
        pairs += [(f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}") for ours, theirs in BLOCK_PAIRS]
    return pairs


def diffusers_shapes(config: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes a DiTTransformer2DModel of `config` holds, derived from ours through the map."""
    ours = state_shapes(config)
    shapes = {theirs: ours[key] for key, theirs in one_to_one_pairs(config.depth)}
    for i in range(config.depth):
        block = f"transformer_blocks.{i}."
        for key, theirs in EMBEDDER_PAIRS:
            shapes[block + theirs] = ours[key]
        for part in ("weight", "bias"):
            rows, *rest = ours[f"blocks.{i}.attn.qkv.{part}"]
            for name in QKV_SPLIT:
                shapes[f"{block}{name}.{part}"] = (rows // 3, *rest)
    return shapes


def pos_table(config: DiTConfig) -> torch.Tensor:
    """The fixed sin-cos `pos_embed` of `config`, which diffusers recomputes instead of storing."""
    return sincos_2d(config.hidden_size, math.isqrt(config.num_patches))[None]  # (1, T, D)


def check_diffusers_keys(state: dict[str, torch.Tensor], config: DiTConfig, name: str) -> None:
    """The key/shape check (ditcli.weights.record) against the diffusers side of the map."""
    check_keys(state, diffusers_shapes(config), f"{name} does not match the DiT key map", config.depth,
               "is it a DiT transformer of this depth?")


def check_exportable(config: DiTConfig) -> None:
    """Raise when diffusers' DiTTransformer2DModel cannot express `config`."""
    if config.mlp_ratio != 4.0:
        raise UserError(f"diffusers' DiT blocks have an MLP ratio of 4, this model has {config.mlp_ratio}",
                        "convert to safetensors instead")
    if config.class_dropout_prob <= 0:
        raise UserError("diffusers' DiT always has a null-class row in its label table; this model has none",
                        "convert to safetensors instead")


def is_rounded_table(pos_embed: torch.Tensor, config: DiTConfig) -> bool:
    """Whether `pos_embed` is the fixed sin-cos table, rounded to its own dtype (as an fp16 file stores it)."""
    return torch.equal(pos_embed, pos_table(config).to(pos_embed.dtype))


def to_diffusers_state(state: dict[str, torch.Tensor], config: DiTConfig) -> tuple[dict, list[str]]:
    """Our state dict to DiTTransformer2DModel keys: qkv split, embedders copied into every block, pos_embed dropped."""
    check_exportable(config)
    check_state_dict(state, config, "the source weights")
    warnings = []
    table = pos_table(config)
    drift = (state["pos_embed"].float() - table).abs().max().item()
    if drift > 0 and not is_rounded_table(state["pos_embed"], config):
        warnings.append(f"pos_embed differs from the fixed sin-cos table by up to {drift:.3g}; diffusers recomputes "
                        "it, so the diffusers model will not match the source")
    out = {theirs: state[ours].clone() for ours, theirs in one_to_one_pairs(config.depth)}
    for i in range(config.depth):
        block = f"transformer_blocks.{i}."
        for ours, theirs in EMBEDDER_PAIRS:
            out[block + theirs] = state[ours].clone()  # every block gets its own copy
        for part in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)  # 3 x (D, ...)
            for name, tensor in zip(QKV_SPLIT, (q, k, v)):
                out[f"{block}{name}.{part}"] = tensor.clone()
    check_diffusers_keys(out, config, "the exported weights")
    return out, warnings


def from_diffusers_weights(state: dict[str, torch.Tensor], config: DiTConfig,
                           name: str = "the diffusers weights") -> tuple[dict, list[str]]:
    """diffusers keys to ours: block 0's embedders kept (others checked), q/k/v joined, pos_embed rebuilt."""
    check_diffusers_keys(state, config, name)
    warnings = []
    out = {ours: state[theirs] for ours, theirs in one_to_one_pairs(config.depth)}
    for ours, theirs in EMBEDDER_PAIRS:
        first = state[f"transformer_blocks.0.{theirs}"]
        out[ours] = first
        differing = [i for i in range(1, config.depth) if not torch.equal(state[f"transformer_blocks.{i}.{theirs}"],
                                                                         first)]
        if differing:
            gap = max((state[f"transformer_blocks.{i}.{theirs}"].float() - first.float()).abs().max().item()
                      for i in differing)
            warnings.append(f"{theirs} differs from block 0's copy in blocks {', '.join(map(str, differing))} "
                            f"(by up to {gap:.3g}); kept block 0's, so those blocks will not match diffusers")
    for i in range(config.depth):
        block = f"transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state[f"{block}{name}.{part}"] for name in QKV_SPLIT])
    dtype = out["x_embedder.proj.weight"].dtype
    out["pos_embed"] = pos_table(config).to(dtype)
    check_state_dict(out, config, "the imported weights")
    return out, warnings


# Reading diffusers folders and files.

def config_from_diffusers(data: dict, name: str = "config.json", convention: str = "diffusers") -> DiTConfig:
    """Our DiTConfig from a DiTTransformer2DModel config.json; refuses the transformer variants DiT is not.

    `convention` is the timestep convention the weights were trained with; the pre-MLP LayerNorm eps is the
    config's `norm_eps` (diffusers' default 1e-5 when absent).
    """
    if data.get("_class_name") not in TRANSFORMER_CLASSES:
        raise UserError(f"{name} describes a {data.get('_class_name')}, not a DiT transformer",
                        f"expected one of {', '.join(TRANSFORMER_CLASSES)}")
    expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
                "norm_elementwise_affine": False}
    for key, value in expected.items():
        if data.get(key, value) != value:
            raise UserError(f"{name} has {key}={data[key]!r}; a DiT needs {value!r}")
    values = read_fields(data, TRANSFORMER_FIELDS, name, "transformer config", strict=False)
    heads, in_channels = values["num_attention_heads"], values["in_channels"]
    out_channels = values.get("out_channels") or in_channels
    return read_config({"input_size": values["sample_size"], "patch_size": values["patch_size"],
                        "in_channels": in_channels, "hidden_size": heads * values["attention_head_dim"],
                        "depth": values["num_layers"], "num_heads": heads, "mlp_ratio": 4.0,
                        "num_classes": values["num_embeds_ada_norm"], "learn_sigma": out_channels == 2 * in_channels,
                        "timestep_convention": convention,
                        "norm_eps": values.get("norm_eps", DIFFUSERS_NORM_EPS)}, name, "model config")


def from_diffusers_state(state: dict[str, torch.Tensor], config: DiTConfig | None = None,
                         num_heads: int | None = None, name: str = "the diffusers weights") -> Checkpoint:
    """A Checkpoint from diffusers-keyed weights; without `config` the latent size is unknown, so it is refused."""
    if config is None:
        raise UserError("diffusers weights alone do not record the model's input size",
                        "convert the transformer/ folder (with its config.json) or the pipeline folder instead")
    if num_heads is not None and num_heads != config.num_heads:
        raise UserError(f"--num-heads {num_heads} contradicts the config's {config.num_heads} heads", "drop it")
    state, warnings = from_diffusers_weights(state, config, name)
    return Checkpoint(state, config, "diffusers", "ema", codec=default_codec_spec(config.in_channels),
                      warnings=warnings)


def read_diffusers(path: str | Path, config: DiTConfig | None = None) -> Checkpoint:
    """A DiTPipeline folder, its transformer/ folder, or the weights file inside one, as a Checkpoint."""
    path = Path(path)
    if path.is_file():
        folder = path.parent
    elif (path / "model_index.json").is_file():
        folder = path / "transformer"
    else:
        folder = path
    if not (folder / "config.json").is_file():
        raise UserError(f"{path} is not a diffusers DiT folder (no model_index.json or config.json)",
                        "pass a DiTPipeline folder, its transformer/ folder, or a weight file")
    transformer = read_json(folder / "config.json")
    pipeline = folder.parent / "model_index.json"
    index = read_json(pipeline) if pipeline.is_file() else {}
    convention, why = source_convention(folder, index)
    stored = config_from_diffusers(transformer, str(folder / "config.json"), convention)
    if not isinstance(index.get(DITCLI_KEY), dict) and convention == "reference":
        stored = dataclasses.replace(stored, norm_eps=REFERENCE_NORM_EPS)  # the hub's conversions leave diffusers' default eps
    if config is not None and config != stored:
        raise UserError(f"{folder} holds {describe(stored)}, not {describe(config)}", "drop --model or fix it")
    weights = path if path.is_file() else _weights_file(folder)
    checkpoint = from_diffusers_state(_read_weights(weights), stored, name=str(weights))
    checkpoint.convention_source = why
    checkpoint.config_recorded = True  # config.json gives the heads
    if index:
        _apply_pipeline_index(checkpoint, index, folder.parent)
    return checkpoint


def source_convention(folder: Path, index: dict) -> tuple[str, str]:
    """The timestep convention a diffusers folder's weights were trained with, and why we think so.

    Our export records it (exports made before the record existed were all reference models); the hub's
    conversions of the released .pt (the registry's hub repos, such as facebook/DiT-XL-2-256) are reference
    weights; any other folder was trained with diffusers' forward.
    """
    ours = read_object(index.get(DITCLI_KEY), folder.parent / "model_index.json", f"{DITCLI_KEY} record")
    if ours is not None:
        return (read_choice(ours.get(CONVENTION_KEY), tuple(TIMESTEP_CONVENTIONS), folder.parent / "model_index.json",
                            f"{DITCLI_KEY}.{CONVENTION_KEY}", "reference"), "recorded by the ditcli export")
    repo = repo_of(folder)
    if repo in reference_repos():
        return "reference", f"{repo} is a conversion of the released reference weights"
    return "diffusers", "a diffusers folder without a ditcli record, so diffusers' own forward"


def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, PICKLED_WEIGHTS_NAME):
        if (folder / name).is_file():
            return folder / name
    variants = sorted(folder.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    raise UserError(f"{folder} has no {WEIGHTS_NAME}",
                    "sharded or multi-variant folders are not supported; pass the weight file itself")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


def _apply_pipeline_index(checkpoint: Checkpoint, index: dict, root: Path) -> None:
    """Class names from id2label, codec and weights from what our export recorded or from the vae/ folder; every
    record through the one validation (ditcli.weights.fields)."""
    index_path = root / "model_index.json"
    _apply_labels(checkpoint, read_object(index.get("id2label"), index_path, "id2label") or {}, index_path)
    ours = read_object(index.get(DITCLI_KEY), index_path, f"{DITCLI_KEY} record") or {}
    checkpoint.weights = read_choice(ours.get("weights"), WEIGHT_CHOICES, index_path, f"{DITCLI_KEY}.weights",
                                     checkpoint.weights)
    checkpoint.weights_recorded = "weights" in ours
    if "schedule" in ours:
        checkpoint.schedule = read_schedule(ours["schedule"], index_path, f"{DITCLI_KEY}.schedule")
    elif (root / "scheduler" / "scheduler_config.json").is_file():  # a folder another tool wrote
        checkpoint.schedule = _scheduler_schedule(root / "scheduler" / "scheduler_config.json", checkpoint)
    checkpoint.sampling = read_sampling(ours.get("sampling"), index_path, f"{DITCLI_KEY}.sampling record")
    checkpoint.ema = read_ema(ours.get("ema"), index_path, f"{DITCLI_KEY}.ema record")
    if ours.get("codec") is not None:  # 0 or [] is no record of a codec, but a bad one
        checkpoint.codec = read_codec(ours["codec"], index_path, f"{DITCLI_KEY}.codec record")
    elif (root / "vae" / "config.json").is_file():
        scale = read_json(root / "vae" / "config.json").get("scaling_factor")
        checkpoint.codec = {"kind": "vae", "vae": str((root / "vae").resolve())}
        if scale is not None:
            checkpoint.codec["scale"] = read_value(scale, VAE_SCALE, root / "vae" / "config.json", "scaling_factor")
    elif names_vae(index) and checkpoint.codec is not None and repo_of(root) not in reference_repos():
        checkpoint.warnings.append(  # the reference repos were converted with the SD VAE ema
            f"the pipeline names its own VAE but {root / 'vae'} is absent (a hub id fetches only the DiT); the SD VAE "
            "ema is assumed: pass --vae with the pipeline's VAE if it differs")


def names_vae(index: dict) -> bool:
    """Whether model_index.json names a VAE component: ["diffusers", "AutoencoderKL"], not [null, null]."""
    entry = index.get("vae")
    return isinstance(entry, list) and bool(entry) and bool(entry[0])


def _apply_labels(checkpoint: Checkpoint, labels: dict, index_path: Path) -> None:
    """Class names from model_index.json's id2label (names, by class id as text); a table that does not cover the
    classes is dropped with a warning."""
    if not labels:
        return
    if not all(isinstance(name, str) for name in labels.values()):
        raise refuse(index_path, "id2label", "a label that is no string")
    names = [labels.get(str(i)) for i in range(checkpoint.config.num_classes)]
    if None in names or len(labels) != checkpoint.config.num_classes:
        checkpoint.warnings.append(f"model_index.json id2label has {len(labels)} entries for "
                                   f"{checkpoint.config.num_classes} classes; class names dropped")
    else:
        checkpoint.class_names = names


def _scheduler_schedule(path: Path, checkpoint: Checkpoint) -> str:
    """Our name for the betas a diffusers scheduler config describes; linear, with a warning, when they are no schedule
    of ours (DiT was trained with linear betas, as the hub's DiT folders say)."""
    config = read_json(path)
    if config.get("trained_betas"):
        betas = config["trained_betas"]
        if not isinstance(betas, list) or not all(is_kind(beta, float) and 0 < beta < 1 for beta in betas):
            raise refuse(path, "trained_betas", "it is no list of betas in (0, 1)")
        betas = torch.tensor(betas, dtype=torch.float64)
        for name in BETA_SCHEDULES:
            if betas.shape == (TRAIN_TIMESTEPS,) and torch.allclose(betas, torch.from_numpy(named_betas(name))):
                return name
    elif (config.get("num_train_timesteps", TRAIN_TIMESTEPS) == TRAIN_TIMESTEPS
          and config.get("beta_schedule") == "linear"
          and (config.get("beta_start"), config.get("beta_end")) == tuple(named_betas("linear")[[0, -1]].tolist())):
        return "linear"
    elif config.get("beta_schedule") == "squaredcos_cap_v2":
        return "cosine"
    checkpoint.warnings.append(f"{path} describes betas that are neither the linear nor the cosine schedule; "
                                        "sampling assumes linear (DiT's)")
    return "linear"


# Writing a DiTPipeline folder.

def transformer_config(config: DiTConfig) -> dict:
    """DiTTransformer2DModel's config.json for `config`; norm_eps is the model's own (the reference's 1e-6)."""
    check_exportable(config)
    with torch.device("meta"):
        eps = DiT(config).blocks[0].norm2.eps
    return {"_class_name": TRANSFORMER_CLASSES[0], "_diffusers_version": version("diffusers"),
            "num_attention_heads": config.num_heads, "attention_head_dim": config.hidden_size // config.num_heads,
            "in_channels": config.in_channels, "out_channels": config.out_channels, "num_layers": config.depth,
            "sample_size": config.input_size, "patch_size": config.patch_size,
            "num_embeds_ada_norm": config.num_classes, "activation_fn": "gelu-approximate", "attention_bias": True,
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": eps}


def scheduler_config(schedule: str = "linear") -> dict:
    """A DDIMScheduler over the training betas (given as a table, so the schedule has one owner: ditcli.diffusion)."""
    return {"_class_name": "DDIMScheduler", "_diffusers_version": version("diffusers"),
            "num_train_timesteps": TRAIN_TIMESTEPS, "trained_betas": named_betas(schedule).tolist(),
            "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0}


def to_diffusers(checkpoint: Checkpoint, out_dir: str | Path, dtype: torch.dtype | None = None,
                 vae: str | Path | None = None, force: bool = False) -> list[str]:
    """Write a DiTPipeline folder (transformer, scheduler, vae if given, model_index.json); returns warnings."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    state, warnings = to_diffusers_state(checkpoint.state_dict, checkpoint.config)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    vae_dir = _resolve_vae(vae) if vae is not None else None
    if checkpoint.config.num_classes != PIPELINE_NULL_CLASS:
        warnings.append(f"DiTPipeline uses class {PIPELINE_NULL_CLASS} as the null class, so its guidance_scale > 1 "
                        f"needs a {PIPELINE_NULL_CLASS}-class model; this one has {checkpoint.config.num_classes} "
                        "(use guidance_scale=1)")
    if vae_dir is None and (checkpoint.codec or {}).get("kind") != "pixel":
        warnings.append("no VAE included: load with DiTPipeline.from_pretrained(OUT_DIR, vae=AutoencoderKL...)")

    def write(tmp: Path) -> None:
        (tmp / "transformer").mkdir()
        save_file(state, str(tmp / "transformer" / WEIGHTS_NAME))
        write_json(tmp / "transformer" / "config.json", transformer_config(checkpoint.config), sort_keys=True)
        (tmp / "scheduler").mkdir()
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config(checkpoint.schedule), sort_keys=True)
        if vae_dir is not None:
            _copy_vae(vae_dir, tmp / "vae")
        write_json(tmp / "model_index.json", _pipeline_index(checkpoint, vae_dir is not None), sort_keys=True)

    atomic_write_dir(out_dir, write, force=force)
    return warnings


def _pipeline_index(checkpoint: Checkpoint, has_vae: bool) -> dict:
    index = {"_class_name": "DiTPipeline", "_diffusers_version": version("diffusers"),
             "transformer": ["diffusers", TRANSFORMER_CLASSES[0]], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": ["diffusers", "AutoencoderKL"] if has_vae else [None, None],
             DITCLI_KEY: {"weights": checkpoint.weights, "codec": checkpoint.codec, "schedule": checkpoint.schedule,
                          "sampling": checkpoint.sampling.to_dict() if checkpoint.sampling else None,
                          "ema": checkpoint.ema.to_dict() if checkpoint.ema else None,
                          CONVENTION_KEY: checkpoint.config.timestep_convention}}
    if checkpoint.class_names is not None:
        index["id2label"] = {str(i): name for i, name in enumerate(checkpoint.class_names)}
    return index


def _resolve_vae(vae: str | Path) -> Path:
    """A local AutoencoderKL folder, or a hub id / alias fetched through (or found in) the Hugging Face cache."""
    if Path(vae).is_dir():
        return Path(vae)
    repo = VAE_ALIASES.get(str(vae), str(vae))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", WEIGHTS_NAME]))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot fetch the VAE {repo!r} to include it: {str(exc).splitlines()[0]}",
                        "pass --vae DIR with a local diffusers AutoencoderKL folder, or --vae none") from None


def _copy_vae(source: Path, target: Path) -> None:
    """config.json plus weights as safetensors; pickled weights are read safely and rewritten."""
    if not (source / "config.json").is_file():
        raise UserError(f"{source} is not a diffusers AutoencoderKL folder (no config.json)")
    target.mkdir()
    shutil.copyfile(source / "config.json", target / "config.json")
    if (source / WEIGHTS_NAME).is_file():
        shutil.copyfile(source / WEIGHTS_NAME, target / WEIGHTS_NAME)
    elif (source / PICKLED_WEIGHTS_NAME).is_file():
        save_file(_read_weights(source / PICKLED_WEIGHTS_NAME), str(target / WEIGHTS_NAME))
    else:
        raise UserError(f"{source} has no {WEIGHTS_NAME}")
