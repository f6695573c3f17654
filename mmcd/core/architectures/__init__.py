"""Everything mmcd knows about a backbone family, in one spec per family.

An :class:`ArchitectureSpec` names, for the module names and classes of one
family of Transformer backbones:

* ``pair_rules``: where CD's matrix pairs are (:class:`~mmcd.core.pairs.
  PairRule`), read by the optim wrapper and the statistics hook;
* ``reparam_rules``: ``(LayerNorm pattern, next Linear template)`` pairs for
  RepQ-ViT's scale reparameterization (:mod:`mmcd.core.quant.reparam`);
* ``first_layer``: the pattern of the layer kept at ``first_layer_bits``;
* ``reconstruction_units``: patterns (full match) of the modules that block
  reconstruction optimises one by one (:mod:`mmcd.core.quant.
  reconstruction`): the blocks, the patch embedding and merging, and the
  neck of a detector built on the family, as APHQ-ViT's detection code
  reconstructs them;
* ``mlp_units``: the Transformer MLPs (:class:`MlpUnit`) that APHQ-ViT's
  MLP reconstruction turns to ReLU and fine-tunes
  (:mod:`mmcd.core.quant.mlp_reconstruction`);
* ``num_layers`` / ``layer_id`` / ``no_decay_names``: layer-wise lr decay
  (``LayerDecayOptimWrapperConstructor``), for plain ViTs.

Built in: ``swin`` (MMDetection's SwinTransformer), ``vit`` (timm,
mmpretrain and mmcd's ViTDet blocks) and ``detr`` (the Transformer layers of
mmdet's query-based detectors). A new backbone is one new spec file
calling ``ARCHITECTURES.register(ArchitectureSpec(...))``
(docs/en/extending.md). An attention module whose matmuls are computed
inline needs a quantized twin, registered by its class in
:data:`mmcd.core.quant.QUANTIZED_MODULES` (Swin's: ``mmcd/models``). Pure
PyTorch.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from torch import nn

from ..pairs import PairRule
from ..registry import Registry


@dataclass(frozen=True)
class MlpUnit:
    """The MLPs whose module names fully match ``pattern``: ``fc1``,
    ``act`` and ``fc2`` are their submodules' names relative to the MLP
    (``fc2(act(fc1(x)))``; the MLP module may add a residual)."""
    pattern: str
    fc1: str = 'fc1'
    act: str = 'act'
    fc2: str = 'fc2'


@dataclass(frozen=True)
class ArchitectureSpec:
    """One backbone family (module docstring)."""
    name: str
    pair_rules: Tuple[PairRule, ...]
    reparam_rules: Tuple[Tuple[str, str], ...] = ()
    first_layer: str = r'patch_embed'
    reconstruction_units: Tuple[str, ...] = ()
    mlp_units: Tuple[MlpUnit, ...] = ()
    num_layers: Optional[Callable[[nn.Module], int]] = None
    layer_id: Optional[Callable[[str, int], Optional[int]]] = None
    no_decay_names: Tuple[str, ...] = ()


#: Architecture specs by name (``ARCHITECTURES.register(spec)``).
ARCHITECTURES = Registry('architecture')


def get_architectures(names: Optional[Sequence[str]] = None
                      ) -> List[ArchitectureSpec]:
    """The specs of ``names`` (all registered ones for None)."""
    if names is None:
        return list(ARCHITECTURES.values())
    return [ARCHITECTURES.get(n) for n in names]


def pair_rules(names: Optional[Sequence[str]] = None) -> List[PairRule]:
    """The pair rules of the architectures ``names`` (default: all)."""
    return [r for spec in get_architectures(names) for r in spec.pair_rules]


def reparam_rules() -> List[Tuple[str, str]]:
    return [r for spec in ARCHITECTURES.values() for r in spec.reparam_rules]


def reconstruction_patterns() -> List[str]:
    """Every registered family's reconstruction-unit patterns."""
    return [p for spec in ARCHITECTURES.values()
            for p in spec.reconstruction_units]


def mlp_units() -> List[MlpUnit]:
    """Every registered family's MLP units."""
    return [u for spec in ARCHITECTURES.values() for u in spec.mlp_units]


def first_layer_pattern() -> str:
    """One pattern matching every registered family's first layer."""
    return '|'.join(sorted({f'(?:{s.first_layer})'
                            for s in ARCHITECTURES.values()}))


from . import detr, swin, vit  # noqa: E402,F401  (the built-in specs)
from .swin import SWIN_RULES  # noqa: E402
from .vit import VIT_RULES  # noqa: E402

__all__ = [
    'ArchitectureSpec', 'MlpUnit', 'mlp_units', 'ARCHITECTURES',
    'get_architectures', 'pair_rules',
    'reparam_rules', 'reconstruction_patterns', 'first_layer_pattern',
    'SWIN_RULES', 'VIT_RULES'
]
