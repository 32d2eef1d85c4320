"""MAR's masked encoder-decoder (ViT blocks, buffer tokens, learned position tables) and its diffusion head.

The attribute names are the authors' (`Harmon/src/models/mar/mar.py`, blocks as timm's `Block`), so the released
``mar.*`` keys load without renaming. Only what Harmon uses is here: its class embedding is kept as a parameter
because the checkpoints hold it, but nothing reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_harmon import HarmonConfig
from .diffusion_head import DiffLoss


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's names)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        dropout = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, length, dim)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(GradientCheckpointingLayer):
    """A pre-LN ViT block, as timm 0.9's `Block` without layer scale or drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _grid_table(table: torch.Tensor, side: int, height: int, width: int) -> torch.Tensor:
    """A ``(1, side * side, dim)`` position table resized bilinearly to ``height x width`` (no antialias)."""
    if (height, width) == (side, side):
        return table
    grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(height, width), mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(1, height * width, -1)


class MAR(nn.Module):
    """The MAE-style encoder (shared by understanding and generation) and decoder, plus ``diffloss``.

    Token masks are ``(batch, tokens)`` with 1 where a latent is masked (hidden from the encoder, predicted by
    the decoder). Every row must hide as many tokens as the others (the encoder drops them).
    """

    def __init__(self, config: HarmonConfig):
        super().__init__()
        self.config = config
        self.buffer_size = config.buffer_size
        self.seq_h = config.seq_h
        enc, dec = config.encoder_embed_dim, config.decoder_embed_dim
        positions = config.seq_len + config.buffer_size

        def blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:
            return nn.ModuleList(
                [
                    Block(dim, heads, config.mlp_ratio, config.layer_norm_eps, config.attn_dropout, config.proj_dropout)
                    for _ in range(depth)
                ]
            )

        self.class_emb = nn.Embedding(config.class_num, enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.z_proj = nn.Linear(config.token_embed_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, enc))
        self.encoder_blocks = blocks(enc, config.encoder_depth, config.encoder_num_heads)
        self.encoder_norm = nn.LayerNorm(enc, eps=config.layer_norm_eps)
        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, positions, dec))
        self.decoder_blocks = blocks(dec, config.decoder_depth, config.decoder_num_heads)
        self.decoder_norm = nn.LayerNorm(dec, eps=config.layer_norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, config.seq_len, dec))
        self.diffloss = DiffLoss(
            target_channels=config.token_embed_dim,
            z_channels=dec,
            depth=config.diffloss_d,
            width=config.diffloss_w,
            num_sampling_steps=config.num_sampling_steps,
            num_train_timesteps=config.num_train_timesteps,
        )

    def _pos_embed(self, table: torch.Tensor, height: int, width: int, buffer: bool = True) -> torch.Tensor:
        if not buffer:
            return _grid_table(table, self.seq_h, height, width)
        buffer_pe, image_pe = table.split([self.buffer_size, table.shape[1] - self.buffer_size], dim=1)
        return torch.cat([buffer_pe, _grid_table(image_pe, self.seq_h, height, width)], dim=1)

    def forward_mae_encoder(
        self, x: torch.Tensor, mask: torch.Tensor, buffer_embedding: torch.Tensor, image_shape: tuple[int, int]
    ) -> torch.Tensor:
        """Encode the visible tokens of ``x`` (``(batch, h * w, token_dim)``) after ``buffer_size`` buffer tokens
        filled with ``buffer_embedding`` (``(batch, width)``). Returns ``(batch, buffer + visible, width)``."""
        height, width = image_shape
        x = self.z_proj(x.to(self.z_proj.weight.dtype))
        batch, length, dim = x.shape
        if length != height * width:
            raise ValueError(f"MAR: {length} latent tokens do not make an image_shape of {height} x {width}")
        x = torch.cat([buffer_embedding.view(batch, -1, dim).expand(-1, self.buffer_size, -1).to(x.dtype), x], dim=1)
        keep = torch.cat([mask.new_zeros(batch, self.buffer_size), mask], dim=1) == 0
        visible = keep.sum(dim=1)
        if not torch.all(visible == visible[0]):
            raise ValueError(
                f"MAR: the masks leave {visible.tolist()} tokens visible (buffer included) per row; every row must "
                "mask the same number of tokens (one mask ratio per batch)."
            )
        x = self.z_proj_ln(x + self._pos_embed(self.encoder_pos_embed_learned, height, width))
        x = x[keep].reshape(batch, -1, dim)
        for block in self.encoder_blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor, image_shape: tuple[int, int]) -> torch.Tensor:
        """Decode encoder states ``x`` (buffer + visible tokens) into one condition per image token:
        mask tokens at the masked positions, then the decoder, then the diffusion position table.
        Returns ``(batch, h * w, decoder_width)``."""
        height, width = image_shape
        x = self.decoder_embed(x)
        batch = mask.shape[0]
        keep = torch.cat([mask.new_zeros(batch, self.buffer_size), mask], dim=1) == 0
        padded = self.mask_token.to(x.dtype).expand(batch, keep.shape[1], -1).clone()
        padded[keep] = x.reshape(-1, x.shape[-1])
        x = padded + self._pos_embed(self.decoder_pos_embed_learned, height, width)
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size :]
        return x + self._pos_embed(self.diffusion_pos_embed_learned, height, width, buffer=False)
