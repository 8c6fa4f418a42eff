"""Diff-AE networks (Preechakul et al., CVPR 2022), laid out like the official ``phizaz/diffae`` code
so that its checkpoints load by stripping a prefix.

Shapes, with C the channel count of a level and E = ``embed_channels``:

- ``SemanticEncoder``: image (B,3,H,W) -> z_sem (B, z_dim); the down path of the UNet with one more
  level, single-conv ResBlocks, then GN -> SiLU -> global average pool -> 1x1 conv.
- ``AutoencUNet``: (x_t (B,3,H,W), t (B,), z_sem (B, z_dim)) -> eps (B,3,H,W).
- ``LatentMLP``: (z_norm (B, z_dim), t (B,)) -> eps (B, z_dim), the latent DDIM prior.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from semdiff.nn import AttentionBlock, conv_nd, normalization, timestep_embedding, zero_module


# --------------------------------------------------------------------------------------------
# Configs


@dataclass
class DiffAEConfig:
    """Every architecture the official ``BeatGANsAutoencConfig`` can express (2-D, legacy attention)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    embed_channels: int = 512
    z_dim: int = 512
    enc_channel_mult: Sequence[int] | None = (1, 2, 4, 8, 8)
    enc_num_res_blocks: int = 2
    enc_attention_resolutions: Sequence[int] | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    dropout: float = 0.1

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.enc_channel_mult is not None:
            self.enc_channel_mult = tuple(self.enc_channel_mult)
        if self.enc_attention_resolutions is not None:
            self.enc_attention_resolutions = tuple(self.enc_attention_resolutions)
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{levels - 1} (channel_mult has {levels} levels)"
            )
        enc_levels = len(self.enc_channel_mult or self.channel_mult)
        if self.image_size % (2 ** (enc_levels - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{enc_levels - 1} (encoder levels)")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class LatentMLPConfig:
    """The official ``MLPSkipNetConfig`` (SiLU, LayerNorm, scale-only time condition, skips from layer 1)."""

    z_dim: int = 512
    hidden_channels: int = 2048
    num_layers: int = 10
    time_emb_channels: int = 64
    skip_layers: Sequence[int] | None = None  # default: range(1, num_layers)
    dropout: float = 0.0

    def __post_init__(self):
        if self.skip_layers is None:
            self.skip_layers = tuple(range(1, self.num_layers))
        self.skip_layers = tuple(self.skip_layers)
        if self.num_layers < 2:
            raise ValueError("the latent MLP needs at least 2 layers")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Blocks


class ResBlock(nn.Module):
    """Diff-AE ResBlock: GN -> SiLU -> [resample] -> conv, then the conditioned output half.

    With ``emb_channels`` set (the UNet), the output half is
    ``conv(dropout(SiLU(GN(h) * (1 + s_t) + b_t) * (1 + s_z)))`` with (s_t, b_t) from the time
    embedding and s_z from SiLU(z_sem) — scale-only z modulation. The encoder's blocks have no
    output half (``emb_channels=None``). ``down``/``up`` resample h and the skip by average pooling or
    nearest x2 between the norm and the first conv.
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        emb_channels: int | None = None,
        cond_channels: int | None = None,
        dropout: float = 0.0,
        down: bool = False,
        up: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), conv_nd(2, channels, out_channels, 3, padding=1))
        self.resample = "down" if down else "up" if up else None
        self.conditioned = emb_channels is not None
        if self.conditioned:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels or emb_channels, out_channels))
            self.out_layers = nn.Sequential(
                normalization(out_channels),
                nn.SiLU(),
                nn.Dropout(p=dropout),
                zero_module(conv_nd(2, out_channels, out_channels, 3, padding=1)),
            )
        self.skip_connection = nn.Identity() if out_channels == channels else conv_nd(2, channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.resample:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        if self.conditioned:
            scale_t, shift_t = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
            norm, act, drop, conv = self.out_layers
            h = norm(h) * (1 + scale_t) + shift_t
            if cond is not None:
                h = h * (1 + self.cond_emb_layers(cond).type(h.dtype)[..., None, None])
            h = conv(drop(act(h)))
        return self.skip_connection(x) + h


class Block(nn.ModuleList):
    """One entry of ``input_blocks``/``output_blocks``: ResBlocks and attention applied in order."""

    def forward(self, h, emb=None, cond=None):  # type: ignore[override]
        for layer in self:
            h = layer(h, emb, cond) if isinstance(layer, ResBlock) else layer(h)
        return h


def _attention(cfg: DiffAEConfig, ch: int) -> AttentionBlock:
    return AttentionBlock(ch, cfg.num_heads, cfg.num_head_channels)


# --------------------------------------------------------------------------------------------
# Networks


class SemanticEncoder(nn.Module):
    """Image in [-1, 1] (B,3,H,W) -> z_sem (B, z_dim), raw (not normalised)."""

    def __init__(self, cfg: DiffAEConfig):
        super().__init__()
        mult = cfg.enc_channel_mult or cfg.channel_mult
        attn = cfg.enc_attention_resolutions or cfg.attention_resolutions
        block = dict(dropout=cfg.dropout)
        ch = int(mult[0] * cfg.model_channels)
        self.input_blocks = nn.ModuleList([Block([conv_nd(2, cfg.in_channels, ch, 3, padding=1)])])
        resolution = cfg.image_size
        for level, m in enumerate(mult):
            for _ in range(cfg.enc_num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, int(m * cfg.model_channels), **block)]
                ch = int(m * cfg.model_channels)
                if resolution in attn:
                    layers.append(_attention(cfg, ch))
                self.input_blocks.append(Block(layers))
            if level != len(mult) - 1:
                self.input_blocks.append(Block([ResBlock(ch, ch, down=True, **block)]))
                resolution //= 2
        self.middle_block = Block([ResBlock(ch, **block), _attention(cfg, ch), ResBlock(ch, **block)])
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d((1, 1)), conv_nd(2, ch, cfg.z_dim, 1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.input_blocks:
            h = block(h)
        return self.out(self.middle_block(h))


class TimeEmbed(nn.Module):
    """Sinusoid ([cos, sin], original-scale t) -> Linear -> SiLU -> Linear; key ``time_embed.time_embed``."""

    def __init__(self, sinusoid_channels: int, embed_channels: int):
        super().__init__()
        self.sinusoid_channels = sinusoid_channels
        self.time_embed = nn.Sequential(
            nn.Linear(sinusoid_channels, embed_channels), nn.SiLU(), nn.Linear(embed_channels, embed_channels)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.sinusoid_channels))


class AutoencUNet(nn.Module):
    """The z_sem-conditioned UNet (``BeatGANsAutoencModel`` without its encoder): predicts eps."""

    def __init__(self, cfg: DiffAEConfig):
        super().__init__()
        mc, E = cfg.model_channels, cfg.embed_channels
        block = dict(emb_channels=E, cond_channels=cfg.z_dim, dropout=cfg.dropout)
        self.time_embed = TimeEmbed(mc, E)
        ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([Block([conv_nd(2, cfg.in_channels, ch, 3, padding=1)])])
        skip_channels: list[list[int]] = [[ch]] + [[] for _ in cfg.channel_mult[1:]]
        resolution = cfg.image_size
        for level, m in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, int(m * mc), **block)]
                ch = int(m * mc)
                if resolution in cfg.attention_resolutions:
                    layers.append(_attention(cfg, ch))
                self.input_blocks.append(Block(layers))
                skip_channels[level].append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([ResBlock(ch, ch, down=True, **block)]))
                skip_channels[level + 1].append(ch)
                resolution //= 2
        self.middle_block = Block([ResBlock(ch, **block), _attention(cfg, ch), ResBlock(ch, **block)])

        # Decoder: num_res_blocks + 1 blocks per level, each taking one skip (lateral) by concatenation.
        self.output_blocks = nn.ModuleList()
        self.skips_per_level = [len(s) for s in skip_channels]
        for level, m in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                lateral = skip_channels[level].pop()
                layers = [ResBlock(ch + lateral, int(m * mc), **block)]
                ch = int(m * mc)
                if resolution in cfg.attention_resolutions:
                    layers.append(_attention(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ch, up=True, **block))
                    resolution *= 2
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(2, ch, cfg.out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, z_sem: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t)
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, z_sem)
            skips.append(h)
        h = self.middle_block(h, emb, z_sem)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, z_sem)
        return self.out(h)


class LatentMLPLayer(nn.Module):
    """Linear -> [* (1 + Linear(SiLU(t_emb)))] -> LayerNorm -> SiLU (the last layer: Linear only).

    The official ``MLPLNAct`` registers ``linear_emb`` twice (also as ``cond_layers.1``); here it is
    stored once, and the converter drops the tied duplicate after checking it is identical.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int, *, last: bool, dropout: float = 0.0):
        super().__init__()
        self.last = last
        self.linear = nn.Linear(in_channels, out_channels)
        if not last:
            self.linear_emb = nn.Linear(cond_channels, out_channels)
            self.norm = nn.LayerNorm(out_channels)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.last:
            return x
        x = x * (1 + self.linear_emb(F.silu(t_emb)))
        return self.dropout(F.silu(self.norm(x)))


class LatentMLP(nn.Module):
    """The latent DDIM prior ``MLPSkipNet``: eps in the normalised z_sem space."""

    def __init__(self, cfg: LatentMLPConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = nn.Sequential(
            nn.Linear(cfg.time_emb_channels, cfg.z_dim), nn.SiLU(), nn.Linear(cfg.z_dim, cfg.z_dim)
        )
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            last = i == cfg.num_layers - 1
            a = cfg.z_dim if i == 0 else cfg.hidden_channels
            b = cfg.z_dim if last else cfg.hidden_channels
            if i in cfg.skip_layers:
                a += cfg.z_dim
            self.layers.append(LatentMLPLayer(a, b, cfg.z_dim, last=last, dropout=0.0 if last else cfg.dropout))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_emb = self.time_embed(timestep_embedding(t, self.cfg.time_emb_channels))
        h = z
        for i, layer in enumerate(self.layers):
            if i in self.cfg.skip_layers:
                h = torch.cat([h, z], dim=1)
            h = layer(h, t_emb)
        return h
