"""Which quantized layers hurt: per-layer (and per-block) sensitivity, and
mixed-precision configs that keep the most sensitive layers at 8 bits.

    python tools/analysis/sensitivity.py CONFIG CKPT --quant w4a4
        [--method repq-vit] [--metric sqnr|map] [--calib-images 8]
        [--keep 1 3 5] [--avg-w-bits 4.5] [--layers REGEX]
        [--out-dir work_dirs/sensitivity]

Calibrates the whole model once (as ``tools/test.py --quant`` does), then
for every quantized layer (a Linear/Conv2d: weight + input; an attention
matmul: both operands) measures two runs: **only** that layer quantized, and
**all but** that layer quantized; and the same per Transformer block.
``--metric sqnr`` (fast): signal-to-quantization-noise ratio, in dB, of the
detector's FPN features and RPN logits against the float model on the
calibration images, ``10 log10(sum y^2 / sum (y_q - y)^2)`` over all those
outputs. ``--metric map``: box mAP on the test set (exact, one evaluation per
run). Writes ``sensitivity.md`` (ranked table), ``sensitivity.json``,
``sensitivity.png`` (the most sensitive layers) and, per ``--keep K``, a
config ``keep{K}_{quant}.py`` that inherits CONFIG and keeps the K most
sensitive layers at W8A8 (``PostTrainingQuantHook(layer_bits=...)``);
``--avg-w-bits B`` writes ``avgw{B}_{quant}.py``: the most sensitive layers
with weights at W8A8 while the parameter-weighted average weight bits stay
<= B (greedy in rank order). ``--layers REGEX`` measures only the layers
and blocks whose names match (``re.search``; a ``map`` run costs two test-set
evaluations per unit); "all quantized" still means every layer.
"""
import argparse
import json
import os.path as osp
import re

import _analysis_bootstrap  # noqa: F401  (must precede OpenMMLab imports)
from mmengine.utils import ProgressBar  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.quant import layer_quantizers  # noqa: E402
from mmcd.core.quant.debug import sqnr_db  # noqa: E402
from mmcd.engine.calibration import (calibration_images,  # noqa: E402
                                     dense_outputs, evaluate)
from mmcd.utils.runner_setup import (UserError,  # noqa: E402
                                      add_ptq_arguments,
                                      calibrated_from_checkpoint, ptq_config,
                                      run_main)

BLOCK = re.compile(r'^(.*\.blocks\.\d+)\.')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_ptq_arguments(parser, calib_images=8,
                      out_dir='work_dirs/sensitivity')
    parser.add_argument('--metric', default='sqnr', choices=['sqnr', 'map'])
    parser.add_argument('--keep', type=int, nargs='*', default=[1, 3, 5],
                        help='write a config keeping the K most sensitive '
                        'layers at W8A8, for each K')
    parser.add_argument('--avg-w-bits', type=float,
                        help='also write a config that keeps the most '
                        'sensitive layers with weights at W8A8 while the '
                        'parameter-weighted average weight bits stay within '
                        'this budget')
    parser.add_argument('--layers', metavar='REGEX',
                        help='measure only the layers and blocks whose '
                        'names match (re.search)')
    return parser.parse_args()


def outputs_sqnr(outputs, reference) -> float:
    """SQNR (dB) of all ``outputs`` together against ``reference``."""
    signal = sum(float(r.double().square().sum()) for r in reference)
    noise = sum(float((o.double() - r.double()).square().sum())
                for o, r in zip(outputs, reference))
    return sqnr_db(signal, noise)


class Measure:
    """The metric of the quantized model with only ``on`` quantizers on."""

    def __init__(self, model, metric, images, test_loop):
        self.model, self.metric = model, metric
        self.images, self.test_loop = images, test_loop
        self.all = [q for qs in layer_quantizers(model).values()
                    for q in qs if q.calibrated]
        if metric == 'sqnr':
            self.reference = self.outputs(set())

    def switch(self, on):
        for q in self.all:
            q.state = 'quant' if id(q) in on else 'fp'

    def outputs(self, on):
        self.switch(on)
        return dense_outputs(self.model, self.images)

    def __call__(self, on) -> float:
        if self.metric == 'sqnr':
            return outputs_sqnr(self.outputs(on), self.reference)
        self.switch(on)
        return float(evaluate(self.model, self.test_loop)['coco/bbox_mAP'])


def within_weight_budget(ranked, params, w_bits, budget):
    """The layers of ``ranked`` (most sensitive first) that go to 8-bit
    weights, greedily, while ``sum(bits * params) / sum(params) <= budget``;
    layers without weights do not count against (nor for) the budget and
    are left out."""
    total = sum(params.values())
    spent, chosen = w_bits * total, []
    for name in ranked:
        extra = (8 - w_bits) * params.get(name, 0)
        if extra and spent + extra <= budget * total:
            chosen.append(name)
            spent += extra
    return chosen, spent / total


def keep_config(cfg, config_path, out_dir, spec, method, names, w_bits,
                a_bits, calib_images, label=None, reconstruction=None,
                profile=None):
    """A config inheriting ``config_path`` whose PTQ hook keeps ``names``
    at W8A8 and calibrates (and reconstructs, with the measured model's
    ``reconstruction`` options) as the measurement did
    (``calib_images``); the config's other custom hooks are kept."""
    hooks = [dict(h) for h in cfg.get('custom_hooks', [])
             if h.get('type') != 'PostTrainingQuantHook']
    rules = [dict(pattern=f'^{re.escape(n)}$', w_bits=8, a_bits=8)
             for n in names]
    hooks.append(dict(type='PostTrainingQuantHook', w_bits=w_bits,
                      a_bits=a_bits, method=method, layer_bits=rules,
                      calib=dict(num_images=calib_images)))
    if profile is not None:
        hooks[-1]['profile'] = profile
    if reconstruction is not None:
        hooks[-1]['reconstruction'] = dict(reconstruction)
    path = osp.join(out_dir, f'{label or f"keep{len(names)}"}_{spec}.py')
    with open(path, 'w') as f:
        f.write(f'# written by tools/analysis/sensitivity.py: {spec} '
                f'{method}, the {len(names)} most sensitive layers at W8A8\n'
                f'_base_ = {osp.abspath(config_path)!r}\n'
                f'custom_hooks = {hooks!r}\n')
    return path


def main():
    args = parse_args()
    quant_cfg = ptq_config(args)
    w_bits, a_bits = quant_cfg.w_bits, quant_cfg.a_bits
    if args.avg_w_bits is not None and not w_bits <= args.avg_w_bits <= 8:
        raise UserError(f'--avg-w-bits must lie in [{w_bits}, 8] (the '
                        f'weight bits of --quant .. 8), got {args.avg_w_bits}')
    if args.layers is not None:
        try:
            re.compile(args.layers)
        except re.error as err:
            raise UserError(f'--layers {args.layers!r}: {err}') from None
    runner, model, calib_batch = calibrated_from_checkpoint(
        args, quant_cfg, ['test_dataloader'] if args.metric == 'map' else [])
    cfg = runner.cfg
    images = calibration_images(model, calib_batch)
    measure = Measure(model, args.metric,
                      images, runner.test_loop if args.metric == 'map'
                      else None)
    layers = {name: {id(q) for q in qs if q.calibrated}
              for name, qs in layer_quantizers(model).items()}
    layers = {name: ids for name, ids in layers.items() if ids}
    blocks = {}
    for name, ids in layers.items():
        match = BLOCK.match(name)
        if match:
            blocks.setdefault(match.group(1), set()).update(ids)
    everything = set().union(*layers.values())
    if args.layers is not None:
        layers, blocks = (
            {n: ids for n, ids in units.items() if re.search(args.layers, n)}
            for units in (layers, blocks))
        if not layers and not blocks:
            raise UserError(f'--layers {args.layers!r} matches no quantized '
                            'layer or block (names as in sensitivity.md, '
                            'e.g. backbone.stages.0.blocks.0.attn.w_msa.qkv)')
    print(f'{len(layers)} quantized layers, {len(blocks)} blocks, metric '
          f'{args.metric}; {2 * (len(layers) + len(blocks)) + 2} runs')
    full, none = measure(everything), measure(set())
    rows = []
    bar = ProgressBar(len(layers) + len(blocks))
    for kind, units in (('layer', layers), ('block', blocks)):
        for name, ids in units.items():
            rows.append(dict(kind=kind, name=name, only=measure(ids),
                             all_but=measure(everything - ids)))
            bar.update()
    print()
    # most sensitive first: the lowest SQNR (or mAP) with only it quantized
    rows.sort(key=lambda r: (r['kind'] != 'layer', r['only']))
    unit = 'dB' if args.metric == 'sqnr' else 'box mAP'
    lines = [f'# Sensitivity: {args.quant} {quant_cfg.resolved_method.name}, '
             'metric '
             f'{args.metric} ({unit})', '',
             f'all quantized: {full:.4f}; none: {none:.4f}', '',
             '| rank | kind | layer | only this quantized | all but this |',
             '|---:|---|---|---:|---:|']
    for rank, row in enumerate(rows, 1):
        lines.append(f'| {rank} | {row["kind"]} | `{row["name"]}` | '
                     f'{row["only"]:.4f} | {row["all_but"]:.4f} |')
    paths = {k: osp.join(args.out_dir, f'sensitivity.{k}')
             for k in ('md', 'json', 'png')}
    with open(paths['md'], 'w') as f:
        f.write('\n'.join(lines) + '\n')
    ranked = [r['name'] for r in rows if r['kind'] == 'layer']
    configs = [keep_config(cfg, args.config, args.out_dir, args.quant,
                           args.method, ranked[:k], w_bits, a_bits,
                           args.calib_images,
                           reconstruction=quant_cfg.reconstruction,
                           profile=quant_cfg.profile)
               for k in args.keep if 0 < k <= len(ranked)]
    params = {name: module.weight.numel()
              for name, module in model.named_modules()
              if name in layers and hasattr(module, 'weight_quantizer')}
    budget = None
    if args.avg_w_bits is not None:
        chosen, average = within_weight_budget(ranked, params, w_bits,
                                               args.avg_w_bits)
        budget = dict(limit=args.avg_w_bits, average=average, layers=chosen)
        configs.append(keep_config(
            cfg, args.config, args.out_dir, args.quant, args.method, chosen,
            w_bits, a_bits, args.calib_images,
            label=f'avgw{args.avg_w_bits:g}',
            reconstruction=quant_cfg.reconstruction,
            profile=quant_cfg.profile))
        print(f'--avg-w-bits {args.avg_w_bits:g}: {len(chosen)} layers at '
              f'8 bits, average weight bits {average:.3f}')
    with open(paths['json'], 'w') as f:
        json.dump(dict(config=args.config, checkpoint=args.checkpoint,
                       quant=args.quant, method=args.method,
                       metric=args.metric, all_quantized=full,
                       none_quantized=none, ranking=rows,
                       weight_params=params, weight_budget=budget,
                       keep_configs=configs), f, indent=2)
    plot(rows, paths['png'], unit, full)
    print('\n'.join(lines[:6 + min(10, len(rows))]))
    print('wrote ' + ', '.join(list(paths.values()) + configs))


def plot(rows, path, unit, full):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    top = [r for r in rows if r['kind'] == 'layer'][:20]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(top) + 1.5))
    ax.barh(range(len(top)), [r['only'] for r in top], color='tab:red')
    ax.set_yticks(range(len(top)), [r['name'] for r in top], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(full, color='k', ls='--', lw=1, label='all quantized')
    ax.set_xlabel(f'{unit} with only this layer quantized (lower: more '
                  'sensitive)')
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    run_main(main)
