"""DiffuseVAE networks (Pandey et al., TMLR 2022), laid out like the official ``kpandey008/DiffuseVAE``
code so that its checkpoints load by swapping a prefix.

Shapes, with z_dim = channels[1] of the encoder's channel string and E = 4 * model_channels:

- ``VAE``: image in [0, 1] (B,3,H,W) -> (mu, logvar), each (B, z_dim, 1, 1); ``decode`` z
  (B, z_dim, 1, 1) -> blurry reconstruction in [0, 1] (sigmoid output).
- ``ConditionalUNet``: (x_t (B,3,H,W), t (B,), x̂ (B,3,h,w) [, z (B, z_dim)]) -> eps (B,3,H,W); x̂ is
  nearest-resized to (H, W) and concatenated after x_t, the optional z projection is added to the
  time embedding.

The VAE is built from VDVAE-style strings. Block string, comma separated tokens (R = resolution):

- ``RxN``: N residual blocks at R; ``R``: one residual block at R;
- ``RdK``: one residual block at R, then ``avg_pool2d(K)``;
- ``RuK``: ``nn.Upsample(scale_factor=K, mode="nearest")`` (no parameters, still an index);
- ``RtS``: a 1x1 conv without bias from channels[R] to channels[S].

The channel string ``R:C,...`` maps each resolution to its width. As in the official parser, a
``d`` token in the decoder upsamples and a ``u`` token in the encoder pools: the letter only
separates the numbers, the side decides what the block does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from semdiff.nn import AttentionBlock, conv_nd, normalization, timestep_embedding, zero_module

# --------------------------------------------------------------------------------------------
# Architecture strings


class ArchitectureStringError(ValueError):
    """A VAE block or channel string that is malformed or whose blocks do not fit together."""


@dataclass(frozen=True)
class BlockToken:
    """One parsed token of a block string: ``kind`` is "res", "resample" or "transition"."""

    kind: str
    res: int
    count: int = 1  # residual blocks ("res")
    rate: int | None = None  # pooling / upsampling factor ("resample")
    target: int | None = None  # the resolution whose width a "transition" maps to
    text: str = ""
    position: int = 0


_RES = re.compile(r"^(\d+)(?:x(\d+))?$")
_RESAMPLE = re.compile(r"^(\d+)([ud])(\d+)$")
_TRANSITION = re.compile(r"^(\d+)t(\d+)$")


def _token_error(kind: str, s: str, position: int, token: str, why: str) -> ArchitectureStringError:
    return ArchitectureStringError(f"{kind} string {s!r}: token {position + 1} {token!r} {why}")


def parse_block_string(s: str, kind: str = "block") -> list[BlockToken]:
    """Parse a VDVAE block string into tokens; a malformed token raises an error naming it."""
    if not isinstance(s, str) or not s.strip():
        raise ArchitectureStringError(f"{kind} string must be a non-empty string, got {s!r}")
    tokens = []
    for i, raw in enumerate(s.split(",")):
        tok = raw.strip()
        if m := _RES.match(tok):
            count = int(m.group(2)) if m.group(2) is not None else 1
            tokens.append(BlockToken("res", int(m.group(1)), count=count, text=tok, position=i))
        elif m := _RESAMPLE.match(tok):
            rate = int(m.group(3))
            if rate < 1:
                raise _token_error(kind, s, i, tok, "has a resampling factor below 1")
            tokens.append(BlockToken("resample", int(m.group(1)), rate=rate, text=tok, position=i))
        elif m := _TRANSITION.match(tok):
            tokens.append(BlockToken("transition", int(m.group(1)), target=int(m.group(2)), text=tok, position=i))
        else:
            raise _token_error(kind, s, i, tok,
                               "is not one of RxN (N residual blocks), R (one block), RdK (block + pool), "
                               "RuK (upsample) or RtS (1x1 channel transition)")
        if tokens[-1].res < 1:
            raise _token_error(kind, s, i, tok, "has a resolution below 1")
    return tokens


def parse_channel_string(s: str, kind: str = "channel") -> dict[int, int]:
    """Parse ``"R:C,..."`` into {resolution: channels}; a malformed or repeated entry raises."""
    if not isinstance(s, str) or not s.strip():
        raise ArchitectureStringError(f"{kind} string must be a non-empty string, got {s!r}")
    channels: dict[int, int] = {}
    for i, raw in enumerate(s.split(",")):
        tok = raw.strip()
        m = re.match(r"^(\d+):(\d+)$", tok)
        if not m:
            raise _token_error(kind, s, i, tok, "is not of the form RESOLUTION:CHANNELS")
        res, ch = int(m.group(1)), int(m.group(2))
        if res in channels:
            raise _token_error(kind, s, i, tok, f"repeats resolution {res}")
        if ch < 2:
            raise _token_error(kind, s, i, tok, "needs at least 2 channels (the blocks' bottleneck is C/2)")
        channels[res] = ch
    return channels


@dataclass
class VAEConfig:
    """The official ``VAE`` hyper-parameters (the four strings and the input resolution)."""

    input_res: int
    enc_block_str: str
    enc_channel_str: str
    dec_block_str: str
    dec_channel_str: str

    def __post_init__(self):
        self.input_res = int(self.input_res)
        self.encoder_plan()  # validates both strings now, with errors that name the bad token
        self.decoder_plan()

    @property
    def z_dim(self) -> int:
        return parse_channel_string(self.enc_channel_str, "encoder channel")[1]

    def to_dict(self) -> dict:
        return asdict(self)

    # The plans walk the strings, tracking (resolution, width) to check that every block fits.
    def encoder_plan(self) -> list[tuple]:
        """[("res", C, use_3x3, pool) | ("transition", C_in, C_out)] of the encoder's ``block_mod``."""
        return _plan(self.enc_block_str, self.enc_channel_str, side="encoder", start_res=self.input_res,
                     start_ch=64, end_res=1)

    def decoder_plan(self) -> list[tuple]:
        """[("res", C, use_3x3, None) | ("upsample", K) | ("transition", C_in, C_out)] of ``block_mod``."""
        enc_ch = parse_channel_string(self.enc_channel_str, "encoder channel")
        return _plan(self.dec_block_str, self.dec_channel_str, side="decoder", start_res=1,
                     start_ch=enc_ch.get(1, 0), end_res=self.input_res)


def _plan(block_str: str, channel_str: str, *, side: str, start_res: int, start_ch: int, end_res: int) -> list[tuple]:
    kind = f"{side} block"
    tokens = parse_block_string(block_str, kind)
    channels = parse_channel_string(channel_str, f"{side} channel")
    if side == "encoder":
        if 1 not in channels:
            raise ArchitectureStringError(
                f"encoder channel string {channel_str!r} has no entry for resolution 1: the latent z (mu, logvar) "
                "takes its width from channels[1]")
    elif start_ch == 0:
        raise ArchitectureStringError("the encoder channel string has no entry for resolution 1 (the latent width)")

    def width(tok: BlockToken, res: int) -> int:
        if res not in channels:
            raise _token_error(kind, block_str, tok.position, tok.text,
                               f"uses resolution {res}, which the {side} channel string {channel_str!r} does not list")
        return channels[res]

    plan: list[tuple] = []
    res, ch = start_res, start_ch
    for tok in tokens:
        if tok.kind == "transition":
            c_in, c_out = width(tok, tok.res), width(tok, tok.target)
            if c_in != ch:
                raise _token_error(kind, block_str, tok.position, tok.text,
                                   f"maps from {c_in} channels but the previous layer gives {ch}")
            if tok.target != res:
                raise _token_error(kind, block_str, tok.position, tok.text,
                                   f"maps to the width of resolution {tok.target} but the feature map is {res}x{res}")
            plan.append(("transition", c_in, c_out))
            ch = c_out
            continue
        if tok.res != res:
            raise _token_error(kind, block_str, tok.position, tok.text,
                               f"is at resolution {tok.res} but the feature map is {res}x{res} there")
        if tok.kind == "resample" and side == "decoder":
            plan.append(("upsample", tok.rate))
            res *= tok.rate
            continue
        c = width(tok, res)
        if c != ch:
            raise _token_error(kind, block_str, tok.position, tok.text,
                               f"needs {c} channels (channels[{res}]) but the previous layer gives {ch}"
                               + (" (the encoder's stem conv is fixed at 64)" if side == "encoder" and not plan else ""))
        if tok.kind == "res":
            plan.extend(("res", c, res > 1, None) for _ in range(tok.count))
        else:  # a pooled residual block (encoder)
            if res % tok.rate:
                raise _token_error(kind, block_str, tok.position, tok.text,
                                   f"pools {res}x{res} by {tok.rate}, which does not divide it")
            plan.append(("res", c, res > 1, tok.rate))
            res //= tok.rate
    if res != end_res:
        what = "the latent must be 1x1" if side == "encoder" else f"the image is {end_res}x{end_res}"
        raise ArchitectureStringError(f"{kind} string {block_str!r} ends at resolution {res}, but {what}")
    final = channels.get(end_res)
    if final is None or final != ch:
        raise ArchitectureStringError(
            f"{kind} string {block_str!r} ends with {ch} channels but channels[{end_res}] of {channel_str!r} is {final}")
    return plan


# --------------------------------------------------------------------------------------------
# VAE


class VAEResBlock(nn.Module):
    """``x + c4(g(c3(g(c2(g(c1(g(x))))))))`` with g = exact GELU, then optional ``avg_pool2d(pool)``.

    (B, C, R, R) -> (B, C, R/pool, R/pool). Bottleneck width ``int(0.5 * C)``; c2/c3 are 3x3 except at
    resolution 1, where they are 1x1 (the official ``use_3x3 = res > 1``).
    """

    def __init__(self, channels: int, use_3x3: bool = True, pool: int | None = None):
        super().__init__()
        mid = int(0.5 * channels)
        k, p = (3, 1) if use_3x3 else (1, 0)
        self.pool = pool
        self.c1 = nn.Conv2d(channels, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, k, padding=p)
        self.c3 = nn.Conv2d(mid, mid, k, padding=p)
        self.c4 = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        out = x + h
        if self.pool is not None:
            out = F.avg_pool2d(out, kernel_size=self.pool, stride=self.pool)
        return out


def _blocks(plan: list[tuple]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for step in plan:
        if step[0] == "res":
            layers.append(VAEResBlock(step[1], use_3x3=step[2], pool=step[3]))
        elif step[0] == "upsample":
            layers.append(nn.Upsample(scale_factor=step[1], mode="nearest"))
        else:
            layers.append(nn.Conv2d(step[1], step[2], 1, bias=False))
    return nn.Sequential(*layers)


class VAEEncoder(nn.Module):
    """Image in [0, 1] (B,3,H,W) -> (mu, logvar), each (B, z_dim, 1, 1); keys ``in_conv``, ``block_mod``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.in_conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)  # 64 is hard-coded officially
        self.block_mod = _blocks(cfg.encoder_plan())
        z = cfg.z_dim
        self.mu = nn.Conv2d(z, z, 1, bias=False)
        self.logvar = nn.Conv2d(z, z, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.block_mod(self.in_conv(x))
        return self.mu(h), self.logvar(h)


class VAEDecoder(nn.Module):
    """z (B, z_dim, 1, 1) -> sigmoid(last_conv(blocks(z))) in [0, 1], (B, 3, input_res, input_res)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.block_mod = _blocks(cfg.decoder_plan())
        width = parse_channel_string(cfg.dec_channel_str)[cfg.input_res]
        self.last_conv = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.last_conv(self.block_mod(z)))


class VAE(nn.Module):
    """The first stage: ``enc``/``dec`` as in the official ``VAE`` LightningModule (which adds no weights)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.enc = VAEEncoder(cfg)
        self.dec = VAEDecoder(cfg)

    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enc(x01)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.dec(z)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``mu + eps * exp(0.5 * logvar)`` (the official order of operations)."""
        return mu + eps * torch.exp(0.5 * logvar)


# --------------------------------------------------------------------------------------------
# Conditional UNet


@dataclass
class UNetConfig:
    """The official ``SuperResModel`` arguments that change the weights or the arithmetic.

    ``attention_ds`` lists the downsampling factors (1, 2, 4, ...) with attention in the input and
    output blocks — the official ``attention_resolutions`` — not pixel resolutions.
    """

    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_ds: Sequence[int] = (16,)
    num_heads: int = 1
    in_channels: int = 3  # image channels; the network sees 2x (x_t and x̂)
    out_channels: int = 3
    use_z: bool = False
    z_dim: int | None = None
    use_scale_shift_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_ds = tuple(int(d) for d in self.attention_ds)
        if self.use_z and not self.z_dim:
            raise ValueError("a z-conditioned UNet needs z_dim")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {self.num_heads}")
        for ch in self.attention_channels():
            if ch % self.num_heads:
                raise ValueError(f"{self.num_heads} attention heads do not divide the {ch} channels of an attention layer")

    def attention_channels(self) -> list[int]:
        mc, chs, ds = self.model_channels, [], 1
        for level, m in enumerate(self.channel_mult):
            if ds in self.attention_ds:
                chs.append(m * mc)
            ds *= 2
        chs.append(self.channel_mult[-1] * mc)  # the middle block
        return chs

    @property
    def embed_channels(self) -> int:
        return 4 * self.model_channels

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class ResBlock(nn.Module):
    """guided-diffusion ResBlock: (B, C, H, W), emb (B, E) -> (B, C_out, H, W).

    ``h = conv(SiLU(GN(x)))``; then ``h + emb_out`` -> GN -> SiLU -> dropout -> conv, or with
    scale-shift norm ``GN(h) * (1 + scale) + shift`` -> SiLU -> dropout -> conv, where
    ``emb_out = Linear(SiLU(emb))`` ((scale, shift) halves). Skip: identity or 1x1 conv. Diff-AE's
    block differs (resampling inside, z scaling after the norm), hence this one.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None, *,
                 use_scale_shift_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), conv_nd(2, channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(2, out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else conv_nd(2, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """3x3 conv with stride 2: (B, C, H, W) -> (B, C, H/2, W/2); key ``op``."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = conv_nd(2, channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W); key ``conv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv_nd(2, channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.ModuleList):
    """One entry of ``input_blocks``/``output_blocks`` (``TimestepEmbedSequential``): layers in order."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h


class ConditionalUNet(nn.Module):
    """The official ``SuperResModel`` (6 input channels: x_t then the nearest-resized x̂): predicts eps."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, E = cfg.model_channels, cfg.embed_channels
        block = dict(use_scale_shift_norm=cfg.use_scale_shift_norm, dropout=cfg.dropout)
        self.time_embed = nn.Sequential(nn.Linear(mc, E), nn.SiLU(), nn.Linear(E, E))
        self.proj = nn.Sequential(nn.Linear(cfg.z_dim, E), nn.SiLU(), nn.Linear(E, E)) if cfg.use_z else None

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, cfg.num_heads)

        ch = cfg.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList([Block([conv_nd(2, 2 * cfg.in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        ds = 1
        for level, m in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, E, m * mc, **block)]
                ch = m * mc
                if ds in cfg.attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(Block(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = Block([ResBlock(ch, E, **block), attention(ch), ResBlock(ch, E, **block)])
        # Decoder: num_res_blocks + 1 blocks per level, each concatenating one skip.
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), E, m * mc, **block)]
                ch = m * mc
                if ds in cfg.attention_ds:
                    layers.append(attention(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(conv_nd(2, ch, cfg.out_channels, 3, padding=1)))

    def z_embedding(self, z: torch.Tensor) -> torch.Tensor:
        """``proj(z)``: (B, z_dim) -> (B, E), added to the time embedding (constant along a chain)."""
        if self.proj is None:
            raise ValueError("this UNet is not z-conditioned")
        return self.proj(z.flatten(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, z: torch.Tensor | None = None, *,
                z_emb: torch.Tensor | None = None) -> torch.Tensor:
        """eps for x_t (B,3,H,W) at original timesteps t (B,), given x̂ ``cond`` and (if use_z) z or
        its precomputed ``z_embedding``."""
        if cond.shape[-2:] != x.shape[-2:]:
            cond = F.interpolate(cond, x.shape[-2:], mode="nearest")
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        if self.proj is not None:
            if z_emb is None:
                if z is None:
                    raise ValueError("this UNet is z-conditioned: pass z (or z_emb)")
                z_emb = self.z_embedding(z)
            emb = emb + z_emb
        h = torch.cat([x, cond], dim=1)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
