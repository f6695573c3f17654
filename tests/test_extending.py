"""docs/en/extending.md, as a user follows it: every code block that starts
with ``# <file>.py`` is written to a temporary folder, outside the package,
and loaded the way the page says (a config's ``custom_imports`` through the
tools, or an import); ``{MMCD}`` is the checkout. The configs' ``_base_``
is swapped for the micro toy set's config (the same model on 8 images), the
only change to what the page shows."""
import importlib
import json
import os
import os.path as osp
import re
import sys

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

from conftest import REPO, micro_config, run_bounded

PAGE = osp.join(REPO, 'docs', 'en', 'extending.md')
CD_TOY_CONFIG = osp.join(REPO, 'configs', 'toy',
                         'mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py')


def page_files():
    """``{file name: content}`` of the page's ``# <file>.py`` blocks."""
    text = open(PAGE).read()
    blocks = re.findall(r'```python\n# (\w+\.py)\n(.*?)```', text, re.S)
    return {name: body.replace('{MMCD}', REPO) for name, body in blocks}


def write_page_files(folder, base_configs=None):
    """The page's files in ``folder``; a config's ``_base_`` line replaced
    by ``base_configs[file name]`` when given."""
    for name, body in page_files().items():
        if base_configs and name in base_configs:
            body = re.sub(r"^_base_ = .*$", f'_base_ = {base_configs[name]!r}',
                          body, flags=re.M)
        with open(osp.join(folder, name), 'w') as f:
            f.write(body)


@pytest.fixture
def page_module(tmp_path):
    """``load(name, *registries)`` imports a page file as a user's module;
    what it registered in ``registries`` is undone afterwards."""
    write_page_files(str(tmp_path))
    sys.path.insert(0, str(tmp_path))
    undo = []

    def load(name, *registries):
        before = [set(registry) for registry in registries]
        module = importlib.import_module(name)
        undo.append((name, [(registry, set(registry) - keys)
                            for registry, keys in zip(registries, before)]))
        return module

    yield load
    sys.path.remove(str(tmp_path))
    for name, added in undo:
        sys.modules.pop(name, None)
        for registry, keys in added:
            for key in keys:
                registry.unregister(key)


def test_the_page_has_every_extension_kind():
    assert set(page_files()) == {
        'my_quant.py', 'my_config.py', 'my_qat.py', 'my_regularizer.py',
        'my_train_config.py', 'my_backbone_spec.py', 'my_attention.py',
        'my_recon_loss.py', 'my_profile.py', 'my_matmul_search.py'}


def tool_env(folder):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        [str(folder), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    return env


def test_a_ptq_method_from_outside_through_tools_test(micro_run, tmp_path):
    config, ckpt = micro_run
    write_page_files(str(tmp_path), {'my_config.py': config})
    code, out = run_bounded(
        [sys.executable, 'tools/test.py', str(tmp_path / 'my_config.py'),
         ckpt, '--quant', 'w6a6', '--quant-method', 'mean3std-log2',
         '--calib-images', '4', '--work-dir', str(tmp_path / 'work')],
        timeout=300, env=tool_env(tmp_path))
    assert code == 0, out[-3000:]
    assert 'W6A6 mean3std-log2' in out
    results = json.load(open(tmp_path / 'work' / 'quant_results.json'))
    assert results['method'] == 'mean3std-log2'
    # without the config's custom_imports the name is refused, listing the
    # registered ones
    code, out = run_bounded(
        [sys.executable, 'tools/test.py', config, ckpt, '--quant', 'w6a6',
         '--quant-method', 'mean3std-log2', '--work-dir',
         str(tmp_path / 'work2')], timeout=300, env=tool_env(tmp_path))
    assert code != 0
    assert "unknown quantization method 'mean3std-log2'; registered: " \
        'aphq-vit, dopq-vit, minmax, qdrop, repq-vit' in \
        out.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize('tool', ['tools/analysis/sensitivity.py',
                                  'tools/deploy/export_onnx.py'])
def test_a_ptq_method_from_outside_through_the_ptq_tools(micro_run, tmp_path,
                                                         tool):
    config, ckpt = micro_run
    write_page_files(str(tmp_path), {'my_config.py': config})
    code, out = run_bounded(
        [sys.executable, tool, str(tmp_path / 'my_config.py'), ckpt,
         '--quant', 'w6a6', '--method', 'mean3std-log2', '--calib-images',
         '4', '--out-dir', str(tmp_path / 'out')],
        timeout=600, env=tool_env(tmp_path))
    assert code == 0, out[-3000:]
    assert 'mean3std-log2' in out


def test_the_new_parts_compute_their_formulas(page_module):
    from mmcd.core.quant import (POST_SOFTMAX_QUANTIZERS, QUANT_METHODS,
                                 RANGE_SEARCHES, UniformQuantizer)
    mine = page_module('my_quant', QUANT_METHODS, POST_SOFTMAX_QUANTIZERS,
                       RANGE_SEARCHES)
    x = torch.randn(4000, dtype=torch.float64) * 2 + 1
    q = UniformQuantizer(8, None, 'mean-3std')
    q.set_state('calib')
    q(x)
    lo, hi = 1 - 3 * x.std(), 1 + 3 * x.std()  # mean ~1, std ~2
    assert float(q.scale) == pytest.approx(float(hi - lo) / 255, rel=0.05)
    log2 = mine.Log2Quantizer(3)
    log2._set_params(torch.tensor(1.0))
    log2.set_state('quant')
    values = torch.tensor([1.0, 0.6, 0.26, 0.01, 2**-9, 0.0])
    # 2^-round(-log2 x): 1, 2^-1 (0.74 -> 1), 2^-2 (1.94), 2^-7 (6.6),
    # 2^-9 is past the 8 levels 2^0..2^-7 -> 0, 0 -> 0
    assert log2(values).tolist() == [1.0, 0.5, 0.25, 2**-7, 0.0, 0.0]


def test_a_qat_method_from_outside(page_module):
    from test_qat import TinyViT

    from mmcd.core.quant import (QAT_METHODS, LsqWeightQuantizer, QATConfig,
                                 prepare_qat)
    page_module('my_qat', QAT_METHODS)
    model = TinyViT()
    prepare_qat(model, QATConfig(4, 4, 'lsq-qk'))
    attn = model.backbone.blocks[0].attn
    assert isinstance(attn.qk_reparam.weight_quantizer, LsqWeightQuantizer)
    assert isinstance(attn.qkv.weight_quantizer, LsqWeightQuantizer)


def test_a_regularizer_from_outside_through_tools_train(micro_data_root,
                                                        tmp_path):
    base = micro_config(micro_data_root, tmp_path / 'work',
                        base=CD_TOY_CONFIG)
    base.dump(str(tmp_path / 'micro_cd.py'))
    write_page_files(str(tmp_path),
                     {'my_train_config.py': str(tmp_path / 'micro_cd.py')})
    code, out = run_bounded(
        [sys.executable, 'tools/train.py',
         str(tmp_path / 'my_train_config.py'), '--work-dir',
         str(tmp_path / 'work')], timeout=300, env=tool_env(tmp_path))
    assert code == 0, out[-3000:]
    assert 'regularizers: cd, fro' in out
    assert re.search(r'fro_norm: \d', out)


def test_a_reconstruction_loss_from_outside(page_module):
    """The page's loss computes the mean absolute error and its method
    reconstructs with it (the unit's error falls)."""
    from test_reconstruction import calibrated_net

    from mmcd.core.quant import (QUANT_METHODS, RECONSTRUCTION_LOSSES,
                                 QuantConfig)
    from mmcd.core.quant.reconstruction import reconstruct
    page_module('my_recon_loss', RECONSTRUCTION_LOSSES, QUANT_METHODS)
    loss = RECONSTRUCTION_LOSSES.get('l1')(p=2.0, unit='blocks.0')
    a, b = torch.tensor([1., -2., 3.]), torch.tensor([0., 0., 1.])
    assert float(loss((a, (a, 7)), (b, (b, 0)))) == pytest.approx(2 * 5 / 3)
    recon = QuantConfig(method='qdrop-l1',
                        reconstruction=dict(iters=100, batch_size=16,
                                            weight_lr=1e-2)
                        ).reconstruction_config()
    assert recon.loss == 'l1'
    net, quantized, x = calibrated_net()
    stats = reconstruct(quantized, net, lambda m: m(x), ['blocks.0'], recon)
    assert stats['blocks.0']['loss_after'] < stats['blocks.0']['loss_before']


def test_a_backbone_family_from_outside(page_module):
    from test_architectures import Net

    from mmcd.core import ARCHITECTURES
    from mmcd.core.quant import QuantConfig, calibrate, quantize_model
    page_module('my_backbone_spec', ARCHITECTURES)
    torch.manual_seed(0)
    net = Net()
    wrapper = build_optim_wrapper(net, dict(
        type='ColinearityDecayOptimWrapper',
        optimizer=dict(type='SGD', lr=0.1), cd=dict(strength=0.5)))
    wrapper.bind_model(net)
    assert sorted(p.name for p in wrapper.matrix_pairs) == [
        f'layers.{i}.{kind}' for i in (0, 1) for kind in ('ffn', 'qk', 'vo')]
    x = torch.randn(2, 10, 8)
    cfg = QuantConfig(8, 8, 'repq-vit')
    quantized = quantize_model(net, cfg)
    assert quantized.stem.input_quantizer.bits == 8  # the spec's first layer
    summary = calibrate(quantized, cfg, lambda: quantized(x))
    assert summary['reparameterized'] == 4  # ln_1 and ln_2 of two layers


def test_an_attention_kind_from_outside(page_module):
    from mmcd.core.quant import (QUANTIZED_MODULES, LogSqrt2Quantizer,
                                 QuantConfig, QuantLinear, QuantMatMul,
                                 calibrate, quantize_model)
    mine = page_module('my_attention', QUANTIZED_MODULES)
    torch.manual_seed(0)
    model = nn.Sequential(mine.MyAttention(16))
    x = torch.randn(2, 7, 16)
    expected = model(x)
    cfg = QuantConfig(8, 8, 'repq-vit')
    quantize_model(model, cfg)
    twin = model[0]
    assert isinstance(twin, mine.QuantMyAttention)
    assert isinstance(twin.qkv, QuantLinear) and isinstance(twin.proj,
                                                            QuantLinear)
    assert isinstance(twin.qk_matmul, QuantMatMul)
    assert isinstance(twin.av_matmul.quantizer_a, LogSqrt2Quantizer)
    torch.testing.assert_close(model(x), expected)  # quantizers still off
    calibrate(model, cfg, lambda: model(x))
    out = model(x)
    assert 0 < (out - expected).norm() / expected.norm() < 0.1


def test_a_matmul_search_from_outside(page_module):
    """The page's per-head min-max search through a method: each head's
    grid is its operand's min-max range, computed here by hand."""
    from mmcd.core.quant import MATMUL_SEARCHES, QUANT_METHODS, QuantMatMul
    page_module('my_matmul_search', MATMUL_SEARCHES, QUANT_METHODS)
    matmul = QuantMatMul.for_role('qk', 8, 'minmax-per-head', heads=2)
    for q in (matmul.quantizer_a, matmul.quantizer_b):
        q.set_state('calib')
    a, b = torch.randn(6, 5, 4), torch.randn(6, 4, 5)  # [N * H, ...]
    matmul(a, b)
    for h in range(2):
        head = a[h::2]
        lo, hi = min(float(head.min()), 0), max(float(head.max()), 0)
        assert float(matmul.quantizer_a.scale[h]) == pytest.approx(
            (hi - lo) / 255)


def test_a_deployment_profile_from_outside(page_module, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from mmcd.core import ConfigError
    from mmcd.core.quant import (DEPLOY_PROFILES, QUANTIZED_MODULES,
                                 QuantConfig, UniformQuantizer,
                                 quantize_model)
    from mmcd.deploy import PROFILE_GRAPH_CHECKS, profile_problems
    page_module('my_profile', DEPLOY_PROFILES, PROFILE_GRAPH_CHECKS)
    attention = page_module('my_attention', QUANTIZED_MODULES)
    model = nn.Sequential(attention.MyAttention(16))
    quantize_model(model, QuantConfig(8, 8, 'repq-vit', profile='int8-qdq'))
    quantizer = model[0].av_matmul.quantizer_a
    assert type(quantizer) is UniformQuantizer and not quantizer.symmetric
    with pytest.raises(ConfigError, match="profile 'int8-qdq' .* runs "
                       '8-bit integers only, not the 6-bit of a_bits=6'):
        QuantConfig(8, 6, profile='int8-qdq')
    graph = helper.make_graph(
        [helper.make_node('Log', ['x'], ['y'])], 'g',
        [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [2])])
    path = str(tmp_path / 'log.onnx')
    onnx.save(helper.make_model(graph), path)
    assert profile_problems(path, 'int8-qdq') == ['Log in the graph']
    assert profile_problems(path, 'onnxruntime') == []
