"""The quantized twin of PyTorch's ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` (which DETR-style detectors use through mmcv's
``MultiheadAttention``: DINO's and Deformable DETR's decoder self-attention,
Mask2Former's masked cross-attention and self-attention) projects with a
fused ``in_proj_weight`` and computes both products inside
``F.multi_head_attention_forward``, where no module boundary lets a quantizer
in. :class:`QuantMultiheadAttention` computes the same function (the
``need_weights`` path of ``F.multi_head_attention_forward``, PyTorch 2.x)
from modules a quantizer can take over:

    q = q_proj(query), k = k_proj(key), v = v_proj(value)     (per head h)
    attn_h = softmax((q_h / sqrt(d)) k_h^T + mask)
    out = out_proj(concat_h(attn_h v_h))

The twin keeps ``nn.MultiheadAttention``'s parameters under their names
(``in_proj_weight`` / ``in_proj_bias``, or ``q/k/v_proj_weight`` when
``kdim`` / ``vdim`` differ from ``embed_dim``; ``out_proj``), so state-dict
keys do not change (a float checkpoint loads into a QAT model) and CD's pair
rules, which address ``in_proj_weight``, still match. ``q_proj`` /
``k_proj`` / ``v_proj`` are :class:`FusedRowsLinear`: Linears whose weight
and bias are read, at every access, as rows of those parameters (no
parameter of their own, no copy); conversion quantizes them
(:class:`QuantFusedRowsLinear`) and ``out_proj`` as Linears (weights per
output channel, inputs per tensor),
``q k^T`` with both operands quantized uniformly and ``attn v`` with the
method's post-softmax quantizer (:class:`~mmcd.core.quant.modules.
QuantMatMul`). With quantization off the output equals the float module's
to float rounding (tested with boolean and additive masks, key padding and
``batch_first`` both ways). ``add_bias_kv`` and ``add_zero_attn`` are
refused with what to do. Pure PyTorch.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .modules import (QUANTIZED_MODULES, QuantizedModule, QuantLinear,
                      QuantMatMul)


class FusedRowsLinear(nn.Linear):
    """A Linear whose ``weight`` is rows ``rows`` of its owner's parameter
    ``weight_name`` and whose ``bias`` is rows ``bias_rows`` of
    ``bias_name`` (None: no bias), read at every access: it owns no
    parameter, gradients and optimizer updates reach the owner's, and the
    owner (not a submodule: held by reference) keeps the parameter names.
    :meth:`weight_source` names the leaf parameter and rows (what a hook on
    the weight's gradient must be registered on)."""

    def __init__(self, owner: nn.Module, weight_name: str, rows: slice,
                 bias_name: Optional[str], bias_rows: slice):
        nn.Module.__init__(self)
        self.__dict__['_owner'] = owner  # a reference, not a submodule
        self.weight_name, self.rows = weight_name, rows
        self.bias_name, self.bias_rows = bias_name, bias_rows
        self.out_features, self.in_features = self.weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self._owner, self.weight_name)[self.rows]

    @property
    def bias(self) -> Optional[torch.Tensor]:
        if self.bias_name is None:
            return None
        return getattr(self._owner, self.bias_name)[self.bias_rows]

    def weight_source(self) -> Tuple[nn.Parameter, slice]:
        """The owner's parameter holding the weight, and its rows."""
        return getattr(self._owner, self.weight_name), self.rows


class QuantFusedRowsLinear(QuantLinear, FusedRowsLinear):
    """The quantized twin of :class:`FusedRowsLinear`: a
    :class:`~mmcd.core.quant.modules.QuantLinear` on the owner's rows."""


QUANTIZED_MODULES.register(QuantFusedRowsLinear.from_float,
                           name=FusedRowsLinear)


def _additive(mask: Optional[torch.Tensor],
              dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A boolean mask (True: not attended) as 0 / -inf; a float one as
    is."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype,
                       device=mask.device).masked_fill(mask, -math.inf)


class QuantMultiheadAttention(QuantizedModule, nn.Module):
    """``nn.MultiheadAttention`` with its projections as Linears and its
    products as :class:`QuantMatMul` (module docstring)."""

    def __init__(self, mha: nn.MultiheadAttention, a_bits: int, method):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            option = 'add_bias_kv' if mha.bias_k is not None \
                else 'add_zero_attn'
            raise ValueError(
                f'nn.MultiheadAttention with {option}=True is not supported '
                'by the quantized twin (its learned key/value rows would '
                'bypass the projections\' quantizers): build the model '
                f'without {option}, or leave this module in float with '
                "skip=[r'NAME'] in the quantization config")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        e = mha.embed_dim
        # nn.MultiheadAttention's parameters, under their names
        fused = mha._qkv_same_embed_dim
        names = ('in_proj_weight', ) if fused else (
            'q_proj_weight', 'k_proj_weight', 'v_proj_weight')
        for name in names + ('in_proj_bias', ):
            self.register_parameter(name, getattr(mha, name))
        bias_name = None if mha.in_proj_bias is None else 'in_proj_bias'
        for i, role in enumerate(('q', 'k', 'v')):
            rows = slice(i * e, (i + 1) * e)
            setattr(self, f'{role}_proj', FusedRowsLinear(
                self, 'in_proj_weight' if fused else f'{role}_proj_weight',
                rows if fused else slice(None), bias_name, rows))
        self.out_proj = mha.out_proj
        self.qk_matmul = QuantMatMul.for_role('qk', a_bits, method,
                                              mha.num_heads)
        self.av_matmul = QuantMatMul.for_role('av', a_bits, method,
                                              mha.num_heads)
        self.train(mha.training)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, w_bits: int, a_bits: int,
                   method) -> 'QuantMultiheadAttention':
        """The twin factory of :data:`QUANTIZED_MODULES` (its Linears are
        converted as children afterwards)."""
        return cls(mha, a_bits, method)

    def forward(self, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None,
                average_attn_weights: bool = True,
                is_causal: bool = False
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As ``nn.MultiheadAttention.forward``: ``(output, weights)``,
        ``weights`` averaged over heads unless ``average_attn_weights`` is
        False, None unless ``need_weights``. ``is_causal`` is a hint about
        ``attn_mask`` there; a causal mask must be given here too."""
        if is_causal and attn_mask is None:
            raise ValueError('is_causal=True needs the causal attn_mask')
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1)
                                 for x in (query, key, value))
        length, batch, _ = query.shape
        source = key.shape[0]
        heads, dim = self.num_heads, self.head_dim

        def split_heads(x, tokens):  # [T, N, E] -> [N * H, T, d]
            return x.reshape(tokens, batch * heads, dim).transpose(0, 1)

        q = split_heads(self.q_proj(query), length)
        k = split_heads(self.k_proj(key), source)
        v = split_heads(self.v_proj(value), source)
        logits = self.qk_matmul(q * (1.0 / math.sqrt(dim)),
                                k.transpose(-2, -1))
        mask = _additive(attn_mask, logits.dtype)
        if mask is not None and mask.dim() == 2:
            mask = mask.unsqueeze(0)
        padding = _additive(key_padding_mask, logits.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source).expand(
                -1, heads, -1, -1).reshape(batch * heads, 1, source)
            mask = padding if mask is None else mask + padding
        if mask is not None:
            logits = logits + mask
        weights = logits.softmax(dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = self.av_matmul(weights, v)  # [N * H, L, d]
        out = out.transpose(0, 1).reshape(length * batch, self.embed_dim)
        out = self.out_proj(out).view(length, batch, self.embed_dim)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(batch, heads, length, source)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights.squeeze(0) if unbatched else weights)


QUANTIZED_MODULES.register(QuantMultiheadAttention.from_float,
                           name=nn.MultiheadAttention)
