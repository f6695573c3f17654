"""Swin repository detection checkpoints for mmdet 3: the backbone's patch
merging computes what the repository's computes (its 2x2 neighbours
concatenated as (0,0), (1,0), (0,1), (1,1), written here from its code's
semantics), names follow mmdet 3, the neck and heads are untouched, and the
tool says in one line when a file is not such a checkpoint."""
import torch
import torch.nn.functional as F
from mmdet.models.backbones.swin import SwinTransformer

from mmcd.models.swin_checkpoint import convert_swin_detection_state
from test_tools_cli import assert_one_line_error, run_tool


def swin_repository_patch_merging(x, norm_weight, norm_bias, reduction):
    """The repository's PatchMerging on ``x`` [B, H, W, C]: the four
    neighbours of each 2x2 cell concatenated, LayerNorm, then Linear."""
    x0, x1 = x[:, 0::2, 0::2], x[:, 1::2, 0::2]
    x2, x3 = x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    merged = torch.cat([x0, x1, x2, x3], -1)
    merged = F.layer_norm(merged, merged.shape[-1:], norm_weight, norm_bias)
    return merged @ reduction.t()


def test_converted_patch_merging_computes_the_repositorys():
    torch.manual_seed(0)
    channels = 8
    backbone = SwinTransformer(embed_dims=channels, depths=(1, 1),
                               num_heads=(1, 2), window_size=2,
                               out_indices=(0, 1))
    backbone.eval()  # mmdet's train() returns None
    norm_weight, norm_bias = torch.randn(4 * channels), torch.randn(
        4 * channels)
    reduction = torch.randn(2 * channels, 4 * channels)
    state = {  # the repository's names, plus a head key to keep
        'backbone.layers.0.downsample.norm.weight': norm_weight,
        'backbone.layers.0.downsample.norm.bias': norm_bias,
        'backbone.layers.0.downsample.reduction.weight': reduction,
        'backbone.layers.0.blocks.0.mlp.fc1.weight': torch.ones(3),
        'backbone.layers.0.blocks.0.attn.qkv.weight': torch.ones(2),
        'backbone.patch_embed.proj.weight': torch.ones(1),
        'roi_head.bbox_head.0.fc_cls.weight': torch.arange(4.),
    }
    converted = convert_swin_detection_state(state)
    assert set(converted) == {
        'backbone.stages.0.downsample.norm.weight',
        'backbone.stages.0.downsample.norm.bias',
        'backbone.stages.0.downsample.reduction.weight',
        'backbone.stages.0.blocks.0.ffn.layers.0.0.weight',
        'backbone.stages.0.blocks.0.attn.w_msa.qkv.weight',
        'backbone.patch_embed.projection.weight',
        'roi_head.bbox_head.0.fc_cls.weight'}
    assert torch.equal(converted['roi_head.bbox_head.0.fc_cls.weight'],
                       torch.arange(4.))
    merging = backbone.stages[0].downsample
    merging.load_state_dict({
        k[len('backbone.stages.0.downsample.'):]: v
        for k, v in converted.items() if '.downsample.' in k})
    x = torch.randn(2, 6, 4, channels)  # H = 6, W = 4
    expected = swin_repository_patch_merging(x, norm_weight, norm_bias,
                                             reduction)
    with torch.no_grad():
        found, size = merging(x.reshape(2, 24, channels), (6, 4))
    assert tuple(size) == (3, 2)
    torch.testing.assert_close(found.reshape(2, 3, 2, 2 * channels),
                               expected)


def test_an_mmdet_checkpoint_is_refused_in_one_line(tmp_path):
    mmdet_state = {'backbone.stages.0.blocks.0.norm1.weight': torch.ones(2),
                   'neck.lateral_convs.0.conv.weight': torch.ones(1)}
    src = tmp_path / 'mmdet.pth'
    torch.save(dict(state_dict=mmdet_state), src)
    code, out = run_tool('tools/misc/convert_swin_checkpoint.py', str(src),
                         str(tmp_path / 'out.pth'))
    assert_one_line_error(code, out, 'no backbone.layers.* keys (backbone '
                          'parts found: stages)')
    swin_state = {'backbone.layers.0.blocks.0.norm1.weight': torch.ones(2),
                  'rpn_head.rpn_conv.weight': torch.ones(1)}
    torch.save(dict(state_dict=swin_state, meta=dict(epoch=36)), src)
    code, out = run_tool('tools/misc/convert_swin_checkpoint.py', str(src),
                         str(tmp_path / 'out.pth'))
    assert code == 0, out
    saved = torch.load(tmp_path / 'out.pth', weights_only=True)
    assert set(saved['state_dict']) == {
        'backbone.stages.0.blocks.0.norm1.weight', 'rpn_head.rpn_conv.weight'}
    assert saved['meta']['epoch'] == 36
    assert saved['meta']['converted_from'] == str(src)
