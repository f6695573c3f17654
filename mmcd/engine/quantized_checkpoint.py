"""Quantized checkpoints: a calibrated (and reconstructed) model saved once
and evaluated or exported without calibrating again.

A file written by ``tools/quantize.py`` holds ``meta`` (what the model was
quantized with: bits, method, the other :class:`~mmcd.core.quant.QuantConfig`
settings, the reconstruction options, calibration images, a digest of the
detector's config, the float checkpoint it came from, the reconstruction
units done so far) and ``state_dict`` (:mod:`mmcd.core.quant.saved_state`).
The float checkpoint is never written. Loading checks ``meta`` against the
run's settings and refuses a file made for another config, method or bit
width, naming what differs.
"""
import copy
import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.logging import print_log

from mmcd.core import ConfigError
from mmcd.core.quant import DEFAULT_PROFILE, QuantConfig, quantize_model
from mmcd.core.quant.reconstruction import MEMORY_OPTIONS
from mmcd.core.quant.saved_state import restore_quantized

FORMAT = 'mmcd-quantized-checkpoint-1'
#: the QuantConfig settings a quantized checkpoint is tied to
SETTINGS = ('w_bits', 'a_bits', 'method', 'scope', 'skip',
            'first_layer_bits', 'weight_search', 'layer_bits',
            'reconstruction', 'profile')
#: the value of a setting in files written before it existed
SETTING_DEFAULTS = dict(profile=DEFAULT_PROFILE)


def settings_of(quant_cfg: QuantConfig) -> Dict:
    """The :data:`SETTINGS` of ``quant_cfg`` as plain, comparable values."""
    values = {key: getattr(quant_cfg, key) for key in SETTINGS}
    values['layer_bits'] = [vars(rule) for rule in values['layer_bits']]
    if values['reconstruction'] is not None:  # where data lives: not tied
        values['reconstruction'] = {
            k: v for k, v in values['reconstruction'].items()
            if k not in MEMORY_OPTIONS}
    return json.loads(json.dumps(values))  # tuples become lists


def model_digest(model_cfg) -> str:
    """A digest of the detector's config (``cfg.model``)."""
    text = json.dumps(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict')
                      else model_cfg, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_meta(quant_cfg: QuantConfig, model_cfg, calib_images: int,
              float_checkpoint: str, units: List[str]) -> Dict:
    return dict(format=FORMAT, settings=settings_of(quant_cfg),
                model=model_digest(model_cfg), calib_images=calib_images,
                float_checkpoint=float_checkpoint, units=list(units),
                units_done=[])


def save_quantized(path: str, model: torch.nn.Module, meta: Dict) -> None:
    """Write ``meta`` and ``model``'s state to ``path`` (a temporary file,
    then renamed: an interrupted save leaves the previous file)."""
    torch.save(dict(meta=meta, state_dict=model.state_dict()), path + '.tmp')
    os.replace(path + '.tmp', path)


def load_quantized(path: str) -> Tuple[Dict, Dict]:
    """``(meta, state_dict)`` of a quantized checkpoint; anything else
    fails in one line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'quantized checkpoint {path} does not exist')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # not a torch file at all
        raise ConfigError(f'{path} is not a quantized checkpoint: '
                          f'{type(err).__name__}') from None
    if not isinstance(data, dict) or \
            data.get('meta', {}).get('format') != FORMAT:
        raise ConfigError(f'{path} is not a quantized checkpoint written by '
                          'tools/quantize.py (a float checkpoint goes with '
                          '--quant, not --quant-checkpoint)')
    return data['meta'], data['state_dict']


def check_meta(meta: Dict, quant_cfg: QuantConfig, model_cfg,
               path: str, complete: bool = True) -> None:
    """Refuse ``meta`` made for other settings or another detector config,
    or (``complete``) a reconstruction still under way."""
    expected = settings_of(quant_cfg)
    stored = {k: meta['settings'].get(k, SETTING_DEFAULTS.get(k))
              for k in SETTINGS}
    differ = [f'{k} {stored[k]!r} (here {expected[k]!r})'
              for k in SETTINGS if stored[k] != expected[k]]
    if meta['model'] != model_digest(model_cfg):
        differ.append('the detector config (model) differs')
    if differ:
        raise ConfigError(f'{path} was quantized with other settings: '
                          f'{"; ".join(differ)}')
    if complete and len(meta['units_done']) < len(meta['units']):
        raise ConfigError(
            f'{path} is a reconstruction stopped after '
            f'{len(meta["units_done"])} of {len(meta["units"])} units; run '
            'tools/quantize.py again to finish it')


def describe(meta: Dict) -> str:
    s = meta['settings']
    recon = '' if s['reconstruction'] is None else \
        f' + reconstruction {s["reconstruction"]}'
    profile = s.get('profile', SETTING_DEFAULTS['profile'])
    target = '' if profile == SETTING_DEFAULTS['profile'] else \
        f', profile {profile}'
    return (f'W{s["w_bits"]}A{s["a_bits"]} {s["method"]}{recon}{target}, '
            f'calibrated on {meta["calib_images"]} images')


def load_quantized_model(float_model, quant_cfg: QuantConfig, model_cfg,
                         path: str, float_checkpoint: Optional[str] = None):
    """The quantized model saved in ``path``, rebuilt on a copy of
    ``float_model`` (converted with ``quant_cfg``, which the file must have
    been made with, as ``model_cfg``'s detector; :func:`check_meta`). A file
    made from another float checkpoint than ``float_checkpoint`` is loaded
    with a warning: its state holds every parameter, so the float one only
    serves comparisons."""
    meta, state = load_quantized(path)
    check_meta(meta, quant_cfg, model_cfg, path)
    if float_checkpoint is not None and \
            meta['float_checkpoint'] != os.path.abspath(float_checkpoint):
        print_log(f'{path} was made from {meta["float_checkpoint"]}, not '
                  f'{float_checkpoint}: float results are of the latter',
                  logger='current', level=logging.WARNING)
    quant_model = quantize_model(copy.deepcopy(float_model), quant_cfg)
    restore_quantized(quant_model, state)
    print_log(f'PTQ: loaded {path} ({describe(meta)})', logger='current')
    return quant_model
