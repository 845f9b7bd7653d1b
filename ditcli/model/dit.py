"""The DiT denoiser (Peebles & Xie, 2023), state-dict compatible with facebookresearch/DiT."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditcli.errors import UserValueError

# Heads cannot be read from a state dict, so they come from the preset whose width matches.
PRESET_SHAPES = {
    "DiT-S": dict(depth=12, hidden_size=384, num_heads=6),
    "DiT-B": dict(depth=12, hidden_size=768, num_heads=12),
    "DiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
    "DiT-XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
HEADS_BY_WIDTH = {shape["hidden_size"]: shape["num_heads"] for shape in PRESET_SHAPES.values()}
# Upper bounds of a model's sizes, of `dit train`'s options and of a file's config record: far above any real DiT,
# low enough that a typo or a hostile file cannot allocate the machine away.
MAX_IMAGE_SIZE = 4096  # pixels, so also the largest input grid (a pixel model's)
MAX_HIDDEN_SIZE = 16384
MAX_DEPTH = 512
# How timestep frequencies are spaced: the reference divides by `half` (ADM), diffusers by `half - 1`
# (`get_timestep_embedding(downscale_freq_shift=1)`). The value is the shift subtracted from `half`.
TIMESTEP_CONVENTIONS = {"reference": 0, "diffusers": 1}
REFERENCE_NORM_EPS = 1e-6  # the reference's LayerNorm eps; diffusers' pre-MLP LayerNorm takes config.norm_eps
# How a mean-flow model sees its second time r (the start of the interval [r, t] its average velocity spans):
# "separate" adds an embedder of t - r to the conditioning (MeanFlow; the PyTorch port's key names `r_embedder.*`),
# "decoupled" feeds r through the same t_embedder to the later blocks and the final layer (Decoupled MeanFlow).
MEAN_FLOW_FORMS = ("separate", "decoupled")
OPTIONAL_FIELDS = ("mean_flow_form", "decoupled_depth")  # written only when set, so other files keep their bytes


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one DiT; the field names follow the reference constructor."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # Kept for models trained with diffusers' DiTTransformer2DModel, whose forward differs in these two places.
    timestep_convention: str = "reference"
    norm_eps: float = REFERENCE_NORM_EPS  # eps of the pre-MLP LayerNorm (diffusers' `norm3`)
    # A mean-flow model's second time input: None for DiT, SiT and REPA models (see MEAN_FLOW_FORMS).
    mean_flow_form: str | None = None
    decoupled_depth: int | None = None  # "decoupled": blocks[:k] see t; blocks[k:] and the final layer see r

    def __post_init__(self):
        checks = [
            (self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}"),
            (self.input_size % self.patch_size == 0,
             f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"),
            (self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"),
            (self.hidden_size % 4 == 0, f"hidden_size must be divisible by 4, got {self.hidden_size}"),
            (self.depth >= 1 and self.in_channels >= 1, "depth and in_channels must be >= 1"),
            (self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}"),
            (0.0 <= self.class_dropout_prob < 1.0,
             f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}"),
            (self.timestep_convention in TIMESTEP_CONVENTIONS,
             f"timestep_convention must be one of {', '.join(TIMESTEP_CONVENTIONS)}, got {self.timestep_convention!r}"),
            (self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}"),
            (self.mean_flow_form in (None, *MEAN_FLOW_FORMS),
             f"mean_flow_form must be one of {', '.join(MEAN_FLOW_FORMS)}, got {self.mean_flow_form!r}"),
            ((self.decoupled_depth is not None) == (self.mean_flow_form == "decoupled"),
             "decoupled_depth is set exactly when mean_flow_form is 'decoupled'"),
            (self.decoupled_depth is None or 1 <= self.decoupled_depth <= self.depth,
             f"decoupled_depth must be in [1, depth {self.depth}], got {self.decoupled_depth}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserValueError(message)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def label_rows(self) -> int:
        """Rows of the label table: one extra (the null class) when labels can be dropped."""
        return self.num_classes + int(self.class_dropout_prob > 0)

    @property
    def t_blocks(self) -> int:
        """How many blocks see t: all but a decoupled model's later ones, which see r."""
        return self.depth if self.decoupled_depth is None else self.decoupled_depth

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in OPTIONAL_FIELDS:
            if data[name] is None:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DiTConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserValueError(f"unknown DiT config fields: {', '.join(unknown)}")
        return cls(**data)


def preset_names() -> list[str]:
    return [f"{name}/{patch}" for name in PRESET_SHAPES for patch in PATCH_SIZES]


def preset(name: str, **overrides) -> DiTConfig:
    """A named configuration such as "DiT-XL/2", with any field overridden."""
    base, _, patch = name.partition("/")
    if base not in PRESET_SHAPES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        raise UserValueError(f"unknown model preset {name!r}", f"choose from {', '.join(preset_names())}")
    fields = dict(PRESET_SHAPES[base], patch_size=int(patch))
    fields.update(overrides)
    return DiTConfig(**fields)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, broadcast over tokens (Sec. 3.2 of DiT)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, shift: int = 0) -> torch.Tensor:
    """Sinusoidal timestep features, cos before sin, as in ADM's `timestep_embedding`.

    `shift` 1 spaces the frequencies as diffusers' `get_timestep_embedding(downscale_freq_shift=1)` does.
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(max_period) * steps / (half - shift))
    args = t[:, None].float() * freqs[None]  # (N, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (N, dim)
    return embedding


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos table, sin before cos (MAE's `get_1d_sincos_pos_embed_from_grid`)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions.reshape(-1, 1).double() * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # (M, dim)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """2-D sin-cos position table; the first half encodes the column, the second the row."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (G*G, dim)
    return table.float()


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens; keys match timm's PatchEmbed (`proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: a transposed view would pass its layout on to the residual stream (every elementwise op
        # keeps its first input's), and each block's LayerNorm would copy it back and its adds write strided, which
        # cost 0.13 s of a 2.9 s bf16 DiT-B/2 forward at batch 16 on a CPU.
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors through sinusoidal features and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, frequency_shift: int = 0):
        super().__init__()
        self.frequency_size = frequency_size
        self.frequency_shift = frequency_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_size, shift=self.frequency_shift)
        features = features.to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels to vectors; row `num_classes` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        if drop_mask is None and self.training and self.dropout_prob > 0:
            drop_mask = torch.rand(labels.shape, device=labels.device) < self.dropout_prob
        if drop_mask is not None:
            labels = torch.where(drop_mask, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, through SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        qkv = self.qkv(x).view(n, tokens, 3, self.num_heads, dim // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, H, T, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))  # (N, T, D)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU; keys match timm's Mlp (`fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Fig. 3 of DiT)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm_eps: float = REFERENCE_NORM_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=REFERENCE_NORM_EPS)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens back to patches."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=REFERENCE_NORM_EPS)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class MetaInitSkipped(torch.overrides.TorchFunctionMode):
    """Leaves out the normal draws of layers built on the meta device. Their values do not exist, but the meta kernel
    of `normal_` is torch's Python reference, whose first call imports torch._dynamo: 2 s of every start-up that
    builds a DiT on the meta device (reading a checkpoint does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (nn.init.normal_, torch.Tensor.normal_):
            tensor = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if tensor is not None and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


class DiT(nn.Module):
    """Diffusion transformer over a square latent (or pixel) grid."""

    def __init__(self, config: DiTConfig, generator: torch.Generator | None = None):
        """Build and initialise; with a `generator` every initial weight is drawn from it alone (the modules are
        built on the meta device, so nothing touches the global RNG), without one from the global RNG, as the
        reference does."""
        super().__init__()
        self.config = config
        self.grad_checkpointing = False
        device = torch.get_default_device()
        if device.type == "meta":
            with MetaInitSkipped():
                self._build(config)
        elif generator is not None:
            with torch.device("meta"), MetaInitSkipped():
                self._build(config)
        else:
            self._build(config)  # the reference's draws from the global RNG, in its order
        if generator is not None and device.type != "meta":
            self.to_empty(device=device)
        self.initialize_weights(generator)

    def _build(self, config: DiTConfig) -> None:
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, frequency_shift=TIMESTEP_CONVENTIONS[config.timestep_convention])
        if config.mean_flow_form == "separate":
            self.r_embedder = TimestepEmbedder(d, frequency_shift=TIMESTEP_CONVENTIONS[config.timestep_convention])
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, d), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(d, config.num_heads, config.mlp_ratio, config.norm_eps)
                                    for _ in range(config.depth))
        self.final_layer = FinalLayer(d, config.patch_size, config.out_channels)

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None):
        """The reference initialisation: Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        if self.pos_embed.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
        grid = int(math.sqrt(self.config.num_patches))
        self.pos_embed.copy_(sincos_2d(self.config.hidden_size, grid)[None])
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1), generator=generator)
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02, generator=generator)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02, generator=generator)
        if hasattr(self, "r_embedder"):
            nn.init.normal_(self.r_embedder.mlp[0].weight, std=0.02, generator=generator)
            nn.init.normal_(self.r_embedder.mlp[2].weight, std=0.02, generator=generator)
        for layer in [*(block.adaLN_modulation[-1] for block in self.blocks),
                      self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def set_forward(self, timestep_convention: str, norm_eps: float) -> None:
        """Adopt another forward convention; the parameters are the same, only the computation changes."""
        self.config = replace(self.config, timestep_convention=timestep_convention, norm_eps=norm_eps)
        for embedder in (self.t_embedder, getattr(self, "r_embedder", None)):
            if embedder is not None:
                embedder.frequency_shift = TIMESTEP_CONVENTIONS[timestep_convention]
        for block in self.blocks:
            block.norm2.eps = norm_eps

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (N, T, p*p*C) back to images (N, C, H, W)."""
        p, c = self.config.patch_size, self.config.out_channels
        h = w = self.config.input_size // p
        x = x.view(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop_mask: torch.Tensor | None = None, r: torch.Tensor | None = None) -> torch.Tensor:
        """Predict (eps, variance values) for x_t, the velocity at t, or a mean-flow model's average velocity over
        [r, t] (None: r = t, the instantaneous velocity).

        `drop_mask` replaces labels by the null class. Left as None in training mode, labels are dropped with
        probability `class_dropout_prob` from the global RNG, as the reference does; in eval mode never.
        """
        x, c, c_late = self.conditioning(x, t, y, drop_mask, r)
        x, _ = self.run_blocks(x, c, c_late, len(self.blocks))
        return self.head(x, c_late)

    def forward_tokens(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None,
                       r: torch.Tensor | None, depths: tuple[int, ...], head: bool = True
                       ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The forward's output and the tokens (N, T, D) after each block of `depths`, counted from 1 as REPA's
        `encoder_depth` (training's representation alignment). Without `head` the blocks after the deepest of `depths`
        are not run and the output is None (a teacher that only gives tokens)."""
        x, c, c_late = self.conditioning(x, t, y, drop_mask, r)
        x, taps = self.run_blocks(x, c, c_late, len(self.blocks) if head else max(depths), depths)
        return (self.head(x, c_late) if head else None), taps

    def conditioning(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_mask: torch.Tensor | None,
                     r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens, the conditioning of the blocks that see t and of those (and the final layer) that see r."""
        if r is None and self.config.mean_flow_form is None:
            x, c = self.embed(x, t, y, drop_mask)
            return x, c, c
        return self.embed_interval(x, t, r if r is not None else t, y, drop_mask)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor, c_late: torch.Tensor, last: int,
                   depths: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks 1..`last` on the tokens; also the tokens after each block of `depths`, in their order."""
        taps: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[:last]):
            cond = c if i < self.config.t_blocks else c_late
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, use_reentrant=False)
            else:
                x = block(x, cond)  # (N, T, D)
            if i + 1 in depths:
                taps[i + 1] = x
        return x, [taps[depth] for depth in depths]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions, and the conditioning vector c = t_embed + y_embed."""
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        return tokens, self.t_embedder(t) + self.y_embedder(y, drop_mask)  # (N, D)

    def embed_interval(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor,
                       drop_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens and the conditioning of the early (t) and late (r) blocks of a mean-flow model.

        "separate": c = t_embed(t) + r_embed(t - r) + y_embed everywhere (MeanFlow feeds the interval's length).
        "decoupled": t_embed(t) + y_embed before `decoupled_depth`, t_embed(r) + y_embed after (DMF).
        """
        if self.config.mean_flow_form is None:
            raise ValueError("this DiT has no second time input: it is not a mean-flow model")
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        label = self.y_embedder(y, drop_mask)  # (N, D), one draw of the dropout for both
        if self.config.mean_flow_form == "separate":
            c = self.t_embedder(t) + self.r_embedder(t - r) + label  # (N, D)
            return tokens, c, c
        return tokens, self.t_embedder(t) + label, self.t_embedder(r) + label  # (N, D) each

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The last block's tokens to the model's output image."""
        return self.unpatchify(self.final_layer(x, c))  # (N, C_out, H, W)


def count_parameters(config: DiTConfig) -> int:
    """Parameters of the model, pos_embed included, counted on the meta device."""
    with torch.device("meta"):
        model = DiT(config)
    return sum(p.numel() for p in model.parameters())


def forward_macs(config: DiTConfig) -> int:
    """Multiply-accumulates of one forward pass for one image: linears, convolution and attention."""
    d, tokens, p = config.hidden_size, config.num_patches, config.patch_size
    mlp = int(d * config.mlp_ratio)
    per_block = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d + 6 * d * d
    embed = tokens * d * p * p * config.in_channels + 256 * d + d * d
    final = tokens * d * p * p * config.out_channels + 2 * d * d
    return config.depth * per_block + embed + final


def training_flops(config: DiTConfig) -> int:
    """FLOPs of one training image: forward plus backward, about 3 forwards, 2 FLOPs per MAC."""
    return 3 * 2 * forward_macs(config)
