"""Layer-wise learning-rate decay for plain-ViT detectors (ViTDet, after
BEiT / MAE fine-tuning practice)."""
from typing import Dict, Tuple

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import (OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS,
                               OPTIMIZERS)

from mmcd.core.architectures import get_architectures

from ..model_utils import bare_model


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """``lr = base_lr * decay_rate ** (num_layers - layer_id)`` with the
    architecture spec's ``num_layers`` (``vit``: ``len(backbone.blocks) +
    1``): the deepest layers (and the
    neck and heads) train at ``base_lr``, the patch embedding at
    ``base_lr * decay_rate ** num_layers``. Biases, norms and the
    architecture's no-decay parameters (ViT: ``pos_embed``, ``rel_pos_*``)
    and QAT's quantizer steps and offsets (0-d or 1-d) get no weight decay.
    Layer ids and no-decay names come from the architecture spec
    (:mod:`mmcd.core.architectures`; ``vit``: ``backbone.blocks.<i>``).

    ``paramwise_cfg=dict(decay_rate=0.7, architecture='vit')``; any optim
    wrapper type works (``ColinearityDecayOptimWrapper`` included).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg=None):
        paramwise_cfg = dict(paramwise_cfg or {})
        self.decay_rate = float(paramwise_cfg.pop('decay_rate', 0.7))
        self.spec = get_architectures(
            [paramwise_cfg.pop('architecture', 'vit')])[0]
        if paramwise_cfg:
            raise ValueError('LayerDecayOptimWrapperConstructor takes only '
                             'decay_rate and architecture, got '
                             f'{sorted(paramwise_cfg)}')
        if self.spec.layer_id is None or self.spec.num_layers is None:
            raise ValueError(f'architecture {self.spec.name!r} defines no '
                             'layer ids for layer-wise lr decay')
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f'decay_rate must be in (0, 1], got '
                             f'{self.decay_rate}')
        super().__init__(optim_wrapper_cfg, None)

    def __call__(self, model):
        model = bare_model(model)
        num_layers = self.spec.num_layers(model)
        groups: Dict[Tuple[int, bool], dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            lid = self.spec.layer_id(name, num_layers)
            no_decay = param.ndim <= 1 or name.endswith(
                self.spec.no_decay_names)
            group = groups.setdefault((lid, no_decay), dict(
                params=[],
                lr=self.base_lr * self.decay_rate**(num_layers - lid),
                weight_decay=0.0 if no_decay else self.base_wd))
            group['params'].append(param)
        print_log(f'layer-wise lr decay {self.decay_rate}: {num_layers + 1} '
                  f'layers, {len(groups)} param groups', logger='current')
        optimizer_cfg = dict(self.optimizer_cfg)
        optimizer_cfg['params'] = list(groups.values())
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        return OPTIM_WRAPPERS.build(dict(self.optim_wrapper_cfg),
                                    default_args=dict(optimizer=optimizer))
