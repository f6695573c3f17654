"""mmcd's ViTDet: backbone shapes and errors, windowed vs global attention,
relative position tables, SimpleFPN, layer-wise lr decay, MAE loading, CD
pairs, and a toy ViTDet Mask R-CNN trained with CD and evaluated at W4A4."""
import argparse
import copy
import json
import os.path as osp

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.runner import Runner
from torch import nn

from conftest import REPO, micro_config
from mmcd.core import VIT_RULES, discover_pairs
from mmcd.core.quant import QuantConfig, QuantMatMul, quantize_model
from mmcd.models import SimpleFPN, ViTDet
from mmcd.models.backbones.vit_det import relative_positions

TOY_VITDET = osp.join(REPO, 'configs', 'toy',
                      'vitdet_mask-rcnn_vit-toy_toy-coco_cd.py')


def small_vit(**kwargs):
    args = dict(img_size=64, embed_dims=32, depth=3, num_heads=2,
                window_size=3, global_attn_indexes=(2, ),
                drop_path_rate=0.0)
    args.update(kwargs)
    torch.manual_seed(0)
    model = ViTDet(**args)
    model.init_weights()
    for blk in model.blocks:  # non-zero relative position tables
        nn.init.normal_(blk.attn.rel_pos_h, std=0.5)
        nn.init.normal_(blk.attn.rel_pos_w, std=0.5)
    return model.eval()


@pytest.mark.parametrize('size', [(64, 64), (96, 128), (112, 80)])
def test_output_is_stride_16(size):
    out, = small_vit()(torch.randn(2, 3, *size))
    assert out.shape == (2, 32, size[0] // 16, size[1] // 16)
    assert torch.isfinite(out).all()


def test_bad_settings_name_themselves():
    with pytest.raises(ValueError, match='patch_size 16'):
        small_vit()(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match='global_attn_indexes'):
        small_vit(global_attn_indexes=(3, ))
    with pytest.raises(ValueError, match='img_size'):
        small_vit(img_size=100)
    with pytest.raises(ValueError, match='window_size'):
        small_vit(window_size=0)
    with pytest.raises(ValueError, match='num_heads'):
        small_vit(num_heads=5)


def test_window_covering_the_map_equals_global_attention():
    """64 px -> a 4x4 map: a 4x4 window is global attention."""
    windowed = small_vit(window_size=4, global_attn_indexes=())
    global_ = small_vit(window_size=4, global_attn_indexes=(0, 1, 2))
    global_.load_state_dict(windowed.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(windowed(x)[0], global_(x)[0])


def test_relative_position_tables():
    model = small_vit(img_size=64, window_size=3, global_attn_indexes=(2, ))
    head_dim = 16
    assert model.blocks[0].attn.rel_pos_h.shape == (2 * 3 - 1, head_dim)
    assert model.blocks[2].attn.rel_pos_w.shape == (2 * 4 - 1, head_dim)
    table = torch.arange(3.0)[:, None]  # offsets -1, 0, +1 for size 2
    rel = relative_positions(2, 2, table)[..., 0]
    assert rel.tolist() == [[1, 0], [2, 1]]  # (q - k) + 1
    resized = relative_positions(4, 4, torch.randn(5, head_dim))
    assert resized.shape == (4, 4, head_dim)  # table interpolated 5 -> 7


def test_cd_pairs_of_vit_b():
    vit_b = ViTDet(img_size=224, embed_dims=768, depth=12, num_heads=12)
    pairs = discover_pairs(vit_b, VIT_RULES)
    assert len(pairs) == 36
    assert {p.kind for p in pairs} == {'ffn', 'vo', 'qk'}
    assert all(p.num_heads == 12 for p in pairs if p.kind != 'ffn')


def test_simple_fpn_strides():
    fpn = SimpleFPN(in_channels=32, out_channels=16, num_outs=5)
    outs = fpn((torch.randn(2, 32, 8, 8), ))
    assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2]
    assert all(o.shape[1] == 16 for o in outs)


def test_layer_decay_constructor():
    model = nn.Module()
    model.backbone = small_vit()
    model.neck = nn.Linear(4, 4)
    wrapper = build_optim_wrapper(model, dict(
        type='OptimWrapper', constructor='LayerDecayOptimWrapperConstructor',
        paramwise_cfg=dict(decay_rate=0.5),
        optimizer=dict(type='AdamW', lr=1.0, weight_decay=0.1)))
    lr_of, wd_of = {}, {}
    for group in wrapper.optimizer.param_groups:
        for p in group['params']:
            lr_of[p], wd_of[p] = group['lr'], group['weight_decay']
    vit = model.backbone
    num_layers = 3 + 1
    assert lr_of[vit.patch_embed.proj.weight] == 0.5**num_layers
    assert lr_of[vit.blocks[0].attn.qkv.weight] == 0.5**(num_layers - 1)
    assert lr_of[vit.blocks[2].mlp.fc2.weight] == 0.5
    assert lr_of[model.neck.weight] == 1.0
    assert wd_of[vit.blocks[1].mlp.fc1.weight] == 0.1
    assert wd_of[vit.blocks[1].mlp.fc1.bias] == 0.0
    assert wd_of[vit.pos_embed] == 0.0
    assert wd_of[vit.blocks[0].attn.rel_pos_h] == 0.0


def test_mae_checkpoint_loads_by_name(tmp_path):
    source = small_vit()
    state = {k: v.clone() for k, v in source.state_dict().items()
             if 'rel_pos' not in k}
    state['cls_token'] = torch.zeros(1, 1, 32)
    state['norm.weight'] = torch.ones(32)
    # MAE's grid is 14x14 at 224 px; ours is 4x4 at 64 px: resized
    grid = torch.randn(1, 1 + 14 * 14, 32)
    state['pos_embed'] = grid
    path = str(tmp_path / 'mae.pth')
    # as the official MAE files: weights under 'model', args pickled too
    torch.save({'model': state, 'args': argparse.Namespace(lr=1e-3)}, path)
    target = ViTDet(img_size=64, embed_dims=32, depth=3, num_heads=2,
                    window_size=3, global_attn_indexes=(2, ),
                    pretrain_img_size=224,
                    init_cfg=dict(type='Pretrained', checkpoint=path))
    target.init_weights()
    torch.testing.assert_close(target.blocks[1].attn.qkv.weight,
                               source.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(target.pos_embed[:, 0], grid[:, 0])
    assert target.pos_embed.shape == (1, 1 + 14 * 14, 32)


def test_quantization_keeps_fp_output_and_reaches_attention():
    model = small_vit()
    x = torch.randn(1, 3, 64, 96)
    ref = model(x)[0]
    qmodel = quantize_model(copy.deepcopy(model), QuantConfig(4, 4))
    torch.testing.assert_close(qmodel(x)[0], ref)
    assert isinstance(qmodel.blocks[0].attn.qk_matmul, QuantMatMul)
    assert isinstance(qmodel.blocks[0].attn.av_matmul, QuantMatMul)


def test_toy_vitdet_trains_with_cd_and_evaluates_w4a4(micro_data_root,
                                                       tmp_path):
    cfg = micro_config(micro_data_root, tmp_path, base=TOY_VITDET)
    cfg.custom_hooks = [dict(type='PostTrainingQuantHook', w_bits=4,
                             a_bits=4, calib=dict(num_images=2),
                             stages=('test', ))]
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 4
    log = open(osp.join(runner.log_dir, osp.basename(runner.log_dir) +
                        '.log')).read()
    assert 'ColinearityDecayOptimWrapper: 12 matrix pairs' in log
    assert 'cd_align_qk_mean' in log
    runner.test()
    with open(osp.join(tmp_path, 'quant_results.json')) as f:
        results = json.load(f)
    assert (results['w_bits'], results['a_bits']) == (4, 4)
    assert -1 <= results['metrics']['coco/bbox_mAP'] <= 1
