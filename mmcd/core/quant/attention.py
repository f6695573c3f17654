"""Quantization-aware attention.

MMDetection's Swin ``WindowMSA`` computes ``q @ k^T`` and ``attn @ v``
inline, where no module boundary lets a quantizer in. :class:`QuantWindowMSA`
takes over such a module (sharing its parameters and buffers, so names and
checkpoint keys are unchanged) and computes the same function with the two
products as :class:`~mmcd.core.quant.modules.QuantMatMul`: with quantization
off the output is the float module's (tested). It reads the attribute
layout (``qkv``, ``proj``, ``relative_position_bias_table``,
``relative_position_index``, ``window_size``, ``num_heads``, ``scale``), so
nothing here imports mmdet; ``mmcd.models`` registers it for mmdet's
``WindowMSA`` class in :data:`~mmcd.core.quant.modules.QUANTIZED_MODULES`.
Pure PyTorch.
"""
import torch
from torch import nn

from .modules import QuantizedModule, QuantMatMul

WINDOW_MSA_ATTRS = ('qkv', 'proj', 'relative_position_bias_table',
                    'relative_position_index', 'window_size', 'num_heads',
                    'scale')


class QuantWindowMSA(QuantizedModule, nn.Module):
    """Window attention with relative position bias (Swin), quantizable.

    ``attn = softmax(q k^T * scale + bias + mask)``, ``out = proj(attn v)``;
    ``q k^T`` has both operands quantized uniformly, ``attn v`` quantizes
    ``attn`` with the method's post-softmax quantizer.
    """

    def __init__(self, window_msa: nn.Module, a_bits: int, method):
        super().__init__()
        missing = [a for a in WINDOW_MSA_ATTRS if not hasattr(window_msa, a)]
        if missing:
            raise ValueError(f'{type(window_msa).__name__} lacks {missing}; '
                             'not a Swin WindowMSA')
        self.qkv, self.proj = window_msa.qkv, window_msa.proj
        self.relative_position_bias_table = \
            window_msa.relative_position_bias_table
        self.register_buffer('relative_position_index',
                             window_msa.relative_position_index)
        self.window_size = tuple(window_msa.window_size)
        self.num_heads, self.scale = window_msa.num_heads, window_msa.scale
        self.embed_dims = getattr(window_msa, 'embed_dims', None)
        self.attn_drop = getattr(window_msa, 'attn_drop', nn.Identity())
        self.proj_drop = getattr(window_msa, 'proj_drop', nn.Identity())
        self.qk_matmul = QuantMatMul.for_role('qk', a_bits, method,
                                              self.num_heads)
        self.av_matmul = QuantMatMul.for_role('av', a_bits, method,
                                              self.num_heads)
        self.qk_reparam = None  # QAT's QKReparam (qk_reparam.py) if set

    @classmethod
    def from_float(cls, window_msa: nn.Module, w_bits: int, a_bits: int,
                   method) -> 'QuantWindowMSA':
        """The twin factory of :data:`QUANTIZED_MODULES` (its Linears are
        converted as children afterwards)."""
        return cls(window_msa, a_bits, method)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads,
                                  channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if self.qk_reparam is None:
            attn = self.qk_matmul(q * self.scale, k.transpose(-2, -1))
        else:
            attn = self.qk_reparam(x, self.qk_matmul, self.scale)
        area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[
            self.relative_position_index.view(-1)].view(area, area, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(batch // windows, windows, self.num_heads,
                             tokens, tokens) + mask[None, :, None]
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = self.av_matmul(attn, v).transpose(1, 2).reshape(
            batch, tokens, channels)
        return self.proj_drop(self.proj(out))
