"""ViTDet's plain ViT backbone (Li et al., "Exploring Plain Vision Transformer
Backbones for Object Detection", ECCV 2022), written for mmcd.

A non-hierarchical ViT: 16x16 patch embedding, absolute position embedding
learnt at the pre-training grid and interpolated (bicubic) to the input's,
blocks with windowed self-attention and a few global-attention blocks,
decomposed relative position bias, stochastic depth, and one output map at
stride 16 (``SimpleFPN`` builds the pyramid).

Module names follow timm / MAE (``patch_embed.proj``, ``pos_embed``,
``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``,
``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``), so CD's
pair rules and PTQ's reparameterization rules find them, and an MAE
checkpoint loads by name (see :meth:`ViTDet.init_weights`).

The two attention products are :class:`~mmcd.core.quant.modules.MatMul`
modules, so post-training quantization reaches them without a rewrite.
"""
import argparse
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from torch import nn

from mmcd.core.quant.modules import MatMul
from mmcd.core.quant.residual import ResidualAdd


def _pad_to_windows(x: torch.Tensor, window: int):
    """[B, H, W, C] -> windows [B * nW, window, window, C], padded size."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp,
                                                                        wp)


def _merge_windows(windows: torch.Tensor, window: int, padded: Tuple[int,
                                                                      int],
                   size: Tuple[int, int]) -> torch.Tensor:
    hp, wp = padded
    b = windows.shape[0] // (hp // window * wp // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :size[0], :size[1]].contiguous()


def relative_positions(q_size: int, k_size: int,
                       table: torch.Tensor) -> torch.Tensor:
    """Embeddings ``[q_size, k_size, C]`` of the offsets between query and
    key positions along one axis, from a learnt table of ``2 * size - 1``
    offsets (linearly resized when the sizes differ)."""
    span = 2 * max(q_size, k_size) - 1
    if table.shape[0] != span:
        table = F.interpolate(table.T[None], size=span,
                              mode='linear')[0].T
    q = torch.arange(q_size, device=table.device)[:, None] * max(
        k_size / q_size, 1.0)
    k = torch.arange(k_size, device=table.device)[None, :] * max(
        q_size / k_size, 1.0)
    offsets = (q - k) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


class Attention(nn.Module):
    """Multi-head self-attention on a ``[B, H, W, C]`` map with decomposed
    relative position bias: ``logits += q . R_h[dy] + q . R_w[dx]``."""

    def __init__(self, dim: int, num_heads: int, input_size: Tuple[int, int],
                 qkv_bias: bool = True, use_rel_pos: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dims {dim} is not divisible by '
                             f'num_heads {num_heads}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads)**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.qk_matmul = MatMul('qk', num_heads)
        self.av_matmul = MatMul('av', num_heads)
        # QAT's query-key reparameterization (mmcd.core.quant.QKReparam)
        self.qk_reparam = None
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            head_dim = dim // num_heads
            self.rel_pos_h = nn.Parameter(
                torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(
                torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * self.num_heads,
                                                     h * w, -1)
        if self.qk_reparam is None:
            attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        else:
            attn = self.qk_reparam(x.reshape(b, h * w, c), self.qk_matmul,
                                   self.scale).flatten(0, 1)
        if self.use_rel_pos:
            r_h = relative_positions(h, h, self.rel_pos_h)
            r_w = relative_positions(w, w, self.rel_pos_w)
            q_map = q.reshape(b * self.num_heads, h, w, -1)
            bias_h = torch.einsum('nhwc,hkc->nhwk', q_map, r_h)
            bias_w = torch.einsum('nhwc,wkc->nhwk', q_map, r_w)
            attn = (attn.view(-1, h, w, h, w) + bias_h[..., :, None] +
                    bias_w[..., None, :]).view(-1, h * w, h * w)
        out = self.av_matmul(attn.softmax(dim=-1), v)
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(b, h, w, c))


class Mlp(nn.Module):

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), \
            nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch per sample."""
    if prob == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0], ) + (1, ) * (x.dim() - 1)).bernoulli_(
        1 - prob)
    return x * keep / (1 - prob)


class Block(nn.Module):
    """Pre-norm Transformer block; ``window_size`` 0 means global
    attention. Its residual additions are :class:`ResidualAdd` modules
    (quantized where a deployment profile asks for it)."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path_rate,
                 window_size, input_size, qkv_bias=True, use_rel_pos=True):
        super().__init__()
        self.window_size, self.drop_path_rate = window_size, drop_path_rate
        attn_size = (window_size, window_size) if window_size else input_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_size, qkv_bias,
                              use_rel_pos)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_residual, self.mlp_residual = ResidualAdd(), ResidualAdd()

    def forward(self, x):
        y = self.norm1(x)
        if self.window_size:
            size = y.shape[1:3]
            windows, padded = _pad_to_windows(y, self.window_size)
            y = _merge_windows(self.attn(windows), self.window_size, padded,
                               size)
        else:
            y = self.attn(y)
        x = self.attn_residual(
            x, drop_path(y, self.drop_path_rate, self.training))
        return self.mlp_residual(x, drop_path(
            self.mlp(self.norm2(x)), self.drop_path_rate, self.training))


@MODELS.register_module()
class ViTDet(BaseModule):
    """Plain ViT backbone of ViTDet (module docstring).

    Args:
        img_size: training input size (sets the global blocks' relative
            position tables; other sizes interpolate them).
        patch_size: 16.
        embed_dims, depth, num_heads, mlp_ratio: ViT-B is 768, 12, 12, 4.
        window_size: window of the windowed blocks.
        global_attn_indexes: blocks with global attention (ViT-B: 2, 5, 8,
            11).
        drop_path_rate: stochastic depth at the last block (linear ramp).
        pretrain_img_size: grid of the learnt absolute position embedding
            (224: MAE's 14 x 14), interpolated to the input.
        pretrain_use_cls_token: the position embedding has a class-token
            slot (MAE's), which is dropped.
        init_cfg: ``dict(type='Pretrained', checkpoint=...)`` loads an MAE
            checkpoint (see :meth:`init_weights`).
    """

    def __init__(self, img_size: int = 1024, patch_size: int = 16,
                 in_channels: int = 3, embed_dims: int = 768,
                 depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.1, window_size: int = 14,
                 global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
                 use_rel_pos: bool = True, pretrain_img_size: int = 224,
                 pretrain_use_cls_token: bool = True,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        if img_size % patch_size:
            raise ValueError(f'img_size {img_size} is not a multiple of '
                             f'patch_size {patch_size}')
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f'global_attn_indexes {bad} out of range for '
                             f'depth {depth} (0..{depth - 1})')
        if window_size < 1:
            raise ValueError(f'window_size must be >= 1, got {window_size}')
        self.patch_size, self.embed_dims = patch_size, embed_dims
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dims,
                                          patch_size, patch_size)
        grid = pretrain_img_size // patch_size
        self.pretrain_grid = grid
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.pos_embed = nn.Parameter(
            torch.zeros(1, grid * grid + int(pretrain_use_cls_token),
                        embed_dims))
        size = (img_size // patch_size, ) * 2
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dims, num_heads, mlp_ratio, rates[i],
                  0 if i in global_attn_indexes else window_size, size,
                  qkv_bias, use_rel_pos) for i in range(depth))
        self.global_attn_indexes = tuple(global_attn_indexes)

    def init_weights(self):
        if self.init_cfg and self.init_cfg.get('type') == 'Pretrained':
            self.load_mae(self.init_cfg['checkpoint'])
            return
        trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def load_mae(self, checkpoint: str) -> None:
        """Load an MAE (or timm ViT) checkpoint by name.

        Keys map one to one (``patch_embed.proj``, ``pos_embed``,
        ``blocks.*``); the weights may sit under ``model`` or ``state_dict``
        and carry a ``backbone.`` prefix. ``cls_token`` and the final
        ``norm`` / ``fc_norm`` / ``head`` are unused; relative position
        tables are not in MAE and keep their zero init. A ``pos_embed`` of
        another grid is resized. The file is read with ``weights_only``;
        the official MAE files also pickle their training ``args``, an
        ``argparse.Namespace`` (a plain attribute bag), which is allowed
        for this load only.
        """
        from mmengine.runner.checkpoint import CheckpointLoader
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = CheckpointLoader.load_checkpoint(checkpoint,
                                                     map_location='cpu')
        state = state.get('model', state.get('state_dict', state))
        state = {k[len('backbone.'):] if k.startswith('backbone.') else k: v
                 for k, v in state.items()}
        pos = state.get('pos_embed')
        if pos is not None and pos.shape != self.pos_embed.shape:
            state['pos_embed'] = self._resize_pos_embed_param(pos)
        own = self.state_dict()
        loaded = {k: v for k, v in state.items()
                  if k in own and own[k].shape == v.shape}
        self.load_state_dict(loaded, strict=False)
        from mmengine.logging import print_log
        missing = sorted(set(own) - set(loaded))
        print_log(f'ViTDet: loaded {len(loaded)} tensors from {checkpoint}; '
                  f'not in it: {len(missing)} (e.g. {missing[:3]})',
                  logger='current')

    def _resize_pos_embed_param(self, pos: torch.Tensor) -> torch.Tensor:
        cls = pos[:, :1] if pos.shape[1] % 2 else pos[:, :0]
        grid = pos[:, cls.shape[1]:]
        side = int(math.sqrt(grid.shape[1]))
        grid = F.interpolate(
            grid.reshape(1, side, side, -1).permute(0, 3, 1, 2),
            size=(self.pretrain_grid, ) * 2, mode='bicubic',
            align_corners=False).permute(0, 2, 3, 1).reshape(1, -1,
                                                            grid.shape[-1])
        if self.pretrain_use_cls_token:
            cls = cls if cls.shape[1] else pos.new_zeros(1, 1, pos.shape[-1])
            return torch.cat([cls, grid], dim=1)
        return grid

    def _abs_pos(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed[:, int(self.pretrain_use_cls_token):]
        grid = pos.reshape(1, self.pretrain_grid, self.pretrain_grid, -1)
        if (h, w) != (self.pretrain_grid, ) * 2:
            grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w),
                                 mode='bicubic',
                                 align_corners=False).permute(0, 2, 3, 1)
        return grid

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor]:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f'input size {tuple(x.shape[-2:])} is not a multiple of '
                f'patch_size {self.patch_size}; pad it (e.g. '
                f'data_preprocessor pad_size_divisor={self.patch_size})')
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)
        x = x + self._abs_pos(x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        return (x.permute(0, 3, 1, 2).contiguous(), )
