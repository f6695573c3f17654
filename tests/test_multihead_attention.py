"""The quantized twin of ``nn.MultiheadAttention``: PyTorch's function in
float (masks, key padding, ``batch_first`` both ways, separate key/value
dims, unbatched inputs), both products and the post-softmax weights
quantized once calibrated, the fused projection shared not copied, and a
one-line refusal of the options it cannot quantize."""
import copy

import pytest
import torch
from torch import nn

from mmcd.core.quant import (QuantConfig, QuantLinear,
                             QuantMultiheadAttention, calibrate,
                             quantize_model)
from mmcd.core.quant.convert import precision_plan


class Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, *args, **kwargs):
        return self.attn(*args, **kwargs)


def converted(mha, bits=8, method='minmax'):
    return quantize_model(copy.deepcopy(Holder(mha)),
                          QuantConfig(bits, bits, method))


def inputs(batch_first, length=5, source=7, batch=3, kdim=32, vdim=32):
    def tokens(count, dim):
        shape = (batch, count, dim) if batch_first else (count, batch, dim)
        return torch.randn(shape)
    return tokens(length, 32), tokens(source, kdim), tokens(source, vdim)


@pytest.mark.parametrize('batch_first', [False, True])
@pytest.mark.parametrize('mask', ['none', 'bool', 'float', 'per-head'])
def test_twin_is_pytorchs_function_in_float(batch_first, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=0.1,
                                batch_first=batch_first).eval()
    twin = converted(mha).attn
    assert isinstance(twin, QuantMultiheadAttention) and not twin.training
    query, key, value = inputs(batch_first)
    attn_mask = {'none': None,
                 'bool': torch.rand(5, 7) > 0.6,
                 'float': torch.randn(5, 7),
                 'per-head': torch.rand(3 * 4, 5, 7) > 0.6}[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = False  # no fully masked row
    padding = torch.rand(3, 7) > 0.6
    padding[:, 0] = False
    if attn_mask is not None and attn_mask.is_floating_point():
        padding = torch.zeros(3, 7).masked_fill(padding, -torch.inf)
    for average in (True, False):
        expected = mha(query, key, value, key_padding_mask=padding,
                       attn_mask=attn_mask, average_attn_weights=average)
        found = twin(query, key, value, key_padding_mask=padding,
                     attn_mask=attn_mask, average_attn_weights=average)
        for a, b in zip(found, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    out, weights = twin(query, key, value, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, mha(query, key, value)[0], rtol=0,
                               atol=1e-6)


def test_twin_with_other_key_value_dims_and_unbatched_inputs():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=16, bias=False).eval()
    twin = converted(mha).attn
    query, key, value = inputs(False, kdim=24, vdim=16)
    torch.testing.assert_close(twin(query, key, value),
                               mha(query, key, value), rtol=0, atol=1e-6)
    torch.testing.assert_close(twin(query[:, 0], key[:, 0], value[:, 0]),
                               mha(query[:, 0], key[:, 0], value[:, 0]),
                               rtol=0, atol=1e-6)


def test_projections_share_the_fused_weight():
    mha = nn.MultiheadAttention(32, 4)
    twin = QuantMultiheadAttention(mha, 8, 'minmax')
    rows = mha.in_proj_weight.detach()
    for i, proj in enumerate((twin.q_proj, twin.k_proj, twin.v_proj)):
        assert proj.weight.data_ptr() == rows[32 * i].data_ptr()
        assert torch.equal(proj.weight, rows[32 * i:32 * (i + 1)])
    assert twin.out_proj is mha.out_proj


def test_twin_keeps_the_parameters_and_their_names():
    """The converted module holds nn.MultiheadAttention's own parameters
    under their names (a float checkpoint loads into a QAT model), and the
    projections own none; separate key/value dims too."""
    from mmcd.core.quant import QATConfig, prepare_qat
    for kwargs in (dict(), dict(kdim=24, vdim=20)):
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(32, 4, **kwargs)
        float_state = Holder(mha).state_dict()
        model = copy.deepcopy(Holder(mha))
        prepare_qat(model, QATConfig(4, 4, qk_reparam=False))
        params = dict(model.named_parameters())
        assert set(float_state) <= set(model.state_dict())
        assert {k for k in params if not k.endswith('_quantizer.step') and
                'quantizer' not in k} == set(float_state)
        # a float checkpoint sets every weight of the QAT model
        fresh = copy.deepcopy(model)
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        missing = fresh.load_state_dict(float_state, strict=False)
        assert not missing.missing_keys or all(
            'quantizer' in k for k in missing.missing_keys)
        for key, value in float_state.items():
            assert torch.equal(fresh.state_dict()[key], value), key
        query, key, value = inputs(False, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(fresh(query, key, value)[0],
                                       mha(query, key, value)[0])


def test_cd_pairs_and_cga_on_the_converted_twin():
    """CD's nn.MultiheadAttention rules find the converted twin's pairs
    (in_proj_weight is still there), and CGA's frozen weights get zero
    gradient in the fused parameter's rows they occupy."""
    from mmcd.core.architectures.detr import DETR_RULES
    from mmcd.core.pairs import discover_pairs
    from mmcd.core.quant import (QATConfig, freeze_confident_weights,
                                 initialize_qat, mask_frozen_gradients,
                                 prepare_qat)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Holder(nn.MultiheadAttention(32, 4))

    torch.manual_seed(0)
    model = nn.Sequential(Layer())
    float_pairs = discover_pairs(model, DETR_RULES)
    prepare_qat(model, QATConfig(4, 4, qk_reparam=False))
    x = torch.randn(5, 3, 32)

    def forward():
        return model[0].self_attn(x, x, x)[0]
    initialize_qat(model, QATConfig(4, 4, qk_reparam=False), forward)
    pairs = discover_pairs(model, DETR_RULES)
    assert [p.name for p in pairs] == [p.name for p in float_pairs] == [
        '0.self_attn.vo', '0.self_attn.qk']
    in_proj = model[0].self_attn.attn.in_proj_weight
    assert all(p.first_matrix is in_proj for p in pairs)
    freeze_confident_weights(model, boundary_range=0.2)
    handles = mask_frozen_gradients(model)
    forward().square().sum().backward()
    v_proj = model[0].self_attn.attn.v_proj
    frozen = v_proj.weight_quantizer.frozen_mask
    assert frozen.any() and not frozen.all()
    v_rows = in_proj.grad[64:96]
    assert torch.all(v_rows[frozen] == 0)
    assert (v_rows[~frozen] != 0).any()
    for handle in handles:
        handle.remove()


def test_calibrated_twin_quantizes_both_products_and_the_weights():
    """At W4A4 the attention weights that reach ``attn @ v`` lie on the
    post-softmax quantizer's grid, and ``q`` and ``k`` reach ``q k^T`` as
    scaled per-head projections; the plan lists the six quantized parts."""
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(32, 4).eval()
    model = converted(mha, bits=4)
    twin = model.attn
    query, key, value = inputs(False)
    cfg = QuantConfig(4, 4, 'minmax')
    calibrate(model, cfg, lambda: model(query, key, value))
    seen = {}
    hooks = [twin.av_matmul.quantizer_a.register_forward_hook(
        lambda m, i, o: seen.setdefault('weights', o)),
        twin.qk_matmul.quantizer_a.register_forward_hook(
        lambda m, i, o: seen.setdefault('q', i[0]))]
    with torch.no_grad():
        out, _ = twin(query, key, value)
    for hook in hooks:
        hook.remove()
    step = float(twin.av_matmul.quantizer_a.scale)
    levels = seen['weights'] / step
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert levels.round().unique().numel() <= 16  # 4-bit grid
    q = twin.q_proj(query).reshape(5, 3 * 4, 8).transpose(0, 1) / 8 ** 0.5
    torch.testing.assert_close(seen['q'], q)
    with torch.no_grad():
        float_out, _ = mha(query, key, value)
    error = float((out - float_out).norm() / float_out.norm())
    assert 0 < error < 0.5  # quantized, and still the same attention
    plan = {row['name']: row for row in precision_plan(model, cfg)}
    for part in ('q_proj', 'k_proj', 'v_proj', 'out_proj', 'qk_matmul',
                 'av_matmul'):
        assert plan[f'attn.{part}']['quantized'], part
    assert all(isinstance(getattr(twin, p), QuantLinear)
               for p in ('q_proj', 'k_proj', 'v_proj', 'out_proj'))


@pytest.mark.parametrize('option', ['add_bias_kv', 'add_zero_attn'])
def test_unsupported_options_are_named_with_what_to_do(option):
    mha = nn.MultiheadAttention(32, 4, **{option: True})
    with pytest.raises(ValueError, match=rf'{option}=True is not supported.*'
                       r"skip=\[r'NAME'\]"):
        converted(mha)


def test_detr_attention_kinds_convert_and_say_what_stays_float():
    """mmcv's MultiheadAttention (around nn.MultiheadAttention) gets the
    twin; MultiScaleDeformableAttention keeps its sampling in float (a
    registered float kernel) with its four projections quantized; the plan
    says so; in float the converted modules compute what they did."""
    import mmcd.models  # noqa: F401  (registers mmcv's deformable kind)
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    from mmcv.ops import MultiScaleDeformableAttention

    from mmcd.core.quant.convert import format_precision_plan

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = MultiheadAttention(32, 4, batch_first=True)
            self.cross_attn = MultiScaleDeformableAttention(
                32, 4, num_levels=1, num_points=2, batch_first=True)

        def forward(self, query, value, shapes, reference):
            query = self.self_attn(query)
            return self.cross_attn(
                query, value=value, reference_points=reference,
                spatial_shapes=shapes,
                level_start_index=torch.tensor([0]))

    torch.manual_seed(3)
    layer = Layer().eval()
    args = (torch.randn(2, 6, 32), torch.randn(2, 16, 32),
            torch.tensor([[4, 4]]), torch.rand(2, 6, 1, 2))
    cfg = QuantConfig(4, 4, 'repq-vit')
    converted_layer = quantize_model(copy.deepcopy(layer), cfg)
    assert isinstance(converted_layer.self_attn.attn, QuantMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(converted_layer(*args), layer(*args),
                                   rtol=0, atol=1e-6)
    plan = {row['name']: row for row in precision_plan(converted_layer, cfg)}
    assert not plan['cross_attn']['quantized']
    assert plan['cross_attn']['why'].startswith('float kernel: deformable')
    for proj in ('sampling_offsets', 'attention_weights', 'value_proj',
                 'output_proj'):
        assert plan[f'cross_attn.{proj}']['quantized'], proj
    assert format_precision_plan(list(plan.values())).startswith(
        '10 quantized layer(s), 0 weighted layer(s) in float, 1 attention '
        'kernel(s) in float')
