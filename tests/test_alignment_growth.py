"""The planted alignment growth: the CD formula with the opposite sign,
its cap, and its use from a config."""
import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.optim import build_optim_wrapper

from mmcd.core import (VIT_RULES, AlignmentGrowthRegularizer, alignment,
                       build_regularizer, discover_pairs)
from test_colinearity import ViT


def _fc_weights(model):
    return [(blk.mlp.fc1.weight.detach().clone(),
             blk.mlp.fc2.weight.detach().clone()) for blk in model.blocks]


def test_one_step_adds_the_cd_update_written_from_its_formula():
    """A += lr lam B^T B A / ||B||_2^2, B += lr lam B A A^T / ||A||_2^2 on
    each ffn pair, exact spectral norms, values before the update."""
    torch.manual_seed(0)
    model = ViT().double()
    pairs = discover_pairs(model, VIT_RULES, kinds=['ffn'])
    growth = AlignmentGrowthRegularizer(0.5)
    growth.bind(model, pairs, lambda p: 0.1)
    for estimator in (e for ests in growth.sigmas.values() for e in ests):
        estimator.init_iters = 300  # converged spectral norms
    before = _fc_weights(model)
    logged = growth.after_step(0, 0)
    lr_lam = 0.1 * 0.5
    for (a, b), blk in zip(before, model.blocks):
        sig_a = torch.linalg.matrix_norm(a, ord=2)
        sig_b = torch.linalg.matrix_norm(b, ord=2)
        torch.testing.assert_close(blk.mlp.fc1.weight.detach(),
                                   a + lr_lam * b.T @ b @ a / sig_b**2)
        torch.testing.assert_close(blk.mlp.fc2.weight.detach(),
                                   b + lr_lam * b @ a @ a.T / sig_a**2)
    assert int(logged['alignment_growth_capped_pairs']) == 0


def test_built_by_the_optim_wrapper_from_a_config():
    """regularizers=[dict(type='alignment_growth', ...)] acts after the
    optimizer step on every pair kind and logs under its own name."""
    torch.manual_seed(0)
    model = ViT()
    wrapper = build_optim_wrapper(model, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1),
        regularizers=[dict(type='alignment_growth', strength=1.0)]))
    wrapper.bind_model(model)
    pairs = wrapper.matrix_pairs
    before = [float(alignment(*p.matrices()).mean()) for p in pairs]
    # a zero loss: the SGD step changes nothing, what changes is the growth
    wrapper.update_params(0 * model(torch.randn(2, 5, 16)).sum())
    after = [float(alignment(*p.matrices()).mean()) for p in pairs]
    assert {p.kind for p in pairs} == {'ffn', 'vo', 'qk'}
    assert all(a > b for a, b in zip(after, before))
    hub = MessageHub.get_current_instance()
    assert 'train/alignment_growth_align_qk_max' in hub.log_scalars


def test_channels_restricts_the_growth_to_the_most_aligned_channels():
    """channels=k: rows j of A and columns j of B grow, with the formula's
    values, only for the k hidden units of largest ||a_j|| ||b_j||."""
    torch.manual_seed(0)
    model = ViT().double()
    pairs = discover_pairs(model, VIT_RULES, kinds=['ffn'])
    growth = AlignmentGrowthRegularizer(0.5, channels=3)
    growth.bind(model, pairs, lambda p: 0.1)
    for estimator in (e for ests in growth.sigmas.values() for e in ests):
        estimator.init_iters = 300
    before = _fc_weights(model)
    growth.after_step(0, 0)
    for (a, b), blk in zip(before, model.blocks):
        score = [float(a[j].norm() * b[:, j].norm())
                 for j in range(a.shape[0])]
        top = sorted(range(len(score)), key=score.__getitem__)[-3:]
        rows = torch.zeros(a.shape[0], 1, dtype=a.dtype)
        rows[top] = 1
        sig_a = torch.linalg.matrix_norm(a, ord=2)
        sig_b = torch.linalg.matrix_norm(b, ord=2)
        torch.testing.assert_close(
            blk.mlp.fc1.weight.detach(),
            a + 0.05 * rows * (b.T @ b @ a) / sig_b**2)
        torch.testing.assert_close(
            blk.mlp.fc2.weight.detach(),
            b + 0.05 * (b @ a @ a.T) * rows.T / sig_a**2)
        changed = (blk.mlp.fc1.weight.detach() != a).any(1)
        assert changed.nonzero().flatten().tolist() == sorted(top)


def test_alignment_rises_where_cd_lowers_it():
    torch.manual_seed(0)
    model = ViT()
    pairs = discover_pairs(model, VIT_RULES, kinds=['ffn'])
    start = [float(alignment(*p.matrices()).mean()) for p in pairs]
    growth = build_regularizer(dict(type='alignment_growth', strength=2.0))
    growth.bind(model, pairs, lambda p: 0.1)
    for it in range(20):
        growth.after_step(it, it)
    end = [float(alignment(*p.matrices()).mean()) for p in pairs]
    assert all(e > 1.5 * s for s, e in zip(start, end)), (start, end)


def test_a_pair_at_the_cap_is_left_unchanged():
    """Only pairs whose mean alignment is below max_alignment grow; the
    capped count is logged."""
    torch.manual_seed(0)
    model = ViT()
    pairs = discover_pairs(model, VIT_RULES, kinds=['ffn'])
    first, second = (float(alignment(*p.matrices()).mean()) for p in pairs)
    cap = (first + second) / 2
    low = min(range(2), key=lambda i: [first, second][i])
    growth = AlignmentGrowthRegularizer(1.0, max_alignment=cap)
    growth.bind(model, pairs, lambda p: 0.1)
    before = _fc_weights(model)
    logged = growth.after_step(0, 0)
    after = _fc_weights(model)
    for i in range(2):
        changed = not torch.equal(before[i][0], after[i][0])
        assert changed == (i == low)
    assert int(logged['alignment_growth_capped_pairs']) == 1


@pytest.mark.parametrize('kwargs, message', [
    (dict(strength=-1.0), 'strength must be >= 0'),
    (dict(strength=1.0, max_alignment=0), 'max_alignment must be > 0'),
    (dict(strength=1.0, end=3, begin=5), 'end'),
    (dict(strength=1.0, channels=0), 'channels must be an integer >= 1'),
    (dict(strength=1.0, cuda_graph=True), "unknown option"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_regularizer(dict(type='alignment_growth', **kwargs))


def test_state_round_trip_continues_the_same_steps():
    """The power-iteration state travels in state_dict: a regularizer
    restored from it takes the same next step as the original."""
    torch.manual_seed(0)
    model, twin = ViT().double(), ViT().double()
    twin.load_state_dict(model.state_dict())
    first = AlignmentGrowthRegularizer(1.0, channels=4)
    first.bind(model, discover_pairs(model, VIT_RULES), lambda p: 0.1)
    first.after_step(0, 0)
    twin.load_state_dict(model.state_dict())
    second = AlignmentGrowthRegularizer(1.0, channels=4)
    second.bind(twin, discover_pairs(twin, VIT_RULES), lambda p: 0.1)
    second.load_state_dict(first.state_dict())
    assert first.state_dict().keys() == second.state_dict().keys() != set()
    first.after_step(1, 1)
    second.after_step(1, 1)
    for (name, a), b in zip(model.state_dict().items(),
                            twin.state_dict().values()):
        assert torch.equal(a, b), name
