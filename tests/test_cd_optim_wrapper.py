"""ColinearityDecayOptimWrapper: config building, schedule, accumulation,
clip_grad, state round trip, bad configs, DDP."""
import os.path as osp

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPERS
from mmengine.runner import Runner

from mmcd.core import (REGULARIZERS, VIT_RULES, ColinearityDecay,
                       ColinearityDecayRegularizer, Regularizer,
                       build_regularizer, discover_pairs)
from mmcd.utils.runner_setup import AMP_VARIANTS
from conftest import REPO, dist_train, micro_config
from test_colinearity import ViT

TOY_CD_CONFIG = osp.join(REPO, 'configs', 'toy',
                         'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py')


def make(model, accumulative_counts=1, clip_grad=None, **cd_kwargs):
    cfg = dict(type='ColinearityDecayOptimWrapper',
               optimizer=dict(type='SGD', lr=0.1),
               accumulative_counts=accumulative_counts,
               cd=dict(strength=0.5, **cd_kwargs))
    if clip_grad:
        cfg['clip_grad'] = clip_grad
    return build_optim_wrapper(model, cfg)


def loss_of(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=gen).to(next(model.parameters()).device)
    return model(x).square().mean()


def test_built_from_config_and_amp_variant_registered():
    model = ViT()
    wrapper = make(model)
    assert type(wrapper).__name__ == 'ColinearityDecayOptimWrapper'
    assert AMP_VARIANTS['ColinearityDecayOptimWrapper'] in OPTIM_WRAPPERS
    from mmengine.optim import AmpOptimWrapper
    assert issubclass(OPTIM_WRAPPERS.get('ColinearityDecayAmpOptimWrapper'),
                      AmpOptimWrapper)


def test_step_with_clip_equals_plain_step_then_cd():
    """CD runs after the (clipped) optimizer step, from the stepped weights."""
    torch.manual_seed(0)
    model, ref = ViT(), ViT()
    ref.load_state_dict(model.state_dict())
    clip = dict(max_norm=0.01)
    wrapper = make(model, clip_grad=clip)
    wrapper.initialize_count_status(model, 0, 10)
    plain = build_optim_wrapper(ref, dict(
        type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1),
        clip_grad=clip))
    cd = ColinearityDecay(discover_pairs(ref, VIT_RULES), strength=0.5)
    for it in range(3):
        wrapper.update_params(loss_of(model, it))
        plain.update_params(loss_of(ref, it))
        cd.step(lambda p: 0.1)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    hub = MessageHub.get_current_instance()
    for key in ('cd_update_norm', 'cd_align_ffn_mean', 'cd_align_vo_max',
                'cd_align_qk_mean'):
        assert hub.get_scalar('train/' + key).current() >= 0


@REGULARIZERS.register
class StepRecorder(Regularizer):
    """Records when the wrapper calls it (a regularizer of this test)."""
    name = 'test_step_recorder'

    def __init__(self, penalty: float = 0.0):
        self.penalty, self.steps, self.bound_to = penalty, [], None

    def bind(self, model, pairs, lr_of):
        self.bound_to = [p.name for p in pairs]

    def loss(self):
        return torch.tensor(self.penalty)

    def after_step(self, iteration, optimizer_step):
        self.steps.append((iteration, optimizer_step))
        return {'test_recorded': torch.tensor(float(len(self.steps)))}


def test_regularizers_act_only_on_real_optimizer_steps():
    model = ViT()
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), accumulative_counts=2,
        regularizers=[dict(type='test_step_recorder', penalty=0.25)]))
    wrapper.initialize_count_status(model, 0, 5)
    recorder = wrapper.regularizers[0]
    assert recorder.bound_to == [p.name for p in wrapper.matrix_pairs]
    for it in range(5):
        wrapper.update_params(loss_of(model, it))
    # steps after iterations 1, 3 and the last (partial) one, 4
    assert recorder.steps == [(1, 0), (3, 1), (4, 2)]
    hub = MessageHub.get_current_instance()
    assert hub.get_scalar('train/test_recorded').current() == 3
    assert hub.get_scalar('train/loss_test_step_recorder').current() == 0.25


def test_a_config_lists_several_regularizers_and_bad_names_fail():
    model = ViT()
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=0.5),
        regularizers=[dict(type='tweo', weight=0.01),
                      dict(type='test_step_recorder')]))
    assert [r.name for r in wrapper.regularizers] == [
        'cd', 'tweo', 'test_step_recorder']
    with pytest.raises(ValueError, match=r"unknown regularizer 'l2'; "
                       r'registered: alignment_growth, cd, s2d, '
                       r'test_step_recorder, tweo'):
        build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1),
            regularizers=[dict(type='l2')]))
    with pytest.raises(ValueError, match=r"\['cd'\] given twice"):
        build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=0.5),
            regularizers=[dict(type='cd', strength=1.0)]))
    with pytest.raises(ValueError, match='cd needs a strength'):
        build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(interval=2)))


def test_build_regularizer_checks_options_by_signature():
    @REGULARIZERS.register
    class Flexible(Regularizer):
        name = 'test_flexible'

        def __init__(self, scale, **extra):
            self.scale, self.extra = scale, extra

    try:
        built = build_regularizer(dict(type='test_flexible', scale=2, k=3))
        assert (built.scale, built.extra) == (2, {'k': 3})
        with pytest.raises(ValueError, match='test_flexible needs a scale'):
            build_regularizer(dict(type='test_flexible', k=3))
    finally:
        REGULARIZERS.unregister('test_flexible')
    with pytest.raises(ValueError, match=r"cd: unknown option\(s\) "
                       r"\['every'\]; allowed: \['begin', 'cuda_graph'"):
        build_regularizer(dict(type='cd', strength=1.0, every=2))


def test_schedule_window_warmup_and_interval():
    cd = ColinearityDecayRegularizer(0.5, begin=2, end=8, warmup_iters=4,
                                     interval=2)
    factors = [cd.multiplier(it, it) for it in range(10)]
    # iterations 2..7 are in the window, every 2nd optimizer step, ramp
    # (it - begin + 1) / 4, times the interval
    assert factors == [0, 0, 0.5, 0, 1.5, 0, 2, 0, 0, 0]
    with pytest.raises(ValueError, match=r'cd end \(5\) <= begin \(5\)'):
        ColinearityDecayRegularizer(0.5, begin=5, end=5)
    with pytest.raises(ValueError, match='cd interval must be an integer'):
        ColinearityDecayRegularizer(0.5, interval=0)


def test_state_round_trip_restores_cd_state():
    torch.manual_seed(0)
    model = ViT()
    wrapper = make(model)
    wrapper.initialize_count_status(model, 0, 10)
    for it in range(2):
        wrapper.update_params(loss_of(model, it))
    state = wrapper.state_dict()
    assert 'regularizers' in state and state['regularizers']['cd']
    # a new wrapper loads before binding (as Runner.resume does)
    model2 = ViT()
    model2.load_state_dict(model.state_dict())
    wrapper2 = make(model2)
    wrapper2.load_state_dict(state)
    wrapper2.initialize_count_status(model2, 2, 10)
    restored = wrapper2.state_dict()['regularizers']['cd']
    assert restored.keys() == state['regularizers']['cd'].keys()
    for key, value in state['regularizers']['cd'].items():
        assert torch.equal(restored[key], value), key
    wrapper.update_params(loss_of(model, 9))
    wrapper2.update_params(loss_of(model2, 9))
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)


def test_bad_configs():
    model = ViT()
    with pytest.raises(ValueError, match='strength must be >= 0'):
        build_optim_wrapper(model, dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=-0.1)))
    with pytest.raises(ValueError, match='unknown option'):
        make(model, every=3)
    with pytest.raises(ValueError, match='does nothing'):
        OPTIM_WRAPPERS.get('ColinearityDecayOptimWrapper')(
            torch.optim.SGD(model.parameters(), lr=0.1))
    linear = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(),
                                 torch.nn.Linear(4, 2))
    wrapper = make(linear)
    with pytest.raises(ValueError) as err:
        wrapper.initialize_count_status(linear, 0, 1)
    assert 'no matrix pair found' in str(err.value)
    assert r'ffn:(?P<block>.+)\.mlp\.fc1' in str(err.value)
    assert 'Linear modules in the model: 0, 2' in str(err.value)
    unbound = make(ViT())
    unbound.optimizer.zero_grad()
    with pytest.raises(RuntimeError, match='bind_model'):
        unbound.step()


def test_user_rule_and_kind_filter():
    model = torch.nn.Module()
    model.up, model.down = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=1.0),
        pairs=dict(builtin=(), rules=[dict(kind='ffn', first='up',
                                           second='down')])))
    wrapper.bind_model(model)
    assert [p.name for p in wrapper.matrix_pairs] == ['up']
    vit = ViT()
    wrapper = build_optim_wrapper(vit, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=1.0),
        pairs=dict(kinds=('vo', ), exclude=(r'blocks\.1', ))))
    wrapper.bind_model(vit)
    assert [p.name for p in wrapper.matrix_pairs] == ['blocks.0.vo']
    with pytest.raises(ValueError, match='pair kind'):  # at build time
        build_optim_wrapper(vit, dict(
            type='ColinearityDecayOptimWrapper',
            optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=1.0),
            pairs=dict(rules=[dict(kind='mlp', first='x', second='y')])))


def test_ddp_two_processes_identical_weights(micro_data_root, tmp_path):
    """tools/dist_train.sh, 2 gloo processes, the toy detector with CD: each
    rank sees other images, CD runs on every rank after the all-reduced step,
    and the ranks end bit-identical."""
    cfg = micro_config(micro_data_root, tmp_path, base=TOY_CD_CONFIG)
    cfg.custom_imports = dict(imports=['mmcd', 'rank_state_hook'],
                              allow_failed_imports=False)
    cfg.custom_hooks = [dict(type='SaveRankStateHook')]
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    config = str(tmp_path / 'cd_ddp.py')
    cfg.dump(config)
    out = dist_train(config)
    assert 'cd_update_norm' in out
    assert 'Epoch(train) [1][2/2]' in out  # 8 images: 2 batches of 2 a rank
    states = [torch.load(tmp_path / f'rank{r}_state.pth') for r in (0, 1)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    initial = Runner.from_cfg(micro_config(
        micro_data_root, tmp_path / 'init', base=TOY_CD_CONFIG)).model
    key = 'backbone.stages.0.blocks.0.ffn.layers.0.0.weight'
    assert not torch.equal(states[0][key], initial.state_dict()[key])


def test_cd_uses_each_param_groups_lr():
    """paramwise_cfg: fc2 at 10x lr gets a 10x CD update."""
    torch.manual_seed(0)
    model = ViT(depth=1)
    cfg = dict(type='ColinearityDecayOptimWrapper',
               optimizer=dict(type='SGD', lr=0.0), cd=dict(strength=1.0),
               pairs=dict(kinds=('ffn', )),
               paramwise_cfg=dict(custom_keys={'fc2': dict(lr_mult=10.0)}))
    wrapper = build_optim_wrapper(model, cfg)
    assert len(wrapper.optimizer.param_groups) > 1
    for group in wrapper.optimizer.param_groups:  # lr 0 does no SGD step
        group['lr'] = 0.01 * (10 if any(p is model.blocks[0].mlp.fc2.weight
                                        for p in group['params']) else 1)
    wrapper.initialize_count_status(model, 0, 1)
    ref = ViT(depth=1)
    ref.load_state_dict(model.state_dict())
    pair = discover_pairs(ref, VIT_RULES, kinds=['ffn'])
    cd = ColinearityDecay(pair, strength=1.0)
    cd.step(lambda p: 0.1 if p is ref.blocks[0].mlp.fc2.weight else 0.01)
    wrapper.update_params(loss_of(model, 0) * 0)
    torch.testing.assert_close(model.blocks[0].mlp.fc1.weight,
                               ref.blocks[0].mlp.fc1.weight)
    torch.testing.assert_close(model.blocks[0].mlp.fc2.weight,
                               ref.blocks[0].mlp.fc2.weight)


def test_amp_skipped_step_skips_cd(monkeypatch):
    """When the loss scaler skips a step (an inf gradient), CD does not run:
    every weight stays as it was. On CPU: the availability check patched,
    torch's CPU GradScaler in place of the CUDA one."""
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    monkeypatch.setattr(amp_optimizer_wrapper, 'is_cuda_available',
                        lambda: True)
    torch.manual_seed(0)
    model = ViT()
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayAmpOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=1.0)))
    wrapper.loss_scaler = torch.amp.GradScaler('cpu', init_scale=4.0)
    wrapper.initialize_count_status(model, 0, 4)
    hub = MessageHub.get_current_instance()

    def weights():
        return [p.detach().clone() for p in model.parameters()]

    loss = loss_of(model, 0)
    before = weights()
    wrapper.backward(loss)
    model.blocks[0].mlp.fc1.weight.grad[0, 0] = float('inf')
    hub.update_scalar('train/cd_update_norm', -1.0)
    wrapper.step()
    wrapper.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(weights(), before))
    assert hub.get_scalar('train/cd_update_norm').current() == -1.0
    assert wrapper.loss_scaler.get_scale() == 2.0  # the scaler saw the inf

    # the next, finite step runs the optimizer and CD
    wrapper.update_params(loss_of(model, 1))
    assert hub.get_scalar('train/cd_update_norm').current() > 0
    assert all(not torch.equal(p, q) for p, q in zip(weights(), before))
