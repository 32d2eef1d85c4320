"""MAGVIT-v2, Show-o's image tokenizer: a taming-style encoder and decoder with per-level block counts and a
lookup-free quantizer (LFQ).

Module and parameter names are the authors' (`Show-o/models/modeling_magvitv2.py`, Hub ``showlab/magvitv2``:
``encoder.*``, ``decoder.*``, ``quantize.embedding``, ``quantize.power_vals``), so their checkpoint loads with an
identity key map. diffusers' `VQModel` takes one block count for every level, which this tokenizer does not have.

The quantizer keeps the sign of each of the ``z_channels`` latent channels: the code of a latent position is
``sum_c 2**(bits-1-c) * [z_c > 0]`` (channel 0 is the most significant bit, ``z = 0`` gives 0), and a code decodes
to ``+-1`` per bit, most significant first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init

from .configuration_showo import MagvitV2Config

_GROUPS = 32  # every GroupNorm of the authors' blocks


def _swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` written out as the authors' (``F.silu`` rounds differently, by up to 1e-6 after a decoder)."""
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 ``nin_shortcut`` where the width changes (no time embedding)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)
        k = self.k(h).reshape(b, c, -1)
        v = self.v(h).reshape(b, c, -1)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        h = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: its res blocks, their attention blocks (only at ``attn_resolutions``) and the
    resampler to the next level (``downsample`` / ``upsample``; absent on the last)."""

    def __init__(self, blocks: list[ResnetBlock], attentions: list[AttnBlock]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attentions)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class MagvitEncoder(nn.Module):
    """Pixels ``(B, 3, H, W)`` in [-1, 1] -> latents ``(B, z_channels, H / 2**(levels-1), ...)`` after
    ``quant_conv``."""

    def __init__(self, config: MagvitV2Config):
        super().__init__()
        ch, mults, counts = config.ch, config.encoder_ch_mult, config.encoder_num_res_blocks
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        resolution = config.resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level, (mult, count) in enumerate(zip(mults, counts)):
            block_out = ch * mult
            blocks, attentions = [], []
            for _ in range(count):
                blocks.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    attentions.append(AttnBlock(block_in))
            down = _Level(blocks, attentions)
            if level != len(mults) - 1:
                down.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(down)
        self.mid = _Mid(block_in, config.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(_swish(self.norm_out(h))))


class MagvitDecoder(nn.Module):
    """Quantized latents ``(B, z_channels, h, w)`` -> pixels ``(B, 3, h * 2**(levels-1), ...)``, unclamped."""

    def __init__(self, config: MagvitV2Config):
        super().__init__()
        ch, mults, counts = config.ch, config.decoder_ch_mult, config.decoder_num_res_blocks
        block_in = ch * mults[-1]
        resolution = config.resolution // 2 ** (len(mults) - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, config.dropout)
        levels = []
        for level in reversed(range(len(mults))):
            block_out = ch * mults[level]
            blocks, attentions = [], []
            for _ in range(counts[level]):
                blocks.append(ResnetBlock(block_in, block_out, config.dropout))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    attentions.append(AttnBlock(block_in))
            up = _Level(blocks, attentions)
            if level != 0:
                up.upsample = Upsample(block_in)
                resolution *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)  # up[0] is the finest level, run last
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for up in reversed(self.up):
            h = up(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class LookupFreeQuantizer(nn.Module):
    """Sign quantization of each latent channel; codes are the signs read as a binary number, channel 0 first.

    ``embedding`` (every code's +-1 vector) and ``power_vals`` are buffers saved in the authors' checkpoint.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        powers = 2 ** torch.arange(bits - 1, -1, -1)
        codes = torch.arange(2**bits)
        self.register_buffer("embedding", ((codes[:, None] >> torch.arange(bits - 1, -1, -1)) & 1).float() * 2 - 1)
        self.register_buffer("power_vals", powers)

    def codes(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, bits, h, w)`` latents -> ``(B, h * w)`` codes, row-major."""
        bits = (latents > 0).float()
        codes = (self.power_vals.view(1, -1, 1, 1) * bits).sum(1).long()
        return codes.reshape(latents.shape[0], -1)

    def latents(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, N)`` codes -> ``(B, bits, h, w)`` +-1 latents; ``shape`` defaults to a square grid."""
        if shape is None:
            side = math.isqrt(codes.shape[-1])
            shape = (side, side)
        z = self.embedding[codes.reshape(-1)].view(codes.shape[0], *shape, self.bits)
        return z.permute(0, 3, 1, 2).contiguous()


class MagvitV2(PreTrainedModel):
    """Show-o's image tokenizer: ``encode`` pixels in [-1, 1] to codes, ``decode`` codes to pixels.

    Frozen in Show-o's training; a `PreTrainedModel` so it saves and loads on its own and inside `ShowoModel`.
    """

    config: MagvitV2Config
    config_class = MagvitV2Config
    base_model_prefix = ""
    main_input_name = "pixel_values"

    def __init__(self, config: MagvitV2Config):
        super().__init__(config)
        self.encoder = MagvitEncoder(config)
        self.decoder = MagvitDecoder(config)
        self.quantize = LookupFreeQuantizer(config.z_channels)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default initialisation (the authors', who train it elsewhere); the LFQ tables recomputed."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            fan_in = module.weight[0].numel()
            init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LookupFreeQuantizer):
            fresh = LookupFreeQuantizer(module.bits)
            init.copy_(module.embedding, fresh.embedding)
            init.copy_(module.power_vals, fresh.power_vals)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, (H / stride) * (W / stride))`` of ``pixel_values`` in [-1, 1] (the authors' ``get_code``)."""
        return self.quantize.codes(self.encoder(pixel_values.to(self.dtype)))

    def decode(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Pixels of ``codes`` (the authors' ``decode_code``; unclamped, roughly [-1, 1]); ``shape`` is the code
        grid, square by default."""
        return self.decoder(self.quantize.latents(codes, shape).to(self.dtype))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The codes of ``pixel_values`` (as `encode`)."""
        return self.encode(pixel_values)


AutoModel.register(MagvitV2Config, MagvitV2, exist_ok=True)  # `AutoModel.from_pretrained` of a MAGVIT-v2 folder
