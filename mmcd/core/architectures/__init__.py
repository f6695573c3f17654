"""Everything mmcd knows about a backbone family, in one spec per family.

An :class:`ArchitectureSpec` names, for the module names and classes of one
family of Transformer backbones:

* ``pair_rules``: where CD's matrix pairs are (:class:`~mmcd.core.pairs.
  PairRule`), read by the optim wrapper and the statistics hook;
* ``reparam_rules``: ``(LayerNorm pattern, next Linear template)`` pairs for
  RepQ-ViT's scale reparameterization (:mod:`mmcd.core.quant.reparam`);
* ``quant_attentions``: attention classes whose matmuls are computed inline,
  with the factory of their quantizable replacement, and
  ``attention_containers``, attention wrappers that need none
  (:func:`mmcd.core.quant.quantize_model`);
* ``first_layer``: the pattern of the layer kept at ``first_layer_bits``;
* ``layer_id`` / ``no_decay_names``: layer-wise lr decay
  (``LayerDecayOptimWrapperConstructor``), for plain ViTs.

Built in: ``swin`` (MMDetection's SwinTransformer) and ``vit`` (timm,
mmpretrain and mmcd's ViTDet blocks). A new backbone is one new spec file
calling :func:`register_architecture` (README, "Extending mmcd"). Pure
PyTorch.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from torch import nn

from ..pairs import PairRule


@dataclass(frozen=True)
class ArchitectureSpec:
    """One backbone family (module docstring)."""
    name: str
    pair_rules: Tuple[PairRule, ...]
    reparam_rules: Tuple[Tuple[str, str], ...] = ()
    quant_attentions: Dict[str, Callable] = field(default_factory=dict)
    attention_containers: FrozenSet[str] = frozenset()
    first_layer: str = r'patch_embed'
    layer_id: Optional[Callable[[str, int], Optional[int]]] = None
    no_decay_names: Tuple[str, ...] = ()


ARCHITECTURES: Dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> ArchitectureSpec:
    if spec.name in ARCHITECTURES:
        raise ValueError(f'architecture {spec.name!r} is registered already')
    ARCHITECTURES[spec.name] = spec
    return spec


def get_architectures(names: Optional[Sequence[str]] = None
                      ) -> List[ArchitectureSpec]:
    """The specs of ``names`` (all registered ones for None)."""
    if names is None:
        return list(ARCHITECTURES.values())
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        raise ValueError(f'unknown architecture(s) {unknown}; registered: '
                         f'{", ".join(sorted(ARCHITECTURES))}')
    return [ARCHITECTURES[n] for n in names]


def pair_rules(names: Optional[Sequence[str]] = None) -> List[PairRule]:
    """The pair rules of the architectures ``names`` (default: all)."""
    return [r for spec in get_architectures(names) for r in spec.pair_rules]


def reparam_rules() -> List[Tuple[str, str]]:
    return [r for spec in ARCHITECTURES.values() for r in spec.reparam_rules]


def first_layer_pattern() -> str:
    """One pattern matching every registered family's first layer."""
    return '|'.join(sorted({f'(?:{s.first_layer})'
                            for s in ARCHITECTURES.values()}))


def quant_attention_for(name: str, module: nn.Module) -> Optional[Callable]:
    """The replacement factory for attention ``module`` (None: no spec
    claims its class). Two specs claiming the same class is an error."""
    kind = type(module).__name__
    claims = [s for s in ARCHITECTURES.values() if kind in s.quant_attentions]
    if len(claims) > 1:
        raise ValueError(
            f'{name} ({kind}) is claimed by the architecture specs '
            f'{", ".join(s.name for s in claims)}: keep one')
    return claims[0].quant_attentions[kind] if claims else None


def is_attention_container(module: nn.Module) -> bool:
    kind = type(module).__name__
    return any(kind in s.attention_containers for s in ARCHITECTURES.values())


def quant_attention_names() -> List[str]:
    return sorted(k for s in ARCHITECTURES.values()
                  for k in s.quant_attentions)


def attention_container_names() -> List[str]:
    return sorted(k for s in ARCHITECTURES.values()
                  for k in s.attention_containers)


from . import swin, vit  # noqa: E402,F401  (register the built-in specs)
from .swin import SWIN_RULES  # noqa: E402
from .vit import VIT_RULES  # noqa: E402

__all__ = [
    'ArchitectureSpec', 'ARCHITECTURES', 'register_architecture',
    'get_architectures', 'pair_rules', 'reparam_rules', 'first_layer_pattern',
    'quant_attention_for', 'is_attention_container', 'quant_attention_names',
    'attention_container_names', 'SWIN_RULES', 'VIT_RULES'
]
