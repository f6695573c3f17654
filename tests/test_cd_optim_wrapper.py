"""ColinearityDecayOptimWrapper: config building, schedule, accumulation,
clip_grad, state round trip, bad configs, DDP."""
import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.logging import MessageHub
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIM_WRAPPERS

from mmcd.core import ColinearityDecay, discover_pairs
from mmcd.core.pairs import VIT_RULES
from mmcd.engine.runner_setup import AMP_VARIANTS
from conftest import free_port
from test_colinearity import ViT


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


def test_cd_only_on_real_optimizer_steps(monkeypatch):
    model = ViT()
    wrapper = make(model, accumulative_counts=2)
    wrapper.initialize_count_status(model, 0, 5)
    calls = []
    real_step = wrapper.colinearity_decay.step
    monkeypatch.setattr(wrapper.colinearity_decay, 'step',
                        lambda *a: calls.append(wrapper._inner_count)
                        or real_step(*a))
    for it in range(5):
        wrapper.update_params(loss_of(model, it))
    assert calls == [2, 4, 5]  # steps at 2, 4 and the last (partial) one


def test_schedule_window_warmup_and_interval():
    model = ViT()
    wrapper = make(model, begin=2, end=8, warmup_iters=4, interval=2)
    factors = []
    for it in range(10):
        wrapper._inner_count = it + 1
        factors.append(wrapper.cd_multiplier())
    # iterations 2..7 are in the window, every 2nd optimizer step, ramp
    # (it - begin + 1) / 4, times the interval
    assert factors == [0, 0, 0.5, 0, 1.5, 0, 2, 0, 0, 0]


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
    for (_, *old), (_, *new) in zip(wrapper.colinearity_decay.groups,
                                    wrapper2.colinearity_decay.groups):
        for est_old, est_new in zip(old, new):
            assert torch.equal(est_old.v, est_new.v)
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


def _ddp_worker(rank, world_size, port, out):
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}',
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)  # same init on every rank
    from mmengine.model import MMDistributedDataParallel
    model = MMDistributedDataParallel(module=ViT(), device_ids=None)
    wrapper = make(model.module)
    wrapper.initialize_count_status(model, 0, 3)
    for it in range(3):
        wrapper.update_params(loss_of(model, 100 * rank + it))  # rank data
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    # leave together: a rank tearing down while the store's host (rank 0)
    # is gone can wait forever
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_identical_weights(tmp_path):
    out = str(tmp_path / 'weights.pt')
    port = free_port()
    ctx = mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail('2-process DDP run did not finish in 240 s')
    weights = torch.load(out)
    assert torch.equal(weights[0], weights[1])
    torch.manual_seed(0)
    assert not torch.equal(weights[0], torch.cat(
        [p.detach().flatten() for p in ViT().parameters()]))


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
