"""A detector converted for quantization-aware training when it is built
(the way mmrazor wraps an architecture), so that the Runner builds the
optimizer once, over the float weights and the quantizers' steps and
offsets together, and the model it wraps for DDP is the converted one::

    model = dict(_delete_=True, type='QATDetector',
                 detector={{_base_.model}},
                 qat=dict(w_bits=4, a_bits=4, method='ofq', init='repq-vit'))

``QATDetector`` is a registered builder: it returns the detector itself
(same class, same state-dict keys, so a float checkpoint loads with
``load_from`` and a QAT checkpoint with ``--resume`` or ``tools/test.py``),
its layers converted by :func:`mmcd.core.quant.prepare_qat` with quantizers
off, and its :class:`~mmcd.core.quant.QATConfig` as ``qat_config``.
:class:`~mmcd.engine.hooks.QuantAwareTrainingHook` calibrates and switches
the quantizers on, anneals and logs oscillation.
"""
from typing import Dict, Optional

from mmdet.registry import MODELS
from mmengine.logging import print_log

from mmcd.core.quant import QATConfig, prepare_qat


@MODELS.register_module()
def QATDetector(detector: Dict, qat: Optional[Dict] = None):  # noqa: N802
    """Build ``detector`` and convert it for QAT with ``qat`` (the fields
    of :class:`~mmcd.core.quant.QATConfig`)."""
    qat = dict(qat or {})
    fields = set(QATConfig.__dataclass_fields__)
    unknown = sorted(set(qat) - fields)
    if unknown:
        raise ValueError(f'QATDetector qat: unknown option(s) {unknown}; '
                         f'allowed: {sorted(fields)}')
    cfg = QATConfig(**qat)
    model = MODELS.build(detector)
    summary = prepare_qat(model, cfg)
    print_log(f'QAT: W{cfg.w_bits}A{cfg.a_bits} {cfg.method} '
              f'({cfg.weight_quantizer} weights, init {cfg.init}): '
              f'{summary}', logger='current')
    model.qat_config = cfg
    return model
