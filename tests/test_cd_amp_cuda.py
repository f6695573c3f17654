"""The AMP variant on a GPU (skipped where CUDA is absent, as in CI): it must
match AmpOptimWrapper followed by the same CD update."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper

from mmcd.core import ColinearityDecay, discover_pairs
from mmcd.core.pairs import VIT_RULES
from test_cd_optim_wrapper import loss_of
from test_colinearity import ViT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='AmpOptimWrapper needs CUDA')


def test_amp_variant_equals_amp_step_then_cd():
    torch.manual_seed(0)
    model, ref = ViT().cuda(), ViT().cuda()
    ref.load_state_dict(model.state_dict())
    optim = dict(type='AdamW', lr=1e-3)
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayAmpOptimWrapper', optimizer=optim,
        cd=dict(strength=1.0)))
    wrapper.initialize_count_status(model, 0, 10)
    plain = build_optim_wrapper(ref, dict(type='AmpOptimWrapper',
                                          optimizer=optim))
    cd = ColinearityDecay(discover_pairs(ref, VIT_RULES), strength=1.0)
    for it in range(4):
        with wrapper.optim_context(model):
            loss = loss_of(model, it)
        wrapper.update_params(loss)
        with plain.optim_context(ref):
            loss_ref = loss_of(ref, it)
        plain.update_params(loss_ref)
        cd.step(lambda p: 1e-3)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(p).all(), n
        torch.testing.assert_close(p, q, msg=n)
    state = wrapper.state_dict()
    assert 'loss_scaler' in state and state['regularizers']['cd']
