"""Reconstruction's recorded data chunk by chunk, in memory or in a disk
cache: what chunks hold is what one forward pass over all images records,
the cache maps it back unchanged and leaves no file, chunks of different
shapes are never mixed in a mini-batch, and results do not depend on where
the data lives."""
import copy
import os

import pytest
import torch
from test_aphq import toy as vit_toy
from test_reconstruction import calibrated_net

from mmcd.core.quant.mlp_reconstruction import reconstruct_mlps
from mmcd.core.quant.reconstruction import (ReconstructionConfig, reconstruct,
                                            record, record_unit)
from mmcd.core.quant.unit_data import UnitData


def chunk_runs(x, bounds):
    """One run per chunk ``x[a:b]``."""
    return [lambda m, a=a, b=b: m(x[a:b]) for a, b in bounds]


def test_chunks_hold_what_one_pass_records_and_the_cache_maps_them(tmp_path):
    net, quantized, x = calibrated_net()
    runs = chunk_runs(x, [(0, 16), (16, 40), (40, 64)])
    *fp, target = record(net, net.get_submodule('blocks.1'), lambda m: m(x),
                         output=True)
    q = record(quantized, quantized.get_submodule('blocks.1'),
               lambda m: m(x))[:2]
    for where in (None, str(tmp_path)):
        data = record_unit('blocks.1', net,
                           runs, ReconstructionConfig(cache_dir=where),
                           model=quantized)
        assert data.sizes == [16, 24, 24] and data.size == 64
        for key, whole in (('target', target), ('fp', fp[0][0]),
                           ('q', q[0][0])):
            parts = [c[key] if key == 'target' else c[key][0][0]
                     for c, _ in data]
            torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6,
                                       atol=1e-6)
        if where is not None:  # three files while the unit is worked on
            (folder, ) = os.listdir(where)
            assert sorted(os.listdir(os.path.join(where, folder))) == [
                'chunk0.pt', 'chunk1.pt', 'chunk2.pt']
        torch.testing.assert_close(data.image(20)['target'], target[20:21],
                                   rtol=1e-6, atol=1e-6)
        with pytest.raises(IndexError, match='image 0 of 64'):
            data.image(64)
        data.release()
    assert os.listdir(tmp_path) == []  # the cache leaves nothing behind


def test_a_mini_batch_comes_from_one_chunk_in_proportion_to_its_images():
    data = UnitData()
    short, long = torch.zeros(1, 3, 2), torch.ones(3, 7, 2)
    data.add(((short, ), {}), short)
    data.add(((long, ), {}), long)
    gen = torch.Generator().manual_seed(0)
    picks = []
    for _ in range(2000):
        batch = data.sample(4, gen)
        (args, _), target = batch['fp'], batch['target']
        assert args[0].shape[0] == 4 and torch.equal(args[0], target)
        assert args[0].shape[1:] in ((3, 2), (7, 2))
        picks.append(args[0].shape[1] == 7)
    assert sum(picks) / len(picks) == pytest.approx(0.75, abs=0.03)


def test_reconstruction_on_chunks_of_other_shapes_and_the_cache_agrees(
        tmp_path):
    """Chunks whose images have another token count (a detector's padded
    sizes) reconstruct together and lower the error; in a disk cache the
    result is bit for bit the in-memory one; the output error over chunks
    is the image-weighted mean."""
    net, quantized, _ = calibrated_net()
    torch.manual_seed(1)
    xa, xb = torch.randn(24, 10, 8), torch.randn(24, 6, 8)
    runs = [lambda m: m(xa), lambda m: m(xb)]
    results = []
    for where in (None, str(tmp_path)):
        model = copy.deepcopy(quantized)
        cfg = ReconstructionConfig(iters=100, batch_size=8, weight_lr=1e-2,
                                   act_lr=1e-3, cache_dir=where)
        stats = reconstruct(model, net, runs, ['blocks.0', 'blocks.1'], cfg)
        results.append((stats, model.state_dict()))
    (stats, state), (cached_stats, cached_state) = results
    assert stats == cached_stats
    assert all(torch.equal(state[k], cached_state[k]) for k in state)
    assert all(s['loss_after'] < s['loss_before'] for s in stats.values())
    assert os.listdir(tmp_path) == []
    # before: QDrop's lp of the calibrated unit, per chunk, image-weighted
    unit, float_unit = quantized.blocks[0], net.blocks[0]
    with torch.no_grad():
        errors = [((unit(quantized.stem(x)) - float_unit(net.stem(x)))
                   .square().sum(-1).mean()) for x in (xa, xb)]
    assert stats['blocks.0']['loss_before'] == pytest.approx(
        float(sum(errors) / 2), rel=1e-5)


def test_mlp_reconstruction_on_chunks_matches_one_pass():
    """The fc2-input bound over chunks is the one-pass bound and the first
    step (image 0) has the same loss."""
    net, x = vit_toy()
    cfg = ReconstructionConfig(mlp=True, mlp_iters=1, mlp_lr=1e-2)
    whole = reconstruct_mlps(copy.deepcopy(net), net, lambda m: m(x), cfg)
    chunked = reconstruct_mlps(copy.deepcopy(net), net,
                               chunk_runs(x, [(0, 2), (2, 5), (5, 6)]), cfg)
    assert list(whole) == list(chunked)
    for name in whole:
        assert chunked[name]['bound'] == pytest.approx(whole[name]['bound'],
                                                       rel=1e-6)
        assert chunked[name]['loss_first'] == pytest.approx(
            whole[name]['loss_first'], rel=1e-5)


def test_engine_cuts_a_batch_into_chunks():
    from mmcd.engine.calibration import batch_chunks
    batch = dict(inputs=list(range(5)), data_samples=list('abcde'))
    assert batch_chunks(batch, 2) == [
        dict(inputs=[0, 1], data_samples=['a', 'b']),
        dict(inputs=[2, 3], data_samples=['c', 'd']),
        dict(inputs=[4], data_samples=['e'])]
    assert batch_chunks(batch, None) == [batch]


def test_in_turn_batches_follow_recording_order_and_cycle():
    """APHQ-ViT's order: consecutive images, cycling; a batch ends at its
    chunk's end (chunks of 3 and 2 images, batches of 2)."""
    from itertools import islice
    data = UnitData()
    first, second = torch.arange(3.)[:, None], torch.arange(3., 5.)[:, None]
    data.add(((first, ), {}), first)
    data.add(((second, ), {}), second)
    seen = [batch['target'][:, 0].tolist()
            for batch in islice(data.in_turn(2), 6)]
    assert seen == [[0, 1], [2], [3, 4], [0, 1], [2], [3, 4]]
