"""Query-key reparameterization (OFQ, Liu et al., ICML 2023).

Quantizing ``W_Q`` and ``W_K`` separately makes both oscillate in QAT, and
their errors multiply in the attention logits. OFQ quantizes the product
instead. With ``q_h = x W_Qh^T + b_Qh`` and ``k_h = x W_Kh^T + b_Kh`` for
head ``h``, the logits are exactly

    q_h k_h^T = (x M_h + u_h) x^T + (x v_h + c_h) 1^T,
    M_h = W_Qh^T W_Kh  (C x C),   u_h = W_Kh^T b_Qh,
    v_h = W_Qh^T b_Kh,            c_h = b_Qh . b_Kh,

where the last term is constant along each query row (softmax ignores it;
it is kept so the logits themselves are unchanged, tested). ``M_h`` is
fake-quantized per row with the QAT weight quantizer, ``x`` (in ``x M_h``)
by the ``qkv`` layer's input quantizer; ``(x M_h + u_h) scale`` and ``x`` are
the operands of the attention's ``q @ k^T`` matmul, so its two activation
quantizers keep their place. Biases stay in floating point. Costs ``num_heads`` times the
``W_Q``/``W_K`` memory (``C x C`` per head instead of ``C x d``). Pure
PyTorch.
"""
import torch
from torch import nn


class QKReparam(nn.Module):
    """Attention logits from the per-head product ``W_Q^T W_K``.

    Args:
        qkv: the attention's fused ``Linear(C, 3C)`` (q, k, v rows); kept as
            a reference, not a submodule, so checkpoint keys do not change.
        num_heads: heads of the attention.
        weight_quantizer: quantizer of the stacked products
            ``[num_heads * C, C]`` (one step per row).
    """

    def __init__(self, qkv: nn.Linear, num_heads: int,
                 weight_quantizer: nn.Module):
        super().__init__()
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError('query-key reparameterization needs a fused '
                             f'qkv Linear(C, 3C), got {qkv}')
        if qkv.in_features % num_heads:
            raise ValueError(f'{qkv.in_features} channels are not divisible '
                             f'by {num_heads} heads')
        self.__dict__['qkv'] = qkv
        self.num_heads = num_heads
        self.weight_quantizer = weight_quantizer

    def terms(self):
        """``M [H, C, C]``, ``u [H, C]``, ``v [H, C]``, ``c [H]`` from the
        current (latent, float) weights."""
        heads, channels = self.num_heads, self.qkv.in_features
        w_q, w_k, _ = self.qkv.weight.view(3, heads, channels // heads,
                                           channels)
        product = w_q.transpose(1, 2) @ w_k
        bias = self.qkv.bias
        if bias is None:
            zeros = product.new_zeros(heads, channels)
            return product, zeros, zeros, product.new_zeros(heads)
        b_q, b_k, _ = bias.view(3, heads, channels // heads)
        return (product, torch.einsum('hdc,hd->hc', w_k, b_q),
                torch.einsum('hdc,hd->hc', w_q, b_k), (b_q * b_k).sum(-1))

    def product(self) -> torch.Tensor:
        """The stacked products ``[H * C, C]`` (what is quantized)."""
        product = self.terms()[0]
        return product.reshape(-1, product.shape[-1])

    def finalize_weight(self) -> None:
        """Initialise the product's quantizer (QAT calibration)."""
        self.weight_quantizer.finalize(self.product().detach())
        self.weight_quantizer.set_state('quant')

    def forward(self, x: torch.Tensor, qk_matmul: nn.Module,
                scale: float) -> torch.Tensor:
        """Logits ``[B, H, N, N]`` of ``x [B, N, C]`` (scaled by
        ``scale``)."""
        product, u, v, c = self.terms()
        heads, channels = self.num_heads, product.shape[-1]
        product = self.weight_quantizer(product.reshape(-1, channels)).view(
            heads, channels, channels)
        input_quantizer = getattr(self.qkv, 'input_quantizer', None)
        x_q = input_quantizer(x) if input_quantizer is not None else x
        left = torch.einsum('bnc,hcd->bhnd', x_q, product) + u[:, None]
        logits = qk_matmul(left * scale, x.transpose(1, 2).unsqueeze(1))
        rows = (torch.einsum('bnc,hc->bhn', x_q, v) + c[:, None]) * scale
        return logits + rows.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}'
