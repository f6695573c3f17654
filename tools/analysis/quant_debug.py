"""Float vs quantized, layer by layer: per-layer SQNR of every quantized
activation, weight and layer output, and histograms of the worst inputs.

    python tools/analysis/quant_debug.py CONFIG CKPT --quant w4a4
        [--method repq-vit] [--calib-images 8] [--worst 4]
        [--out-dir work_dirs/quant_debug]

Calibrates as ``tools/test.py --quant`` does, then runs the calibration
images through the backbone, neck and RPN with quantization off and on
(:func:`mmcd.core.quant.debug.quantization_report`) and writes
``quant_debug.md`` (layers by output SQNR, lowest first, with their input
and weight SQNR), ``quant_debug.json`` and ``worst_inputs.png``: the value
histograms of the ``--worst`` quantizer inputs of lowest SQNR (as
quantized: after a reparameterized input's per-channel shift), with the
quantizer's representable range marked.
"""
import argparse
import json
import math
import os.path as osp

import _analysis_bootstrap  # noqa: F401  (must precede OpenMMLab imports)
import torch  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.quant import UniformQuantizer  # noqa: E402
from mmcd.core.quant.debug import quantization_report  # noqa: E402
from mmcd.engine.calibration import (calibration_images,  # noqa: E402
                                     dense_outputs)
from mmcd.utils.runner_setup import (  # noqa: E402
    add_ptq_arguments, calibrated_from_checkpoint, ptq_config, run_main)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ptq_arguments(parser, calib_images=8, out_dir='work_dirs/quant_debug')
    parser.add_argument('--worst', type=int, default=4)
    return parser.parse_args()


def fmt(db):
    return '-' if db is None else f'{db:.1f}'


def representable_range(quantizer):
    """The clipping range of a uniform quantizer; post-softmax: [0, D]."""
    if isinstance(quantizer, UniformQuantizer):
        scale, zero = quantizer.scale.double(), quantizer.zero_point.double()
        return (float(-zero * scale),
                float((quantizer.levels - zero) * scale))
    return 0.0, float(quantizer.delta)


@torch.no_grad()
def plot_worst_inputs(model, images, keys, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    captured = {}

    def capture(key):
        def hook(module, args, output):  # returns None: output unchanged
            values = args[0].detach()
            offset = getattr(module, 'channel_offset', None)
            if offset is not None and offset.numel():  # RepQ-ViT's shift
                values = values + offset
            captured.setdefault(key, values.reshape(-1)[:1 << 20].float())
        return hook

    handles = [model.get_submodule(f'{name}.{attr}').register_forward_hook(
        capture((name, attr))) for name, attr in keys]
    try:
        dense_outputs(model, images)
    finally:
        for handle in handles:
            handle.remove()
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)),
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        values = captured[key].numpy()
        ax.hist(values, bins=200, log=True, color='tab:blue')
        lo, hi = representable_range(model.get_submodule('.'.join(key)))
        for edge in (lo, hi):
            ax.axvline(edge, color='tab:red', ls='--', lw=1)
        ax.set_title(f'{key[0]}.{key[1]} (red: representable range)',
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = parse_args()
    quant_cfg = ptq_config(args)
    runner, model, calib_batch = calibrated_from_checkpoint(args, quant_cfg)
    images = calibration_images(model, calib_batch)
    report = quantization_report(model, lambda: dense_outputs(model, images))
    reached = {n: e for n, e in report.items()
               if e['output_sqnr'] is not None}
    ranked = sorted(reached, key=lambda n: reached[n]['output_sqnr'])
    lines = [f'# {args.quant} {quant_cfg.resolved_method.name}: float vs '
             'quantized on '
             f'{len(images)} calibration images (SQNR, dB)', '',
             '| layer | bits | output | inputs | weight |',
             '|---|---|---:|---|---:|']
    for name in ranked:
        entry = reached[name]
        inputs = ', '.join(f'{k} {fmt(v)}'
                           for k, v in entry['input_sqnr'].items())
        bits = ', '.join(f'{k.replace("_quantizer", "")} {v}'
                         for k, v in entry['bits'].items())
        lines.append(f'| `{name}` | {bits} | {fmt(entry["output_sqnr"])} | '
                     f'{inputs} | {fmt(entry.get("weight_sqnr"))} |')
    paths = {k: osp.join(args.out_dir, f'quant_debug.{k}')
             for k in ('md', 'json')}
    paths['png'] = osp.join(args.out_dir, 'worst_inputs.png')
    with open(paths['md'], 'w') as f:
        f.write('\n'.join(lines) + '\n')
    with open(paths['json'], 'w') as f:
        json.dump(report, f, indent=2)
    inputs = sorted(((db, (n, k)) for n, e in reached.items()
                     for k, db in e['input_sqnr'].items()
                     if db is not None and math.isfinite(db)))
    worst = [key for _, key in inputs[:args.worst]]
    if worst:
        plot_worst_inputs(model, images, worst, paths['png'])
    print('\n'.join(lines[:4 + min(10, len(ranked))]))
    print(f'{len(report) - len(reached)} layer(s) not compared (the RoI '
          'heads: their proposals differ between the runs)')
    print('wrote ' + ', '.join(paths.values()))


if __name__ == '__main__':
    run_main(main)
