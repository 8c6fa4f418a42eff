"""LRDM networks (Traub 2022, official code ``jeremiastraub/diffusion``), laid out like the official
modules so that their state dicts load by stripping a prefix.

The model works in the latent space of a frozen first stage (VQ-f4: images (B,3,H,W) -> z0
(B,3,H/4,W/4)). Shapes below use the released r64x8x8 LRDM (latent 3x64x64) as the example:

- ``RepresentationEncoder``: z0 (B,3,64,64) [, t (B,)] -> h (B, z_channels, 8, 8).
- ``RepresentationAE``: ``quant_conv(h)`` -> moments (B, 2*embed_dim, 8, 8) -> posterior
  N(mean, exp(logvar)); ``decode(r)`` = ``decoder(post_quant_conv(r))`` -> multi-scale features.
- ``RepresentationDecoder``: r (B, z_channels, 8, 8) [, t] -> features deep -> shallow,
  ``[256@8x8, 256@16x16, 256@32x32, 128@64x64]`` (one per level, collected before each upsampling
  block, the last after the output head). Despite its name it does not reconstruct anything.
- ``ReprCondUNet`` (``DiffusionUNetReprCond``): (z_t (B,3,64,64), t (B,), features) -> x0 prediction
  (B,3,64,64). The features enter by channel concatenation: the shallowest feature map at the first
  ResBlock of the first down level, the next one at the second level, ..., and the deepest at the first
  middle ResBlock.

Official quirks kept on purpose (they are part of the arithmetic):

- sinusoidal time embedding ``[sin, cos]`` with frequencies ``exp(-ln(1e4) * i / (half - 1))``,
  computed as ``arange * (-(ln(1e4) / (half - 1)))`` in float32 (``positional_embedding``);
- GroupNorm with ``min(out_ch // 4, 32)`` groups and eps 1e-6 everywhere; a ResBlock's *input*
  norm uses the group count of its *output* width;
- AdaGN ``GN(h) * (1 + scale) + shift`` from the time embedding only (the UNet), or a bias
  ``h + emb`` before the output norm (time-conditional representation networks, t-LRDM);
- improved-diffusion's legacy QKV layout (per head ``[q, k, v]``), heads = C / ``num_ch_per_head``;
- the UNet's down path pushes a ResBlock's output to the skip stack *before* the attention block
  that follows it;
- the representation decoder's middle ResBlocks never see the time embedding, even in t-LRDM;
- every ResBlock owns ``emb_layers`` even where no embedding is ever passed (kept so keys match).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from semdiff.nn import AttentionBlock, conv_nd, normalization, zero_module

# --------------------------------------------------------------------------------------------
# Configs: the official constructor arguments, with the official defaults


def _tuple(v):
    return tuple(v) if v is not None else None


def _norm_groups(channels: int) -> int:
    """The official group count ``min(channels // 4, 32)``."""
    return min(channels // 4, 32)


class _Config:
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        """Build from official ``params`` (unknown keys are an error, so nothing is silently ignored)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no parameter(s) {unknown}")
        return cls(**params)


@dataclass
class UNetConfig(_Config):
    """``DiffusionUNetReprCond`` arguments (official defaults; the released configs override several)."""

    in_channels: int = 3
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 64
    attn_resolutions: Sequence[int] = ()
    num_heads: int = 1
    num_ch_per_head: int | None = None
    nonlinearity: str = "silu"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    resample_with_resblock: bool = True
    resample_with_conv: bool = True
    use_adaptive_group_norm: bool = False
    scale_by_sqrt2: bool = True
    dropout: float = 0.0
    num_classes: int | None = None
    repr_ch: int | None = None
    repr_ch_mult: Sequence[int] | None = None

    def __post_init__(self):
        self.ch_mult = _tuple(self.ch_mult)
        self.attn_resolutions = _tuple(self.attn_resolutions)
        self.repr_ch_mult = _tuple(self.repr_ch_mult)
        _check_supported(self, "UNet")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"UNet resolution {self.resolution} is not divisible by 2^{len(self.ch_mult) - 1}")
        mult = self.repr_ch_mult or self.ch_mult
        if len(mult) != len(self.ch_mult):
            raise ValueError(f"repr_ch_mult {list(mult)} needs one entry per UNet level ({len(self.ch_mult)})")


@dataclass
class DecoderConfig(_Config):
    """``RepresentationDecoder`` arguments (official defaults)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    z_channels: int = 16
    dropout: float = 0.0
    resolution: int = 64
    act: str = "silu"
    num_heads: int = 1
    num_ch_per_head: int | None = None
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    resample_with_resblock: bool = True
    resample_with_conv: bool = True
    use_adaptive_group_norm: bool = False
    scale_by_sqrt2: bool = False
    num_classes: int | None = None
    time_conditional: bool = False
    fc_ch: int | None = None  # accepted and unused, as in the official code

    _what: ClassVar[str] = "representation decoder"

    def __post_init__(self):
        self.ch_mult = _tuple(self.ch_mult)
        self.attn_resolutions = _tuple(self.attn_resolutions)
        _check_supported(self, self._what)


@dataclass
class EncoderConfig(DecoderConfig):
    """``RepresentationEncoder`` arguments: the decoder's plus the input and posterior options."""

    double_z: bool = False
    in_channels: int = 3
    conv_out_channels: int | None = None  # accepted and unused, as in the official code

    _what: ClassVar[str] = "representation encoder"


@dataclass
class RepresentationConfig(_Config):
    """``RepresentationAE``: ``embed_dim`` plus the encoder and decoder configs."""

    embed_dim: int
    encoder: EncoderConfig
    decoder: DecoderConfig

    def __post_init__(self):
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig.from_dict(self.encoder)
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig.from_dict(self.decoder)
        if self.encoder.time_conditional != self.decoder.time_conditional:
            # the official reconstruct() asserts the same
            raise ValueError("the representation encoder and decoder must both be time-conditional or neither")

    @property
    def time_conditional(self) -> bool:
        return self.encoder.time_conditional

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape of one representation r: (embed_dim, res / 2^(levels-1), same)."""
        res = self.encoder.resolution // 2 ** (len(self.encoder.ch_mult) - 1)
        return (self.embed_dim, res, res)

    def to_dict(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "encoder": self.encoder.to_dict(), "decoder": self.decoder.to_dict()}

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "RepresentationConfig":
        return cls(embed_dim=params["embed_dim"], encoder=params["encoder"], decoder=params["decoder"])


def _check_supported(cfg, what: str) -> None:
    """Refuse official options whose code paths semdiff does not implement (they are unused by LRDM)."""
    if getattr(cfg, "num_classes", None) is not None:
        raise NotImplementedError(f"class-conditional {what}s (num_classes) are not supported")
    time_used = getattr(cfg, "time_conditional", True)
    if time_used and cfg.embedding_type.lower() != "positional":
        raise NotImplementedError(
            f"{what}: embedding_type {cfg.embedding_type!r} is not supported; LRDM's discrete-time models use "
            "'positional' (the Fourier embedding is for continuous-time models)"
        )
    if not cfg.resample_with_resblock:
        # The official UNet calls ``downsample(h, emb)`` on plain Downsample modules, which fails.
        raise NotImplementedError(f"{what}: resample_with_resblock=False is not supported (it fails in the official code too)")
    get_act(getattr(cfg, "nonlinearity", None) or getattr(cfg, "act"))


# --------------------------------------------------------------------------------------------
# Small pieces


def get_act(name: str) -> nn.Module:
    """The official ``get_act``: elu, relu, leakyrelu (slope 0.2), silu/swish."""
    name = name.lower()
    if name == "elu":
        return nn.ELU()
    if name == "relu":
        return nn.ReLU()
    if name == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.2)
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unknown nonlinearity {name!r}; one of elu, relu, leakyrelu, silu (swish)")


def positional_embedding(t: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """``PositionalSinusoidalEmbedding``: t (B,) -> (B, dim) = ``[sin(t f), cos(t f)]``.

    ``f_i = exp(i * -(ln(max_positions) / (half - 1)))``, ``half = dim // 2``; an odd dim gets a zero
    column. The product ``arange * -c`` is rounded once in float32, exactly as the official code does;
    ``semdiff.nn.timestep_embedding(order="sin_cos", freq_shift=1)`` divides after the product and
    differs by up to 6e-5 at t = 999, which is why it is not used here.
    """
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class PositionalEmbedding(nn.Module):
    """Module form of ``positional_embedding`` (index 0 of the official ``time_conditioning``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return positional_embedding(t, self.dim)


def time_conditioning(ch: int, act: str) -> nn.Sequential:
    """sinusoid(ch) -> Linear(ch, 4ch) -> act -> Linear(4ch, 4ch); keys ``1.*`` and ``3.*``."""
    return nn.Sequential(PositionalEmbedding(ch), nn.Linear(ch, 4 * ch), get_act(act), nn.Linear(4 * ch, 4 * ch))


class Attention(AttentionBlock):
    """The shared legacy-QKV ``AttentionBlock`` with LRDM's norm (min(C//4, 32) groups, eps 1e-6).

    ``x + proj_out(attn(qkv(GN(x))))``, times 1/sqrt(2) when ``scale_by_sqrt2``. Keys: norm, qkv, proj_out.
    """

    def __init__(self, channels: int, *, num_heads: int = 1, num_ch_per_head: int | None = None,
                 scale_by_sqrt2: bool = False):
        super().__init__(channels, num_heads, -1 if num_ch_per_head is None else num_ch_per_head,
                         norm_groups=_norm_groups(channels), norm_eps=1e-6)
        self.scale_by_sqrt2 = scale_by_sqrt2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * (1.0 / math.sqrt(2.0)) if self.scale_by_sqrt2 else out


class ResBlock(nn.Module):
    """``ResnetBlockBigGAN``: (B, in_ch, H, W) [, emb (B, E)] -> (B, out_ch, H', W').

    ``h = conv(act(GN(x)))`` (GN over in_ch channels with out_ch's group count), resampled between
    the activation and the conv when ``up`` (nearest x2) or ``down`` (2x2 average); then
    - no embedding:   ``h = conv0(drop(act(GN(h))))``
    - AdaGN:          ``(s, b) = Linear(act(emb))``; ``h = conv0(drop(act(GN(h) * (1 + s) + b)))``
    - bias injection: ``h = conv0(drop(act(GN(h + Linear(act(emb))))))``
    and the result is ``skip(x) + h`` (skip: identity or 1x1 conv), times 1/sqrt(2) if asked.
    conv0 is zero-initialised.
    """

    def __init__(self, in_ch: int, out_ch: int | None = None, *, act: str, emb_dim: int,
                 use_adaptive_group_norm: bool = False, dropout: float = 0.0, scale_by_sqrt2: bool = False,
                 down: bool = False, up: bool = False):
        super().__init__()
        out_ch = out_ch or in_ch
        self.adaptive = use_adaptive_group_norm
        self.scale_by_sqrt2 = scale_by_sqrt2
        self.resample = "up" if up else "down" if down else None
        groups = _norm_groups(out_ch)
        self.in_layers = nn.Sequential(normalization(in_ch, groups, 1e-6), get_act(act),
                                       conv_nd(2, in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(get_act(act), nn.Linear(emb_dim, 2 * out_ch if self.adaptive else out_ch))
        self.out_layers = nn.Sequential(normalization(out_ch, groups, 1e-6), get_act(act), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(2, out_ch, out_ch, 3, padding=1)))
        self.skip_connection = nn.Identity() if in_ch == out_ch else conv_nd(2, in_ch, out_ch, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        if self.resample:
            h = self.in_layers[-1](self._resample(self.in_layers[:-1](x)))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        if emb is None:
            h = self.out_layers(h)
        else:
            emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
            if self.adaptive:
                scale, shift = emb_out.chunk(2, dim=1)
                h = self.out_layers[1:](self.out_layers[0](h) * (1.0 + scale) + shift)
            else:
                h = self.out_layers(h + emb_out)
        out = self.skip_connection(x) + h
        return out * (1.0 / math.sqrt(2.0)) if self.scale_by_sqrt2 else out


class Stage(nn.Module):
    """One level: ``main`` (ResBlocks, each optionally followed by attention) [+ ``downsample``/``upsample``]."""

    def __init__(self, uses_attn: bool):
        super().__init__()
        self.uses_attn = uses_attn
        self.main = nn.ModuleList()


def _blocks(cfg, emb_dim: int, act: str, dropout: float):
    def res(in_ch, out_ch=None, **kw):
        return ResBlock(in_ch, out_ch, act=act, emb_dim=emb_dim, use_adaptive_group_norm=cfg.use_adaptive_group_norm,
                        dropout=dropout, scale_by_sqrt2=cfg.scale_by_sqrt2, **kw)

    def attn(channels):
        return Attention(channels, num_heads=cfg.num_heads, num_ch_per_head=cfg.num_ch_per_head,
                         scale_by_sqrt2=cfg.scale_by_sqrt2)

    return res, attn


# --------------------------------------------------------------------------------------------
# Representation encoder / decoder / autoencoder


class RepresentationEncoder(nn.Module):
    """z0 (B, in_channels, R, R) [, t (B,)] -> (B, z_channels (x2 if double_z), R/2^(L-1), same).

    conv_in -> per level: num_res_blocks x (ResBlock [+ Attn]) [+ down ResBlock] -> mid Res-Attn-Res
    -> GN -> act -> conv3x3. The time embedding (t-LRDM) is added as a bias in every ResBlock.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ch
        if cfg.time_conditional:
            self.time_conditioning = time_conditioning(ch, cfg.act)
        res, attn = _blocks(cfg, 4 * ch, cfg.act, cfg.dropout)
        self.conv_in = conv_nd(2, cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        current_res, in_ch = cfg.resolution, ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = Stage(current_res in cfg.attn_resolutions)
            out_ch = ch * mult
            for _ in range(cfg.num_res_blocks):
                stage.main.append(res(in_ch, out_ch))
                if stage.uses_attn:
                    stage.main.append(attn(out_ch))
                in_ch = out_ch
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = res(in_ch, down=True)
                current_res //= 2
            self.down.append(stage)
        self.mid = nn.ModuleList([res(in_ch), attn(in_ch), res(in_ch)])
        self.norm_out = normalization(in_ch, _norm_groups(in_ch), 1e-6)
        self.act = get_act(cfg.act)
        self.conv_out = conv_nd(2, in_ch, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        emb = None
        if self.cfg.time_conditional:
            if t is None:
                raise ValueError("this representation encoder is time-conditional (t-LRDM): pass t")
            emb = self.time_conditioning(t)
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.main:
                h = block(h) if isinstance(block, Attention) else block(h, emb)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h, emb)
        for block in self.mid:
            h = block(h) if isinstance(block, Attention) else block(h, emb)
        return self.conv_out(self.act(self.norm_out(h)))


class _DecoderMid(nn.Module):
    def __init__(self, res, attn, ch):
        super().__init__()
        self.block_1 = res(ch, ch)
        self.attn_1 = attn(ch)
        self.block_2 = res(ch, ch)


class RepresentationDecoder(nn.Module):
    """r' (B, z_channels, r, r) [, t (B,)] -> list of L feature maps, deep -> shallow.

    conv_in (to ch*ch_mult[-1]) -> mid Res-Attn-Res (never time-conditioned) -> per level from deep to
    shallow: (num_res_blocks + 1) x (ResBlock [+ Attn]); the map is collected, then upsampled by a
    ResBlock (all levels but the shallowest) -> GN -> act -> conv3x3, collected last. Level i's map
    has ``ch * ch_mult[L-1-i]`` channels at ``r * 2^i`` pixels.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ch
        if cfg.time_conditional:
            self.time_conditioning = time_conditioning(ch, cfg.act)
        res, attn = _blocks(cfg, 4 * ch, cfg.act, cfg.dropout)
        in_ch = ch * cfg.ch_mult[-1]
        current_res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = conv_nd(2, cfg.z_channels, in_ch, 3, padding=1)
        self.mid = _DecoderMid(res, attn, in_ch)
        self.up = nn.ModuleList()
        out_ch = ch
        for level in reversed(range(len(cfg.ch_mult))):
            stage = Stage(current_res in cfg.attn_resolutions)
            out_ch = ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.main.append(res(in_ch, out_ch))
                if stage.uses_attn:
                    stage.main.append(attn(out_ch))
                in_ch = out_ch
            if level != 0:
                stage.upsample = res(in_ch, up=True)
                current_res *= 2
            self.up.append(stage)
        self.out = nn.Sequential(normalization(out_ch, _norm_groups(out_ch), 1e-6), get_act(cfg.act),
                                 conv_nd(2, out_ch, out_ch, 3, padding=1))

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the returned maps, deep -> shallow."""
        return [self.cfg.ch * m for m in reversed(self.cfg.ch_mult)]

    def forward(self, z: torch.Tensor, t: torch.Tensor | None = None) -> list[torch.Tensor]:
        h = self.conv_in(z)
        # The official decoder runs its middle blocks before it computes the time embedding.
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, None)), None)
        emb = None
        if self.cfg.time_conditional:
            if t is None:
                raise ValueError("this representation decoder is time-conditional (t-LRDM): pass t")
            emb = self.time_conditioning(t)
        features = []
        for stage in self.up:
            for block in stage.main:
                h = block(h) if isinstance(block, Attention) else block(h, emb)
            if hasattr(stage, "upsample"):
                features.append(h)
                h = stage.upsample(h, emb)
        features.append(self.out(h))
        return features


class RepresentationAE(nn.Module):
    """The representation model q(r | z0 [, t]) and its feature decoder (official ``RepresentationAE``).

    ``encode(z0)`` -> (mean, logvar), each (B, embed_dim, r, r), logvar clamped to [-30, 10];
    ``decode(r)`` -> ``decoder(post_quant_conv(r))``, the UNet's conditioning features.
    """

    def __init__(self, cfg: RepresentationConfig):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = RepresentationEncoder(enc)
        self.decoder = RepresentationDecoder(cfg.decoder)
        self.quant_conv = conv_nd(2, 2 * enc.z_channels if enc.double_z else enc.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = conv_nd(2, cfg.embed_dim, enc.z_channels, 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.cfg.latent_shape

    def moments(self, z0: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """``quant_conv(encoder(z0))``: (B, 2*embed_dim, r, r), mean then (unclamped) logvar."""
        return self.quant_conv(self.encoder(z0, t))

    def encode(self, z0: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) of r; logvar clamped to [-30, 10] (``DiagonalGaussianDistribution``)."""
        mean, logvar = torch.chunk(self.moments(z0, t), 2, dim=1)
        return mean, torch.clamp(logvar, -30.0, 10.0)

    def decode(self, r: torch.Tensor, t: torch.Tensor | None = None) -> list[torch.Tensor]:
        return self.decoder(self.post_quant_conv(r), t)


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mean + exp(logvar / 2) * noise`` (the official ``sample()`` with the noise given)."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per item: ``0.5 * sum(mean^2 + var - 1 - logvar)`` over C,H,W."""
    return 0.5 * torch.sum(torch.pow(mean, 2) + torch.exp(logvar) - 1.0 - logvar, dim=list(range(1, mean.dim())))


# --------------------------------------------------------------------------------------------
# The representation-conditioned UNet


class ReprCondUNet(nn.Module):
    """``DiffusionUNetReprCond``: (z_t (B, C, R, R), t (B,), features deep -> shallow) -> x0 (B, C, R, R).

    Level l's first ResBlock takes ``cat([h, features[L-1-l]])`` (``ch*ch_mult[l] + repr_ch*repr_ch_mult[l]``
    input channels at level 0 after conv_in's ``ch``), and the first middle ResBlock takes
    ``cat([h, features[0]])``. Up path: (num_res_blocks + 1) ResBlocks per level on ``cat([h, skip])``.
    Output head GN -> act -> zero conv3x3.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.ch
        act = cfg.nonlinearity
        repr_ch = cfg.repr_ch or ch
        repr_mult = cfg.repr_ch_mult or cfg.ch_mult
        res, attn = _blocks(cfg, 4 * ch, act, cfg.dropout)
        self.time_conditioning = time_conditioning(ch, act)
        self.conv_in = conv_nd(2, cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        current_res, in_ch, out_ch = cfg.resolution, ch, ch
        repr_in = repr_ch
        skips = [in_ch]
        for level, mult in enumerate(cfg.ch_mult):
            stage = Stage(current_res in cfg.attn_resolutions)
            repr_in = repr_ch * repr_mult[level]
            out_ch = ch * mult
            for i in range(cfg.num_res_blocks):
                stage.main.append(res(in_ch + (repr_in if i == 0 else 0), out_ch))
                if stage.uses_attn:
                    stage.main.append(attn(out_ch))
                skips.append(out_ch)
                in_ch = out_ch
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = res(in_ch, down=True)
                current_res //= 2
                skips.append(in_ch)
            self.down.append(stage)

        self.mid = nn.ModuleList([res(in_ch + repr_in, out_ch), attn(in_ch), res(in_ch, out_ch)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(cfg.ch_mult))):
            stage = Stage(current_res in cfg.attn_resolutions)
            out_ch = ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.main.append(res(in_ch + skips.pop(), out_ch))
                if stage.uses_attn:
                    stage.main.append(attn(out_ch))
                in_ch = out_ch
            if level != 0:
                stage.upsample = res(in_ch, up=True)
                current_res *= 2
            self.up.append(stage)
        self.conv_out = nn.Sequential(normalization(in_ch, _norm_groups(in_ch), 1e-6), get_act(act),
                                      zero_module(conv_nd(2, in_ch, cfg.in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.down):
            raise ValueError(f"the UNet has {len(self.down)} levels but got {len(features)} feature maps")
        emb = self.time_conditioning(t)
        h = self.conv_in(x)
        hs = [h]
        for stage, r in zip(self.down, reversed(features)):
            first = True
            for block in stage.main:
                if isinstance(block, Attention):
                    h = block(h)  # the skip stack already holds the ResBlock's output (official order)
                else:
                    h = block(torch.cat([h, r], dim=1) if first else h, emb)
                    first = False
                    hs.append(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h, emb)
                hs.append(h)
        h = self.mid[0](torch.cat([h, features[0]], dim=1), emb)
        h = self.mid[2](self.mid[1](h), emb)
        for stage in self.up:
            for block in stage.main:
                h = block(h) if isinstance(block, Attention) else block(torch.cat([h, hs.pop()], dim=1), emb)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h, emb)
        return self.conv_out(h)
