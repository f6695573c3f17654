"""The AMP variant on a GPU (skipped where CUDA is absent, as in CI): it must
match AmpOptimWrapper followed by the same CD update."""
import pytest
import torch
from mmengine.optim import build_optim_wrapper

from mmcd.core import ColinearityDecay, discover_pairs
from mmcd.core import VIT_RULES
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
    cd = ColinearityDecay(discover_pairs(ref, VIT_RULES), strength=1.0,
                          cuda_graph=False)  # the eager reference
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


def test_cuda_graph_step_equals_eager_step():
    """Replayed CUDA graph == eager step, with a changing lr, per-group lrs
    and over several steps."""
    torch.manual_seed(0)
    eager_model = ViT(depth=3).cuda()
    graph_model = ViT(depth=3).cuda()
    graph_model.load_state_dict(eager_model.state_dict())
    eager = ColinearityDecay(discover_pairs(eager_model, VIT_RULES), 1.0,
                             cuda_graph=False)
    graph = ColinearityDecay(discover_pairs(graph_model, VIT_RULES), 1.0,
                             cuda_graph=True)
    fc2 = {id(b.mlp.fc2.weight) for m in (eager_model, graph_model)
           for b in m.blocks}
    graph_stats = []
    for step in range(5):
        lr = 0.01 * (step + 1)

        def lr_of(p, lr=lr):
            return 2 * lr if id(p) in fc2 else lr

        s_eager = eager.step(lr_of)
        s_graph = graph.step(lr_of)
        graph_stats.append(s_graph)
        torch.testing.assert_close(s_graph['update_sq'], s_eager['update_sq'])
        for kind in s_eager['alignment']:
            torch.testing.assert_close(s_graph['alignment'][kind],
                                       s_eager['alignment'][kind])
    # steps 2..5 were replays: they return the graph's static outputs
    # (documented: overwritten by the next step), step 1 ran eagerly
    assert all(s is graph_stats[1] for s in graph_stats[2:])
    assert graph_stats[0] is not graph_stats[1]
    for p, q in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(p, q)
