"""QuantAwareTrainingHook on the toy Swin Mask R-CNN: QAT from a float
checkpoint (calibration, optimizer holding the quantizer parameters,
annealing, oscillation log), resume, testing a QAT checkpoint, and the
clear error on a float one."""
import os.path as osp

import pytest
import torch
from mmengine.runner import Runner

from conftest import REPO, dist_train, micro_config
from mmcd.core import ConfigError

CD_CONFIG = osp.join(REPO, 'configs', 'toy',
                     'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py')
HOOKS = [dict(type='QuantAwareTrainingHook', calib=dict(num_images=2)),
         dict(type='ConfidenceGuidedAnnealingHook', begin=0.5),
         dict(type='QuantOscillationHook', window=2)]
QAT = dict(w_bits=4, a_bits=4, method='ofq')


def qat_config(data_root, work_dir, max_epochs, hooks=HOOKS):
    cfg = micro_config(data_root, work_dir, base=CD_CONFIG,
                       max_epochs=max_epochs)
    cfg.model = dict(type='QATDetector', detector=cfg.model, qat=QAT)
    cfg.optim_wrapper.paramwise_cfg.custom_keys['quantizer.'] = dict(
        decay_mult=0.0)
    cfg.custom_hooks = [dict(hook) for hook in hooks]
    return cfg


def test_qat_train_resume_and_test(micro_data_root, tmp_path):
    # a float checkpoint to start from (as a trained CD model would be)
    float_cfg = micro_config(micro_data_root, tmp_path / 'float',
                             base=CD_CONFIG)
    float_runner = Runner.from_cfg(float_cfg)
    float_ckpt = str(tmp_path / 'float.pth')
    torch.save(dict(state_dict=float_runner.model.state_dict(), meta={}),
               float_ckpt)

    cfg = qat_config(micro_data_root, tmp_path / 'qat', max_epochs=1)
    cfg.load_from = float_ckpt
    runner = Runner.from_cfg(cfg)
    runner.train()
    model = runner.model
    fc1 = model.backbone.stages[0].blocks[0].ffn.layers[0][0]
    assert type(fc1.weight_quantizer).__name__ == 'StatsWeightQuantizer'
    assert fc1.input_quantizer.calibrated and \
        fc1.input_quantizer.state == 'quant'
    assert model.backbone.stages[0].blocks[0].attn.w_msa.qk_reparam \
        is not None
    # the rebuilt optimizer holds the quantizer parameters, without decay
    groups = runner.optim_wrapper.optimizer.param_groups
    step = fc1.input_quantizer.step
    group = next(g for g in groups if any(p is step for p in g['params']))
    assert group['weight_decay'] == 0
    assert type(runner.optim_wrapper).__name__ == \
        'ColinearityDecayOptimWrapper'  # CD stays on
    # CGA started at iteration 2 of 4 and froze the confident weights
    frozen = runner.message_hub.get_scalar('train/qat_cga_frozen')
    assert len(frozen.data[0]) == 2  # iterations 2 and 3, each decided anew
    assert all(0 < f < 1 for f in frozen.data[0])
    assert fc1.weight_quantizer.frozen_mask.any()
    assert torch.equal(fc1.weight[fc1.weight_quantizer.frozen_mask],
                       fc1.weight_quantizer.frozen_value[
                           fc1.weight_quantizer.frozen_mask])
    oscillation = runner.message_hub.get_scalar('train/qat_oscillation')
    assert len(oscillation.data[0]) == 2  # every 2 of 4 iterations
    assert all(0 <= f <= 1 for f in oscillation.data[0])
    ckpt = str(tmp_path / 'qat' / 'epoch_1.pth')
    state = torch.load(ckpt, map_location='cpu', weights_only=False)
    assert any(k.endswith('input_quantizer.step') for k in
               state['state_dict'])
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    # resume: quantizer state and optimizer state come back, no new
    # calibration replaces them; annealing goes on from iteration 4 of 8
    cfg2 = qat_config(micro_data_root, tmp_path / 'qat', max_epochs=2)
    cfg2.resume, cfg2.load_from = True, ckpt
    resumed = Runner.from_cfg(cfg2)
    resumed.train()
    assert resumed.iter == 8
    log = open(resumed.logger.log_file).read()
    assert 'calibrated on' not in log
    assert 'confidence-guided annealing from iteration 4' in log
    resumed_fc1 = resumed.model.backbone.stages[0].blocks[0].ffn.layers[0][0]
    quantizer = resumed_fc1.weight_quantizer
    assert torch.equal(resumed_fc1.weight[quantizer.frozen_mask],
                       quantizer.frozen_value[quantizer.frozen_mask])
    resumed_weights = resumed.model.state_dict()
    assert any(not torch.equal(resumed_weights[k], v)  # training went on
               for k, v in weights.items() if k.endswith('.weight'))

    # test a QAT checkpoint: evaluated quantized
    cfg3 = qat_config(micro_data_root, tmp_path / 'test', max_epochs=1)
    cfg3.load_from = str(tmp_path / 'qat' / 'epoch_2.pth')
    tester = Runner.from_cfg(cfg3)
    metrics = tester.test()
    assert 'coco/bbox_mAP' in metrics
    assert tester.model.backbone.stages[0].blocks[0].ffn.layers[0][0] \
        .input_quantizer.state == 'quant'

    # a float checkpoint under a QAT config: a clear error, not a float test
    cfg4 = qat_config(micro_data_root, tmp_path / 'test4', max_epochs=1)
    cfg4.load_from = float_ckpt
    with pytest.raises(ConfigError, match='QAT model is not calibrated'):
        Runner.from_cfg(cfg4).test()


@pytest.mark.parametrize('hook,kwargs,message', [
    ('QuantAwareTrainingHook', dict(w_bits=4),
     r"w_bits belong to the model now: model = dict\(_delete_=True, "
     r"type='QATDetector', detector=\{\{_base_.model\}\}"),
    ('QuantAwareTrainingHook', dict(cga=dict(begin=0.9)),
     "cga is a hook of its own now: custom_hooks \\+= "
     r"\[dict\(type='ConfidenceGuidedAnnealingHook'"),
    ('QuantAwareTrainingHook', dict(oscillation_window=8),
     "QuantOscillationHook"),
    ('QuantAwareTrainingHook', dict(calib=dict(images=3)),
     'calib: unknown option'),
    ('ConfidenceGuidedAnnealingHook', dict(begin=1.5),
     'begin is a fraction'),
    ('ConfidenceGuidedAnnealingHook', dict(boundary_range=0),
     r'boundary_range must be in \(0, 0.5\)'),
    ('ConfidenceGuidedAnnealingHook', dict(boundary_range=0.5),
     r'boundary_range must be in \(0, 0.5\)'),
    ('QuantOscillationHook', dict(window=0), 'window must be an integer'),
])
def test_bad_hook_configs(hook, kwargs, message):
    from mmcd.engine import hooks
    with pytest.raises(ValueError, match=message):
        getattr(hooks, hook)(**kwargs)


def test_ofq_without_its_annealing_hook_says_so(micro_data_root, tmp_path):
    cfg = qat_config(micro_data_root, tmp_path, max_epochs=1,
                     hooks=HOOKS[:1])
    runner = Runner.from_cfg(cfg)
    runner.call_hook('before_run')
    log = open(runner.logger.log_file).read()
    assert "QAT method 'ofq' anneals (CGA) but the config has no " \
        'ConfidenceGuidedAnnealingHook: training without annealing; add ' \
        "dict(type='ConfidenceGuidedAnnealingHook', begin=0.9)" in log


def test_qat_under_torchrun_ranks_stay_identical(micro_data_root, tmp_path):
    """tools/dist_train.sh with 2 gloo processes: the converted model is
    wrapped for DDP, calibrated on the same images on every rank and
    annealed; both ranks end with the same weights, quantizer parameters
    and CGA masks."""
    cfg = qat_config(micro_data_root, tmp_path, max_epochs=2)
    cfg.custom_imports = dict(imports=['mmcd', 'rank_state_hook'],
                              allow_failed_imports=False)
    cfg.custom_hooks.append(dict(type='SaveRankStateHook'))
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    config = str(tmp_path / 'qat_ddp.py')
    cfg.dump(config)
    out = dist_train(config)
    assert 'confidence-guided annealing from iteration 2' in out
    states = [torch.load(tmp_path / f'rank{r}_state.pth') for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    masks = [k for k in states[0] if k.endswith('frozen_mask')]
    assert masks and any(states[0][k].any() for k in masks)
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


@pytest.mark.parametrize('qat,message', [
    (dict(w_bits=9), 'bits must be an integer in 2..8'),
    (dict(method='pact'), "unknown QAT method 'pact'; registered: lsq, ofq"),
    (dict(bits=4), r"QATDetector qat: unknown option\(s\) \['bits'\]"),
])
def test_bad_qat_detector_configs(qat, message):
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    detector = Config.fromfile(CD_CONFIG).model
    with pytest.raises(ValueError, match=message):
        MODELS.build(dict(type='QATDetector', detector=detector, qat=qat))


def test_hook_refuses_a_float_model_and_decayed_steps(micro_data_root,
                                                       tmp_path):
    cfg = qat_config(micro_data_root, tmp_path / 'float', max_epochs=1)
    cfg.model = cfg.model.detector  # the hook without QATDetector
    with pytest.raises(ValueError, match='needs a model converted for QAT'):
        Runner.from_cfg(cfg).train()
    cfg = qat_config(micro_data_root, tmp_path / 'decay', max_epochs=1)
    del cfg.optim_wrapper.paramwise_cfg.custom_keys['quantizer.']
    with pytest.raises(ValueError, match=r"quantizer parameter\(s\) \(e\.g\. "
                       r".+quantizer\.(step|offset)\) get weight decay"):
        Runner.from_cfg(cfg).train()
