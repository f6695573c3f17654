"""APHQ-ViT and QDrop by name: the APH loss and its sensitivity weights, the
MLP reconstruction, the RPN objective and the methods, each against a
reference written here from the paper / public code (GoatWu/APHQ-ViT,
wimh966/QDrop) or computed another way (autograd's Hessian-vector product,
numpy, scipy)."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mmcd.core.quant import QuantConfig, calibrate, quantize_model
from mmcd.core.quant.methods import get_method
from mmcd.core.quant.mlp_reconstruction import (find_mlps, mlp_error,
                                                positive_quantile,
                                                reconstruct_mlps, use_relu)
from mmcd.core.quant.reconstruction import ReconstructionConfig, reconstruct
from mmcd.core.quant.reconstruction_losses import (AphLoss,
                                                   perturbation_sensitivity)
from mmcd.core.quant.saved_state import restore_quantized


def test_positive_quantile_is_the_ceil_nq_th_smallest_positive_value():
    values = torch.tensor([-3., 0., 5., 1., 2., 4., 3., -1.])
    # positives sorted: 1 2 3 4 5; ceil(5 * 0.5) = 3 -> 3; ceil(5 * .999) = 5
    assert positive_quantile(values, 0.5) == 3.0
    assert positive_quantile(values, 0.999) == 5.0
    assert positive_quantile(values, 0.2) == 1.0
    rng = np.random.default_rng(0)
    big = rng.standard_normal(10001).astype(np.float32)
    positives = np.sort(big[big > 0])
    expected = positives[math.ceil(len(positives) * 0.999) - 1]
    assert positive_quantile(torch.from_numpy(big), 0.999) == expected
    with pytest.raises(ValueError, match='never sees a positive input'):
        positive_quantile(-torch.ones(4), 0.999)


class Unit(nn.Module):
    """Returns ``(tensor, size)`` like a patch embedding."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x), (x.shape[1], 1)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.unit = Unit()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.unit(x)
        return self.head(torch.tanh(y))


def test_sensitivity_weights_are_the_normalised_hessian_times_ones():
    """|g(y + e) - g(y - e)| = 2 e |H 1| + O(e^3): against autograd's
    Hessian-vector product of the objective at the float output, normalised
    per image to mean 1; the size in the output's tuple gets None."""
    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)

    def objective(m):  # minimal (0) at the float output, not quadratic
        out = m(x)
        return ((out - reference) ** 2).sum() + \
            ((out - reference) ** 4).sum()

    weights, size = perturbation_sensitivity(model, model.unit, objective,
                                             eps=1e-4)
    assert size == (None, None)
    y = model.unit(x)[0].detach()

    def loss_of_y(y):
        return (((model.head(torch.tanh(y)) - reference) ** 2).sum() +
                ((model.head(torch.tanh(y)) - reference) ** 4).sum())

    _, hvp = torch.autograd.functional.hvp(loss_of_y, y, torch.ones_like(y))
    expected = hvp.abs()
    expected = expected / expected.flatten(1).mean(1).view(-1, 1, 1)
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(weights.flatten(1).mean(1),
                               torch.ones(2, dtype=torch.float64))
    # an image the objective does not see gets uniform weights, not zeros
    def first_image_objective(m):
        out = m(x)[0] - reference[0]
        return (out ** 2).sum() + (out ** 4).sum()

    weights, _ = perturbation_sensitivity(model, model.unit,
                                          first_image_objective, eps=1e-4)
    torch.testing.assert_close(weights[0], expected[0], rtol=1e-5,
                               atol=1e-8)
    assert torch.equal(weights[1], torch.ones_like(weights[1]))
    # an objective with no term at all (the RPN's when nothing is confident)
    def no_term(m):
        m(x)
        return 0

    weights, _ = perturbation_sensitivity(model, model.unit, no_term)
    assert torch.equal(weights, torch.ones_like(weights))


def test_aph_loss_weighted_on_the_backbone_mean_elsewhere_and_two_first():
    pred = torch.tensor([[1., 2.], [3., 4.]])
    target = torch.tensor([[0., 2.], [1., 1.]])
    weight = torch.tensor([[2., 1.], [.5, 1.]])
    loss = AphLoss(unit='backbone.stages.0.blocks.0')
    assert loss.needs_weights()
    # sum (p - t)^2 w = 1*2 + 0 + 4*.5 + 9*1 = 13 -> rescaled to 2
    assert float(loss(pred, target, weight)) == pytest.approx(2.0)
    assert float(loss(pred * 0 + target + 1, target, weight)) == \
        pytest.approx(2 * (2 + 1 + .5 + 1) / 13)
    neck = AphLoss(unit='neck')
    assert not neck.needs_weights()
    small = (torch.ones(2, 2), torch.zeros(3))
    # mean over all 7 elements of |.|^2: (4 * 1 + 3 * 4) / 7, then 2 first
    assert float(neck(small, (torch.zeros(2, 2), torch.full((3, ), 2.))))\
        == pytest.approx(2.0)
    assert float(neck((torch.zeros(2, 2), torch.zeros(3)),
                      (torch.zeros(2, 2), torch.full((3, ), 2.)))) == \
        pytest.approx(2 * (12 / 7) / (16 / 7))
    with pytest.raises(ValueError, match='needs the sensitivity weights'):
        AphLoss(unit='backbone.x')(pred, target)


def test_mlp_error_sums_dim_1_and_averages_the_rest():
    pred = torch.arange(12.).view(1, 3, 4)
    target = torch.zeros(1, 3, 4)
    # sum over the 3 tokens of v^2, then the mean over the 4 channels
    expected = np.mean((np.arange(12.).reshape(3, 4) ** 2).sum(0))
    assert float(mlp_error(pred, target)) == pytest.approx(expected)
    w = torch.full((1, 3, 4), 0.5)
    assert float(mlp_error(pred, target, w)) == pytest.approx(expected / 2)


class Mlp(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc1, self.act, self.fc2 = (nn.Linear(dim, 4 * dim), nn.GELU(),
                                        nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x):
        return x + self.mlp(self.norm2(x))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(4, 8)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(self.patch_embed(x))


class Vit(nn.Module):
    """A toy with the ``vit`` spec's module names."""

    def __init__(self):
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


def toy(seed=0):
    torch.manual_seed(seed)
    return Vit(), torch.randn(6, 5, 4) * 2


def test_mlp_reconstruction_relu_loss_by_hand_and_it_learns():
    """The first step's loss is APHQ-ViT's ``E(ReLU MLP, y)/10 + 2
    E(clamped, y)/10`` on image 0 (computed here with F.relu and clamp); the
    MLPs become ReLU and the loss falls."""
    net, x = toy()
    model = copy.deepcopy(net)
    cfg = ReconstructionConfig(mlp=True, mlp_iters=60, mlp_lr=1e-2)
    mlp = net.backbone.blocks[0].mlp
    with torch.no_grad():
        inputs = net.backbone.blocks[0].norm2(net.backbone.patch_embed(x))
        inp = inputs[:1]
        y = mlp(inp)
        a = F.gelu(mlp.fc1(inputs))
        positives = np.sort(a[a > 0].numpy())
        bound = positives[math.ceil(len(positives) * 0.999) - 1]
        h = F.relu(mlp.fc1(inp))
        plain = ((mlp.fc2(h) - y) ** 2).sum(1).mean() / 10
        clamped = ((mlp.fc2(h.clamp(0, float(bound))) - y) ** 2
                   ).sum(1).mean() / 10
    stats = reconstruct_mlps(model, net, lambda m: m(x), cfg)
    first = stats['backbone.blocks.0.mlp']
    assert first['bound'] == pytest.approx(float(bound))
    assert first['loss_first'] == pytest.approx(float(plain + 2 * clamped),
                                                rel=1e-5)
    for name, s in stats.items():
        assert s['loss_last'] < s['loss_first'], (name, s)
    assert all(isinstance(m.act, nn.ReLU) for m in
               (model.backbone.blocks[0].mlp, model.backbone.blocks[1].mlp))
    assert isinstance(net.backbone.blocks[0].mlp.act, nn.GELU)  # untouched


def test_methods_by_name_and_options_override_the_methods_own():
    qdrop, aphq = get_method('qdrop'), get_method('aphq-vit')
    assert qdrop.reconstruction == ReconstructionConfig()
    assert (qdrop.softmax, qdrop.reparameterize) == ('uniform', False)
    assert (aphq.softmax, aphq.reparameterize) == ('aphq-grid', True)
    assert (aphq.act_search, aphq.weight_search, aphq.conv_act_search,
            aphq.conv_weight_search) == ('aphq-act-grid', 'aphq-grid',
                                         'aphq-conv-act-grid',
                                         'aphq-conv-grid')
    assert (aphq.calibration_inputs, aphq.search_after_reparam) == (
        'float', True)
    assert (aphq.reconstruction.loss, aphq.reconstruction.mlp,
            aphq.reconstruction.input_prob,
            aphq.reconstruction.drop_prob,
            aphq.reconstruction.order) == ('aph', True, 0.5, 0.5, 'in_turn')
    cfg = QuantConfig(method='aphq-vit', reconstruction=dict(iters=7))
    assert cfg.reconstruction_config() == ReconstructionConfig(
        iters=7, loss='aph', mlp=True, input_prob=0.5, order='in_turn')
    assert QuantConfig(method='repq-vit').reconstruction_config() is None
    # QDrop ties the input's mix to drop_prob; APHQ-ViT's quant_ratio not
    assert ReconstructionConfig(drop_prob=0.25).keep_input == 0.25
    assert ReconstructionConfig(drop_prob=0.25,
                                input_prob=1.0).keep_input == 1.0
    with pytest.raises(ValueError, match="reconstruction loss: .*'nope'"):
        ReconstructionConfig(loss='nope')
    with pytest.raises(ValueError, match=r'input_prob .* must be in'):
        ReconstructionConfig(input_prob=0)


def test_aphq_vit_end_to_end_restores_relu_and_fine_tuned_weights():
    """MLP reconstruction, calibration and APH block reconstruction on the
    toy; a fresh conversion of the float model (ReLU again) with the saved
    state computes the same, bit for bit; without a task objective the aph
    loss refuses, naming the unit."""
    net, x = toy()
    cfg = QuantConfig(4, 4, 'aphq-vit', first_layer_bits=8,
                      reconstruction=dict(iters=8, mlp_iters=5,
                                          batch_size=2))
    recon = cfg.reconstruction_config()
    quantized = quantize_model(copy.deepcopy(net), cfg)
    assert [n for n, _ in find_mlps(quantized)] == [
        'backbone.blocks.0.mlp', 'backbone.blocks.1.mlp']
    with torch.no_grad():
        reference = net(x)

    def objective(m):
        return ((m(x) - reference) ** 2).sum()

    reconstruct_mlps(quantized, net, lambda m: m(x), recon, objective)
    calibrate(quantized, cfg, lambda: quantized(x))
    units = ['backbone.blocks.0', 'backbone.blocks.1']
    with pytest.raises(ValueError, match=r"loss 'aph' weights "
                       r'backbone\.blocks\.0 by a task objective'):
        reconstruct(copy.deepcopy(quantized), net, lambda m: m(x), units,
                    recon)
    stats = reconstruct(quantized, net, lambda m: m(x), units, recon,
                        task_loss=objective)
    assert list(stats) == units
    expected = quantized(x)
    fresh = quantize_model(copy.deepcopy(net), cfg)
    assert isinstance(fresh.backbone.blocks[1].mlp.act, nn.ReLU)
    restore_quantized(fresh, quantized.state_dict())
    assert torch.equal(fresh(x), expected)
    assert not torch.equal(fresh.backbone.blocks[0].mlp.fc1.weight,
                           net.backbone.blocks[0].mlp.fc1.weight)


def test_use_relu_without_mlps_fails_in_one_line():
    with pytest.raises(ValueError, match='no MLP in the model'):
        use_relu(nn.Sequential(nn.Linear(2, 2)))


def test_rpn_terms_against_scipy_and_the_objective_normalises_each():
    """``C_i``: the binary KL of APHQ-ViT's code (scipy's rel_entr on both
    outcomes, probabilities clamped to [1e-7, 1 - 1e-7], averaged); ``B_i``:
    smooth L1 (beta 1, written out) on the deltas of anchors whose
    reference objectness exceeds 0.7, zeros elsewhere, averaged. The
    objective is the sum of each non-zero term over itself: its value
    counts them (an image without a confident anchor has no box term)."""
    from scipy.special import expit, rel_entr

    from mmcd.engine.task_objective import rpn_objective, rpn_terms
    rng = np.random.default_rng(0)
    ref_logits = rng.normal(0, 2, (2, 3, 4, 5))
    ref_logits[1] = -5  # image 1: no anchor above 0.7
    logits = ref_logits + rng.normal(0, 0.5, ref_logits.shape)
    ref_deltas = rng.normal(0, 1, (2, 12, 4, 5))
    deltas = ref_deltas + rng.normal(0, 2, ref_deltas.shape)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    for i in range(2):
        p = np.clip(expit(logits[i]), 1e-7, 1 - 1e-7)
        r = np.clip(expit(ref_logits[i]), 1e-7, 1 - 1e-7)
        kl = np.mean(rel_entr(r, p) + rel_entr(1 - r, 1 - p))
        mask = np.repeat(expit(ref_logits[i]) > 0.7, 4, axis=0)
        diff = np.abs(deltas[i] * mask - ref_deltas[i] * mask)
        smooth = np.mean(np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5))
        cls, box = rpn_terms([t(logits)], [t(deltas)],
                             [t(ref_logits).sigmoid()], [t(ref_deltas)], i)
        assert float(cls) == pytest.approx(kl, rel=1e-9)
        assert float(box) == pytest.approx(smooth, rel=1e-9)
    assert float(box) == 0  # image 1

    class Detector(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift
            self.rpn_head = lambda feats: ([t(logits) * 0 + feats[0]],
                                           [t(deltas) + self.shift])

        def extract_feat(self, images):
            return [t(ref_logits) + self.shift]

    objective = rpn_objective(Detector(0.0), torch.zeros(2, 3, 4, 4))
    assert float(objective(Detector(0.3))) == 3  # C_0, B_0, C_1


def test_aph_loss_without_an_rpn_is_refused_before_any_work():
    from mmcd.core import ConfigError
    from mmcd.engine.calibration import check_reconstruction
    net, _ = toy()
    with pytest.raises(ConfigError, match="the 'aph' reconstruction loss "
                       r'\(aphq-vit\) weights units by the RPN objective .*'
                       'Vit has no rpn_head'):
        check_reconstruction(net, QuantConfig(method='aphq-vit'))
    check_reconstruction(net, QuantConfig(method='qdrop'))  # lp: no RPN
