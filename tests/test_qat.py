"""QAT core: straight-through gradients against hand-computed cases, StatsQ,
CGA, query-key reparameterization, oscillation statistics, a short QAT run,
bad inputs."""
import math

import pytest
import torch
from torch import nn

from mmcd.core import ConfigError
from mmcd.core.quant import (QAT_METHODS, LsqActQuantizer, LsqWeightQuantizer,
                             MatMul, OscillationTracker, QATConfig, QATMethod,
                             QKReparam, StatsWeightQuantizer, activate_qat,
                             fake_quantizers, freeze_confident_weights,
                             initialize_qat, mask_frozen_gradients,
                             prepare_qat, restore_frozen_weights)
from mmcd.core.quant.qat import trainable_weight_layers
from mmcd.models.backbones.vit_det import Attention, ViTDet


def test_lsq_act_quantizer_ste_gradients():
    q = LsqActQuantizer(2)  # levels 0..3
    q.set_params(torch.tensor(0.5), torch.tensor(1.0))  # step .5, offset -.5
    assert q.step.item() == 0.5 and q.offset.item() == -0.5
    x = torch.tensor([-1.0, 0.3, 2.0], requires_grad=True)
    out = q(x)
    # u = (x + .5) / .5 = [-1, 1.6, 5] -> clamp [0, 1.6, 3] -> round [0, 2, 3]
    torch.testing.assert_close(out, torch.tensor([-0.5, 0.5, 1.0]))
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 0.0]))
    # d/ds: lower clip 0, inside round(u) - u = 0.4, upper clip 3; LSQ
    # gradient scale 1 / sqrt(numel * Qp) = 1 / 3
    torch.testing.assert_close(q.step.grad, torch.tensor(3.4 / 3))
    # d/d offset: 0 inside, 1 where clipped
    torch.testing.assert_close(q.offset.grad, torch.tensor(2.0))


def test_lsq_plus_function_matches_the_autograd_composition():
    from mmcd.core.quant.qat_quantizers import (LsqPlusFunction, round_ste,
                                                scale_grad)
    torch.manual_seed(0)
    x = (torch.randn(64, 8) * 2).requires_grad_()
    step = torch.tensor(0.3, requires_grad=True)
    offset = torch.tensor(-1.0, requires_grad=True)
    grad = torch.randn(64, 8)
    factor = 1 / math.sqrt(x.numel() * 15)
    LsqPlusFunction.apply(x, step, offset, 15, factor).backward(grad)
    fused = x.grad.clone(), step.grad.clone(), offset.grad.clone()
    for t in (x, step, offset):
        t.grad = None
    s = scale_grad(step, factor)
    u = torch.clamp((x - offset) / s, 0, 15)
    (round_ste(u) * s + offset).backward(grad)
    for a, b in zip(fused, (x.grad, step.grad, offset.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lsq_act_quantizer_keeps_repq_channel_shift():
    q = LsqActQuantizer(8)
    q.set_params(torch.tensor(0.01), torch.tensor(128.0),
                 channel_offset=torch.tensor([0.0, 3.0]))
    x = torch.tensor([[0.2, -2.9]])
    # the shift moves channel 1 into range and is removed afterwards
    torch.testing.assert_close(q(x), x, atol=0.005, rtol=0)


def test_lsq_weight_quantizer_ste_gradients():
    q = LsqWeightQuantizer(3, channels=1)  # levels -4..3
    with torch.no_grad():
        q.step.fill_(0.5)
    q.initialized.fill_(True)
    q.set_state('quant')
    w = torch.tensor([[0.2, -0.7, 1.4, 3.0]], requires_grad=True)
    out = q(w)
    # u = [0.4, -1.4, 2.8, 6] -> clamp to [-4, 3] -> round [0, -1, 3, 3]
    torch.testing.assert_close(out, torch.tensor([[0.0, -0.5, 1.5, 1.5]]))
    out.sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # round(u) - u inside: -0.4, 0.4, 0.2; clipped at Qp = 3
    expected = (-0.4 + 0.4 + 0.2 + 3) / math.sqrt(4 * 3)
    torch.testing.assert_close(q.step.grad, torch.tensor([expected]))


def test_lsq_weight_init_is_lsq_paper_rule():
    q = LsqWeightQuantizer(4, channels=2)
    w = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    q.finalize(w)
    torch.testing.assert_close(q.step, torch.tensor([4.0, 1.0]) /
                               math.sqrt(7))


def test_statsq_scale_levels_and_gradient():
    q = StatsWeightQuantizer(2)
    q.finalize(None)
    q.set_state('quant')
    w = torch.tensor([[0.1, -0.3, 0.5, -0.9], [1.0, 1.0, -1.0, 0.2]],
                     requires_grad=True)
    # row 0: alpha = 2 mean|w| = 0.9, step alpha / 2 = 0.45, levels
    # +-0.225, +-0.675; u = w / step - 1/2 = [-.28, -1.17, .61, -2.5]
    step = q.step_for(w).flatten()
    torch.testing.assert_close(step, torch.tensor([0.45, 0.8]))
    out = q(w)
    torch.testing.assert_close(out[0], torch.tensor([0.225, -0.225, 0.675,
                                                     -0.675]))
    assert (out != 0).all()  # no zero level
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    (out * upstream).sum().backward()
    # -0.9 / 0.45 - 0.5 = -2.5 lies outside [-2, 1] and is clipped in the
    # forward pass, yet OFQ's identity STE gives it its gradient too (the
    # step, a statistic, is not differentiated): dw^/dw = 1 everywhere
    torch.testing.assert_close(w.grad, upstream)


def test_statsq_levels_are_symmetric_for_every_bit_width():
    for bits in range(2, 9):
        q = StatsWeightQuantizer(bits)
        q.finalize(None)
        q.set_state('quant')
        w = torch.linspace(-3, 3, 4001)[None]
        levels = q(w).unique()
        assert levels.numel() == 2**bits
        torch.testing.assert_close(levels, -levels.flip(0))


def test_boundary_distance_and_codes():
    q = LsqWeightQuantizer(3, channels=1)  # levels -4..3
    with torch.no_grad():
        q.step.fill_(1.0)
    w = torch.tensor([[0.0, 0.499, 0.503, 1.2, 5.0, -4.6]])
    torch.testing.assert_close(
        q.boundary_distance(w),
        torch.tensor([[0.5, 0.001, 0.003, 0.3, 2.5, 1.1]]))
    assert q.codes(w).tolist() == [[0, 0, 1, 1, 3, -4]]


class TinyViT(nn.Module):
    """A two-block ViTDet with a linear read-out."""

    def __init__(self):
        super().__init__()
        self.backbone = ViTDet(img_size=32, patch_size=8, embed_dims=32,
                               depth=2, num_heads=2, window_size=2,
                               global_attn_indexes=(1, ), drop_path_rate=0.)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((2, 3)))


def qat_model(method='ofq', bits=4, **kwargs):
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(16, 3, 32, 32)
    cfg = QATConfig(bits, bits, method, **kwargs)
    prepare_qat(model, cfg)
    initialize_qat(model, cfg, lambda: model(x[:8]))
    return model, x, cfg


def ofq_frozen(weight, bits, boundary_range):
    """OFQ's CGA frozen set, written from its cga.py
    (``freeze_outside_boundary_weight_idx``) in float64: StatsQ's step
    ``alpha = 2 mean|W_row|``, ``b = clamp(W / alpha, -1, 1) 2^(b-1) - 1/2``;
    a weight stays trainable when ``b`` lies within ``boundary_range`` of a
    rounding boundary ``i + 1/2`` for an integer ``i`` from the least to
    (excluding) the largest rounded ``b`` of the tensor."""
    w = weight.detach().double().flatten(1)  # a convolution: rows
    alpha = 2 * w.abs().mean(1, keepdim=True)
    b = torch.clamp(w / alpha, -1.0, 1.0 - 1e-6) * 2**(bits - 1) - 0.5
    rounded = torch.round(b)
    trainable = torch.zeros_like(b, dtype=torch.bool)
    for i in range(int(rounded.min()), int(rounded.max())):
        trainable |= ((b - i) <= 0.5 + boundary_range) & (
            (b - i) >= 0.5 - boundary_range)
    return (~trainable).view(weight.shape)


def test_cga_freezes_the_weights_ofq_freezes():
    """Every OFQ-quantized layer freezes exactly the weights OFQ's boundary
    formula freezes (the W_Q / W_K rows, quantized only through their
    product, excepted)."""
    model, x, _ = qat_model('ofq')
    for boundary_range in (0.005, 0.05):
        counts = freeze_confident_weights(model, boundary_range)
        checked = 0
        for name, layer in model.named_modules():
            if not isinstance(getattr(layer, 'weight_quantizer', None),
                              StatsWeightQuantizer) or isinstance(
                                  layer, QKReparam):
                continue
            expected = ofq_frozen(layer.weight, 4, boundary_range)
            if name.endswith('attn.qkv'):  # q, k rows: the product's
                expected[:2 * layer.in_features] = False
            assert torch.equal(layer.weight_quantizer.frozen_mask,
                               expected), name
            checked += expected.numel()
        total = sum(m.weight.numel() for m in trainable_weight_layers(model)
                    if hasattr(m, 'weight'))
        assert checked == counts['total'] == total
        assert 0 < int(counts['frozen']) < total


def test_cga_restores_exactly_the_frozen_weights():
    model, x, _ = qat_model('lsq')
    layer = model.backbone.blocks[0].mlp.fc1
    freeze_confident_weights(model, boundary_range=0.05)
    confident = layer.weight_quantizer.frozen_mask.clone()
    assert 0 < (~confident).sum() < confident.sum()
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        restore_frozen_weights(model)
    after = layer.weight.detach()
    assert torch.equal(after[confident], before[confident])
    assert (after[~confident] != before[~confident]).all()


@pytest.mark.parametrize('method', ['lsq', 'ofq'])
def test_cga_keeps_frozen_gradients_from_the_optimizer_as_ofq(method):
    """Through MMEngine's OptimWrapper (AdamW, clip_grad, 2 accumulated
    micro-batches) the frozen weights' gradients reach neither the clipping
    norm nor AdamW's moments: equal, weights and moments, to OFQ's loop
    written here (cga.py: backward, ``grad = grad * (1 - frozen)``, clip,
    ``optimizer.step()``, frozen weights written back)."""
    import copy

    from mmengine.optim import OptimWrapper
    model, x, _ = qat_model(method)
    reference = copy.deepcopy(model)
    handles = mask_frozen_gradients(model)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           clip_grad=dict(max_norm=0.01),
                           accumulative_counts=2)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    layers = [(a, b) for a, b in zip(trainable_weight_layers(model),
                                     trainable_weight_layers(reference))
              if hasattr(a, 'weight')]
    for _ in range(4):
        freeze_confident_weights(model, boundary_range=0.2)
        for half in (x[:8], x[8:]):
            wrapper.update_params(model(half).square().mean())
        restore_frozen_weights(model)
        # OFQ's iteration on the reference, same frozen sets
        optimizer.zero_grad()
        for half in (x[:8], x[8:]):
            (reference(half).square().mean() / 2).backward()
        saved = {}
        for a, b in layers:
            frozen = a.weight_quantizer.frozen_mask
            b.weight.grad = b.weight.grad * ~frozen
            saved[id(b)] = (frozen, b.weight.detach().clone())
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.01)
        optimizer.step()
        with torch.no_grad():
            for _, b in layers:
                frozen, value = saved[id(b)]
                b.weight.copy_(torch.where(frozen, value, b.weight))
    assert any(a.weight_quantizer.frozen_mask.any() for a, _ in layers)
    for a, b in layers:
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-7)
        ours = wrapper.optimizer.state[a.weight]
        theirs = optimizer.state[b.weight]
        for key in ('exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6,
                                       atol=1e-12)
    for handle in handles:
        handle.remove()


def test_cga_decides_the_frozen_set_anew_every_iteration():
    """A weight that moves out of the boundary range is frozen at the next
    iteration; a frozen one that gets near a boundary is released."""
    model, _, _ = qat_model('lsq')
    layer = model.backbone.blocks[0].mlp.fc1
    step = float(layer.weight_quantizer.step[0])
    with torch.no_grad():  # row 0: level boundaries at (k + 1/2) * step
        layer.weight[0, 0] = 0.5 * step + 0.001 * step  # 0.001 steps away
        layer.weight[0, 1] = 0.2 * step                 # 0.3 steps away
    freeze_confident_weights(model, boundary_range=0.005)
    mask = layer.weight_quantizer.frozen_mask
    assert (bool(mask[0, 0]), bool(mask[0, 1])) == (False, True)
    with torch.no_grad():  # the update moved them: 0 out, 1 in
        layer.weight[0, 0] = 0.3 * step
        layer.weight[0, 1] = 1.5 * step - 0.002 * step
    counts = freeze_confident_weights(model, boundary_range=0.005)
    mask = layer.weight_quantizer.frozen_mask
    assert (bool(mask[0, 0]), bool(mask[0, 1])) == (True, False)
    assert isinstance(counts['frozen'], torch.Tensor)  # no host sync


def test_cga_leaves_the_query_key_rows_to_the_product():
    """Under query-key reparameterization W_Q / W_K rows are quantized only
    through W_Q^T W_K: the qkv weight quantizer never freezes them."""
    model, _, _ = qat_model('ofq')
    freeze_confident_weights(model, boundary_range=0.005)
    for block in model.backbone.blocks:
        qkv = block.attn.qkv
        assert block.attn.qk_reparam is not None
        mask = qkv.weight_quantizer.frozen_mask
        channels = qkv.in_features
        assert not mask[:2 * channels].any()
        assert mask[2 * channels:].float().mean() > 0.5  # W_V rows freeze


def test_qk_reparam_gives_the_float_logits():
    torch.manual_seed(0)
    qkv = nn.Linear(12, 36)
    x = torch.randn(2, 5, 12)
    scale = 6**-0.5
    q, k, _ = qkv(x).view(2, 5, 3, 2, 6).permute(2, 0, 3, 1, 4)
    expected = (q * scale) @ k.transpose(-2, -1)
    quantizer = StatsWeightQuantizer(4)  # off: state 'fp'
    logits = QKReparam(qkv, 2, quantizer)(x, MatMul('qk'), scale)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def ofq_statsq(weight, bits):
    """OFQ's StatsQuantizer forward (statsq.py) in float64: per row
    ``alpha = 2 mean|w|``, ``n = 2^(b-1)``,
    ``alpha (round(clamp(w / alpha, -1, 1) n - 1/2) + 1/2) / n``."""
    w = weight.double()
    alpha = 2 * w.abs().mean(1, keepdim=True)
    n = 2**(bits - 1)
    clipped = torch.clamp(w / alpha, -1.0, 1.0 - 1e-6)
    return alpha * (torch.round(clipped * n - 0.5) + 0.5) / n


@pytest.mark.parametrize('bias', [False, True])
def test_qk_reparam_logits_are_x_statsq_of_the_product_x(bias):
    """The quantized logits of head h are ``scale x StatsQ(W_Qh^T W_Kh)
    x^T`` (OFQ's attention.py, which has no q/k bias), plus with biases the
    exact expansion ``scale (x W_Qh^T b_Kh + b_Qh W_Kh x^T + b_Qh.b_Kh)``
    written from q = x W_Q^T + b_Q, k = x W_K^T + b_K."""
    torch.manual_seed(0)
    heads, channels, tokens, bits = 2, 12, 5, 4
    qkv = nn.Linear(channels, 3 * channels, bias=bias)
    x = torch.randn(2, tokens, channels)
    scale = (channels // heads)**-0.5
    quantizer = StatsWeightQuantizer(bits)
    quantizer.finalize(qkv.weight)
    quantizer.set_state('quant')
    logits = QKReparam(qkv, heads, quantizer)(x, MatMul('qk'), scale)

    xd, wd = x.double(), qkv.weight.detach().double()
    w_q, w_k = (wd[i * channels:(i + 1) * channels].view(heads, -1, channels)
                for i in range(2))
    product = ofq_statsq((w_q.transpose(1, 2) @ w_k).reshape(-1, channels),
                         bits).view(heads, channels, channels)
    expected = torch.einsum('bnc,hcd,bmd->bhnm', xd, product, xd)
    if bias:
        bd = qkv.bias.detach().double()
        b_q, b_k = bd[:channels].view(heads, -1), bd[channels:2 * channels]
        b_k = b_k.view(heads, -1)
        q_bias_k = torch.einsum('hd,hdc,bmc->bhm', b_q, w_k, xd)
        x_k_bias = torch.einsum('bnc,hdc,hd->bhn', xd, w_q, b_k)
        expected = expected + q_bias_k[:, :, None, :] + \
            x_k_bias[..., None] + (b_q * b_k).sum(-1)[None, :, None, None]
    torch.testing.assert_close(logits.double(), expected * scale,
                               atol=1e-5, rtol=1e-5)
    # and the product was quantized: the float logits differ
    q, k, _ = qkv(x).view(2, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    assert (logits - (q * scale) @ k.transpose(-2, -1)).abs().max() > 1e-2


def test_qk_reparam_in_vitdet_attention_is_exact_when_off():
    torch.manual_seed(0)
    attn = Attention(16, 2, (4, 4))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(2, 4, 4, 16)
    expected = attn(x)
    attn.qk_reparam = QKReparam(attn.qkv, 2, StatsWeightQuantizer(4))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_qk_reparam_quantizes_the_product():
    model, x, _ = qat_model('ofq')
    attn = model.backbone.blocks[0].attn
    reparam = attn.qk_reparam
    assert reparam.weight_quantizer.state == 'quant'
    product = reparam.product()
    assert product.shape == (2 * 32, 32)
    # the logits use the quantized product: a changed product quantizer
    # changes the output
    out = model(x)
    with torch.no_grad():
        attn.qkv.weight[:32].mul_(1.5)
    assert not torch.allclose(model(x), out)


def test_short_qat_run_lowers_the_quantized_loss():
    model, x, _ = qat_model('ofq')
    target = torch.randn(16, 4)
    learnable = [p for n, p in model.named_parameters() if 'quantizer' in n]
    assert learnable  # LSQ+ steps and offsets
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = (model(x) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # the quantizer parameters received gradients and moved
    assert all(p.grad is not None for p in learnable)


def test_prepared_model_is_the_float_model_until_calibrated():
    torch.manual_seed(0)
    model = TinyViT()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    prepare_qat(model, QATConfig(4, 4, 'ofq'))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match='not calibrated'):
        activate_qat(model)


def test_qat_state_round_trips_through_a_state_dict():
    model, x, cfg = qat_model('lsq')
    freeze_confident_weights(model)
    model.eval()
    expected = model(x)
    torch.manual_seed(1)
    fresh = TinyViT()
    prepare_qat(fresh, cfg)
    fresh.load_state_dict(model.state_dict())  # strict: every key matches
    assert activate_qat(fresh) == sum(q.calibrated
                                      for q in fake_quantizers(model))
    fresh.eval()
    torch.testing.assert_close(fresh(x), expected)
    layer = fresh.backbone.blocks[1].mlp.fc2
    assert layer.weight_quantizer.frozen_mask.any()


def test_oscillation_tracker_counts_weights_that_changed_level():
    model, _, _ = qat_model('lsq')
    tracker = OscillationTracker(model)
    layer = model.backbone.blocks[0].mlp.fc1
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        original = layer.weight[:1, :10].clone()
        # levels below the top one move up by exactly one level ...
        movable = int((quantizer.codes(layer.weight)[0, :10] <
                       quantizer.qp).sum())
        layer.weight[0, :10] += quantizer.step[0]
    tracker.update()
    with torch.no_grad():
        layer.weight[:1, :10] = original  # ... and back: an oscillation
    tracker.update()
    total = sum(m.weight.numel() for m in trainable_weight_layers(model))
    assert movable > 5
    assert tracker.pop_fraction() == pytest.approx(movable / total)
    assert tracker.pop_fraction() == 0.0  # a new window


def test_a_registered_qat_method_is_one_object():
    """LSQ weights with OFQ's query-key reparameterization, by name."""
    method = QAT_METHODS.register(QATMethod('test-lsq-qk', 'lsq',
                                            qk_reparam=True))
    try:
        model = TinyViT()
        prepare_qat(model, QATConfig(4, 4, 'test-lsq-qk'))
        attn = model.backbone.blocks[0].attn
        assert isinstance(attn.qk_reparam.weight_quantizer,
                          LsqWeightQuantizer)
        assert isinstance(attn.qkv.weight_quantizer, LsqWeightQuantizer)
    finally:
        QAT_METHODS.unregister(method.name)
    with pytest.raises(ValueError, match="weight_quantizer: unknown QAT "
                       "weight quantizer 'pact'; registered: lsq, statsq"):
        QATMethod('pact', 'pact')


def test_bad_inputs():
    with pytest.raises(ValueError, match='bits must be an integer in 2..8'):
        QATConfig(9, 4)
    with pytest.raises(ValueError, match='bits must be an integer in 2..8'):
        QATConfig(4, 1)
    with pytest.raises(ValueError, match="unknown QAT method 'pact'; "
                       'registered: lsq, ofq'):
        QATConfig(4, 4, 'pact')
    with pytest.raises(ValueError, match='needs a QAT model'):
        freeze_confident_weights(TinyViT())
    with pytest.raises(ValueError, match=r'in \(0, 0.5\)'):
        freeze_confident_weights(TinyViT(), boundary_range=0.5)
    with pytest.raises(ValueError, match='not prepared for QAT'):
        activate_qat(TinyViT())
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match='set qk_reparam=False'):
        prepare_qat(mlp, QATConfig(4, 4, 'ofq'))
    torch.manual_seed(0)
    model = TinyViT()
    prepare_qat(model, QATConfig(4, 4, 'lsq'))
    with pytest.raises(RuntimeError, match='not calibrated'):
        freeze_confident_weights(model)
