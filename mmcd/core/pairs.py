"""Discovery of the ordered matrix pairs that Colinearity Decay acts on.

A pair is two weight matrices applied one after the other inside a
Transformer block, ``y = B act(A x)``:

* ``ffn``: ``A`` = fc1 weight ``[hidden, C]``, ``B`` = fc2 weight
  ``[C, hidden]`` (one pair).
* ``vo``: per head ``h``, ``A`` = the value rows ``W_V^h`` of the fused qkv
  weight ``[d, C]``, ``B`` = the output projection's columns
  ``W_O[:, h] [C, d]``.
* ``qk``: per head, the bilinear form ``W_Q^h^T W_K^h`` that makes the
  attention logits: ``A = W_K^h [d, C]``, ``B = (W_Q^h)^T [C, d]``.

Pairs are found by rules on module names: a regular expression for the first
module (its named groups fill the second module's template), the pair kind,
where the head count lives, and which parameter of each module holds the
matrix (``weight`` by default; ``nn.MultiheadAttention`` keeps its fused
Q/K/V rows in ``in_proj_weight``, and a rule names it). The built-in rules
are part of each backbone family's spec (:mod:`mmcd.core.architectures`: MMDetection's
``SwinTransformer``, timm / mmpretrain / mmcd ViT blocks). Matrices are
exposed as batched views ``[heads, rows, cols]`` of the parameters'
storage, so an in-place update of a view updates the model. Pure PyTorch:
no OpenMMLab import.
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

PAIR_KINDS = ('ffn', 'vo', 'qk')


@dataclass(frozen=True)
class PairRule:
    """How to find pairs of one kind.

    Args:
        kind: ``'ffn'``, ``'vo'`` or ``'qk'``.
        first: regular expression that must match a module's full name; its
            named groups fill ``second`` and ``heads_from``.
        second: template of the second module's name (``str.format`` with the
            groups). ``qk`` pairs live in one fused qkv module: leave it None.
        heads_from: template of the module whose ``num_heads`` attribute gives
            the head count (attention kinds).
        num_heads: fixed head count instead of ``heads_from``.
        name: template of the pair's name (defaults to the first module's).
        first_param, second_param: the parameter of each module that holds
            the matrix (a fused ``[3C, C]`` Q/K/V one for attention kinds;
            a ``qk`` pair has one: ``first_param``).
    """
    kind: str
    first: str
    second: Optional[str] = None
    heads_from: Optional[str] = None
    num_heads: Optional[int] = None
    name: Optional[str] = None
    first_param: str = 'weight'
    second_param: str = 'weight'

    def __post_init__(self):
        if self.kind not in PAIR_KINDS:
            raise ValueError(f'pair kind must be one of {PAIR_KINDS}, got '
                             f'{self.kind!r}')
        if self.kind != 'qk' and self.second is None:
            raise ValueError(f'a {self.kind!r} rule needs `second`')
        if self.kind != 'ffn' and self.heads_from is None and \
                self.num_heads is None:
            raise ValueError(f'a {self.kind!r} rule needs `heads_from` or '
                             '`num_heads`')


#: the FFN pair of mmcv's ``FFN`` (``ffn.layers.0.0`` -> ``ffn.layers.1``),
#: which MMDetection's Swin blocks and its DETR-style layers both use
MMCV_FFN_RULE = PairRule('ffn', r'(?P<block>.+)\.ffn\.layers\.0\.0',
                         '{block}.ffn.layers.1', name='{block}.ffn')


def attention_rules(attn: str, qkv: Optional[str] = 'qkv',
                    proj: str = 'proj', qkv_param: str = 'weight',
                    block: str = '.+'):
    """vo and qk rules for a fused ``{block}.{attn}.{qkv}`` projection (its
    ``qkv_param``) and its ``{block}.{attn}.{proj}`` output projection;
    ``qkv=None``: the attention module itself holds the fused matrix
    (``nn.MultiheadAttention``: ``qkv=None, proj='out_proj',
    qkv_param='in_proj_weight'``); ``block``: the regular expression the
    block's name must match."""
    first = rf'(?P<block>{block})\.{re.escape(attn)}'
    if qkv is not None:
        first += rf'\.{qkv}'
    owner = f'{{block}}.{attn}'
    return [
        PairRule('vo', first, f'{owner}.{proj}', heads_from=owner,
                 name='{block}.vo', first_param=qkv_param),
        PairRule('qk', first, heads_from=owner, name='{block}.qk',
                 first_param=qkv_param),
    ]


@dataclass
class MatrixPair:
    """An ordered pair ``(A, B)`` with ``B A`` the product that matters.

    ``first`` / ``second`` are the modules that own ``A`` / ``B`` (their
    parameters ``first_param`` / ``second_param``); :meth:`matrices`
    returns views ``A [H, m, k]`` and ``B [H, n, m]`` of them (``H`` heads,
    ``m`` the shared inner dimension).
    """
    name: str
    kind: str
    first: nn.Module
    second: nn.Module
    num_heads: int = 1
    first_param: str = 'weight'
    second_param: str = 'weight'

    @property
    def first_matrix(self) -> torch.Tensor:
        return getattr(self.first, self.first_param)

    @property
    def second_matrix(self) -> torch.Tensor:
        return getattr(self.second, self.second_param)

    def matrices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views of the weights' data: updating them updates the model."""
        wa = self.first_matrix.detach()
        if self.kind == 'ffn':
            return wa.unsqueeze(0), self.second_matrix.detach().unsqueeze(0)
        channels = wa.shape[1]
        heads, dim = self.num_heads, wa.shape[0] // 3 // self.num_heads
        q, k, v = (wa[i * channels:(i + 1) * channels].view(heads, dim,
                                                              channels)
                   for i in range(3))
        if self.kind == 'vo':
            wo = self.second_matrix.detach()
            return v, wo.view(wo.shape[0], heads, dim).permute(1, 0, 2)
        return k, q.transpose(1, 2)  # qk

    @property
    def parameters(self) -> List[nn.Parameter]:
        first, second = self.first_matrix, self.second_matrix
        return [first] if first is second else [first, second]


def _check_shapes(pair: MatrixPair, first_name: str, second_name: str):
    for mod, mod_name, param in ((pair.first, first_name, pair.first_param),
                                 (pair.second, second_name,
                                  pair.second_param)):
        weight = getattr(mod, param, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                f'{pair.kind} pair {pair.name}: module {mod_name} '
                f'({type(mod).__name__}) has no 2-D {param!r}; point the '
                'rule at a Linear layer, or name the parameter that holds '
                "the matrix (first_param / second_param, e.g. "
                "first_param='in_proj_weight' for nn.MultiheadAttention)")
    wa, wb = pair.first_matrix, pair.second_matrix
    if pair.kind == 'ffn':
        if wb.shape[1] != wa.shape[0]:
            raise ValueError(
                f'ffn pair {pair.name}: {second_name} takes {wb.shape[1]} '
                f'inputs but {first_name} gives {wa.shape[0]} '
                f'(weights {tuple(wa.shape)} and {tuple(wb.shape)})')
        return
    channels = wa.shape[1]
    if wa.shape[0] != 3 * channels or channels % pair.num_heads:
        raise ValueError(
            f'{pair.kind} pair {pair.name}: {first_name} must be a fused qkv '
            f'projection [3C, C] with C divisible by {pair.num_heads} heads, '
            f'got weight {tuple(wa.shape)}')
    if pair.kind == 'vo' and wb.shape[1] != channels:
        raise ValueError(
            f'vo pair {pair.name}: {second_name} takes {wb.shape[1]} inputs, '
            f'the value projection gives {channels}')


def discover_pairs(model: nn.Module,
                   rules: Sequence[PairRule],
                   kinds: Iterable[str] = PAIR_KINDS,
                   include: Sequence[str] = (),
                   exclude: Sequence[str] = ()) -> List[MatrixPair]:
    """All pairs of ``kinds`` that ``rules`` find in ``model``.

    ``include`` / ``exclude`` are regular expressions searched in the pair's
    name: with ``include`` only matching pairs are kept; matches of
    ``exclude`` are dropped. A pair found by several rules is kept once.
    Raises ``ValueError`` when a rule points at a module of the wrong shape.
    """
    kinds = set(kinds)
    unknown = kinds - set(PAIR_KINDS)
    if unknown:
        raise ValueError(f'unknown pair kinds {sorted(unknown)}; known: '
                         f'{PAIR_KINDS}')
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    pairs, seen = [], set()
    for rule in rules:
        if rule.kind not in kinds:
            continue
        pattern = re.compile(rule.first)
        for first_name, first in modules.items():
            match = pattern.fullmatch(first_name)
            if match is None:
                continue
            groups = match.groupdict()
            second_name = (rule.second or first_name).format(**groups)
            if second_name not in modules:
                raise ValueError(
                    f'{rule.kind} rule {rule.first!r} matched {first_name} '
                    f'but its second module {second_name} does not exist')
            num_heads = rule.num_heads
            if num_heads is None and rule.kind != 'ffn':
                owner = modules.get(rule.heads_from.format(**groups))
                num_heads = getattr(owner, 'num_heads', None)
                if not isinstance(num_heads, int):
                    raise ValueError(
                        f'{rule.kind} rule {rule.first!r}: module '
                        f'{rule.heads_from.format(**groups)} has no integer '
                        '`num_heads`; give `num_heads` in the rule')
            name = (rule.name or first_name).format(**groups)
            key = (rule.kind, first_name, second_name)
            if key in seen:
                continue
            seen.add(key)
            pair = MatrixPair(name, rule.kind, first, modules[second_name],
                              num_heads or 1, rule.first_param,
                              rule.first_param if rule.kind == 'qk'
                              else rule.second_param)
            _check_shapes(pair, first_name, second_name)
            pairs.append(pair)
    pairs = [p for p in pairs
             if (not include or any(re.search(i, p.name) for i in include))
             and not any(re.search(e, p.name) for e in exclude)]
    return pairs


def describe_no_pairs(model: nn.Module, rules: Sequence[PairRule],
                      kinds: Iterable[str], limit: int = 12) -> str:
    """Message for a model in which no pair matched: what was tried and
    which Linear modules exist."""
    tried = ', '.join(f'{r.kind}:{r.first}' for r in rules
                      if r.kind in set(kinds))
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    shown = ', '.join(linears[:limit]) + (
        f', ... ({len(linears)} in all)' if len(linears) > limit else '')
    return (f'no matrix pair found. Patterns tried: {tried or "none"}. '
            f'Linear modules in the model: {shown or "none"}. Add a rule, '
            "e.g. rules=[dict(kind='ffn', first=r'(?P<block>.+)\\.mlp\\.fc1',"
            " second='{block}.mlp.fc2')]")
