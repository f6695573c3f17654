"""Block reconstruction's cost per unit: time per iteration, projected to a
full run, the recorded inputs' size, and the process's peak memory.

For the toy Swin Mask R-CNN and Mask R-CNN Swin-T at 512x768, built from the
configs (random weights and images: the cost does not depend on them), the
model is calibrated (W4A4, ``--method``; its time printed) on ``--images``
images and every
reconstruction unit (patch embedding, blocks, patch merging, neck) runs
``--iters`` iterations at ``--batch-size``; printed per unit: seconds per
iteration, the projection to ``--project`` iterations (the papers: 20000),
and the megabytes of its recorded data (float + quantized inputs, float
outputs, and the APH weights with that loss) for those images; at the end
the peak resident memory of the process, also after the calibration (with
``repq-vit`` that is the calibration's own: one forward pass over all
``--images``).
A method whose reconstruction has an MLP stage or a loss weighted by the
task's sensitivity (``--method aphq-vit``) also times them: the
sensitivity weights of each unit (two backward passes of the float model to
the RPN) and, first, the MLP reconstruction's steps per MLP (projected
likewise). ``--chunk-images K`` records
the units' data K images per forward pass and ``--cache-dir DIR`` keeps it
on disk, memory-mapped (the reconstruction's memory options): compare the
peak memory with and without.

    python tools/benchmarks/recon_speed.py [--models toy swin-t]
        [--images 4] [--iters 10] [--batch-size 1] [--project 20000]
        [--method repq-vit|qdrop|aphq-vit|...] [--chunk-images K]
        [--cache-dir DIR]
"""
import argparse
import copy
import os.path as osp
import resource
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401  (before torch: tools/_bootstrap.py)
import torch  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import mmcd  # noqa: E402,F401
from mmcd.core.architectures import reconstruction_patterns  # noqa: E402
from mmcd.core.quant import (  # noqa: E402
    QUANT_METHODS, QuantConfig, calibrate, quantize_model)
from mmcd.core.quant.mlp_reconstruction import reconstruct_mlps  # noqa
from mmcd.core.quant.reconstruction import (  # noqa: E402
    needs_task_loss, reconstruct_unit, reconstruction_units, record_unit)
from mmcd.engine.task_objective import rpn_objective  # noqa: E402
from mmcd.utils.benchmark_models import (  # noqa: E402
    BENCHMARK_DETECTORS, add_models_argument, build_detector, random_inputs)


def megabytes(obj) -> float:
    """Size of the tensors in ``obj`` (nested tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() / 2**20
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(megabytes(o) for o in obj)
    return 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=4)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--project', type=int, default=20000)
    parser.add_argument('--chunk-images', type=int, default=None)
    parser.add_argument('--cache-dir', default=None)
    parser.add_argument('--method', default='repq-vit',
                        choices=QUANT_METHODS.names(),
                        help='a registered PTQ method, reconstructed with '
                        'its own reconstruction options or the defaults')
    add_models_argument(parser)
    args = parser.parse_args()
    init_default_scope('mmdet')
    torch.manual_seed(0)
    print(f'W4A4 {args.method}, {args.images} images, {args.iters} '
          f'iterations per unit at batch {args.batch_size}, '
          f'{torch.get_num_threads()} threads, recorded '
          f'{args.chunk_images or args.images} images at a time, '
          f'{args.cache_dir or "in memory"}')
    for name, config, size in (BENCHMARK_DETECTORS[m] for m in args.models):
        model = build_detector(config)
        images, samples = random_inputs(size, args.images,
                                        torch.Generator().manual_seed(0))

        step = args.chunk_images or args.images
        chunks = [(images[i:i + step], samples[i:i + step])
                  for i in range(0, args.images, step)]
        runs = [lambda m, c=c: m.predict(*c) for c in chunks]

        qcfg = QuantConfig(4, 4, args.method, reconstruction=dict(
            iters=args.iters, mlp_iters=args.iters,
            batch_size=args.batch_size, chunk_images=args.chunk_images,
            cache_dir=args.cache_dir))
        cfg = qcfg.reconstruction_config()
        qmodel = quantize_model(copy.deepcopy(model), qcfg)
        units = reconstruction_units(qmodel, reconstruction_patterns())
        objective = None
        if needs_task_loss(cfg, units):
            objective = [rpn_objective(model, chunk) for chunk, _ in chunks]
        if cfg.mlp:
            start = time.perf_counter()
            mlps = reconstruct_mlps(qmodel, model, runs, cfg, objective)
            seconds = time.perf_counter() - start
            print(f'{name}: MLP reconstruction of {len(mlps)} MLPs x '
                  f'{args.iters} steps: {seconds:.0f} s, recording and '
                  'sensitivity weights included (a one-off per MLP: '
                  f'{seconds / args.iters / len(mlps):.3f} s per step and '
                  'MLP is an upper bound, tight only for many steps)')
        start = time.perf_counter()
        with torch.no_grad():
            calibrate(qmodel, qcfg, lambda: qmodel.predict(images, samples))
        print(f'{name}: calibration ({args.method}) on {args.images} '
              f'images: {time.perf_counter() - start:.1f} s, peak resident '
              f'memory so far {peak_megabytes():.0f} MB')
        print(f'{name}: {len(units)} units')
        total = 0.0
        for unit in units:
            start = time.perf_counter()
            data = record_unit(unit, model, runs, cfg, objective, qmodel)
            recording = time.perf_counter() - start
            start = time.perf_counter()
            reconstruct_unit(unit, qmodel.get_submodule(unit), data, cfg)
            per_iter = (time.perf_counter() - start) / args.iters
            total += per_iter
            size = megabytes(data.chunks)
            data.release()
            print(f'  {unit}: {per_iter:.3f} s/iteration, '
                  f'{per_iter * args.project / 3600:.2f} h at '
                  f'{args.project}; recording (and weights) '
                  f'{recording:.1f} s, '
                  f'{size:.0f} MB for {args.images} images')
        print(f'{name}: all units {total * args.project / 3600:.1f} h '
              f'projected to {args.project} iterations each')
    print(f'peak resident memory {peak_megabytes():.0f} MB')


def peak_megabytes() -> float:
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


if __name__ == '__main__':
    main()
