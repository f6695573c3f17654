"""End-to-end demo on the embedded toy COCO set.

Generates the toy set if missing, trains the CPU-sized Swin Mask R-CNN with
Colinearity Decay through ``tools/train.py`` (resuming if a previous demo was
interrupted), evaluates it with ``tools/test.py`` in floating point and with
W6A6 and W4A4 RepQ-ViT post-training quantization, and prints box/mask mAP
and where everything went.
Each step is the command a user would type; they are printed as they run.

The steps run with a fixed number of threads (``--threads``, default 2):
PyTorch's CPU kernels split reductions by thread, the last bits of the sums
differ, and 384 training iterations turn that into a different model
(measured on one machine: 0.049 / 0.057 float box / mask mAP with 2
threads, 0.070 / 0.068 with 1). With the count fixed, a machine with more
cores reproduces the table; another CPU family may still differ.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py'


def run(cmd, threads: int):
    print('\n$ ' + ' '.join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True, env=env)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/toy_coco')
    parser.add_argument('--threads', type=int, default=2,
                        help='threads of every step (the results depend on '
                        'it; 2: the README table)')
    args = parser.parse_args()
    start = time.time()
    run(['tools/misc/make_toy_coco.py', args.data_root], args.threads)
    run(['tools/train.py', args.config, '--work-dir', args.work_dir,
         '--resume'], args.threads)
    with open(osp.join(REPO, args.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    rows = {}
    for name, extra in (('float', []),
                        ('W6A6 repq-vit', ['--quant', 'w6a6']),
                        ('W4A4 repq-vit', ['--quant', 'w4a4'])):
        test_dir = osp.join(args.work_dir, 'test_' + name.split()[0].lower())
        run(['tools/test.py', args.config, checkpoint, '--work-dir',
             test_dir, *extra], args.threads)
        with open(osp.join(REPO, test_dir, 'test_metrics.json')) as f:
            rows[name] = json.load(f)['metrics']
    print('\n==== mmcd demo ({:.0f} s, {} threads) ===='.format(
        time.time() - start, args.threads))
    print(f'config      {args.config}')
    print(f'checkpoint  {checkpoint}')
    print(f'{"":16}{"box mAP":>9}{"AP50":>7}{"mask mAP":>10}{"AP50":>7}')
    for name, m in rows.items():
        print(f'{name:16}{m["coco/bbox_mAP"]:9.3f}{m["coco/bbox_mAP_50"]:7.3f}'
              f'{m["coco/segm_mAP"]:10.3f}{m["coco/segm_mAP_50"]:7.3f}')
    print(f'train logs  {args.work_dir}/<timestamp>/<timestamp>.log')
    print(f'test logs   {args.work_dir}/test_*/ (test_metrics.json, '
          'quant_results.json)')


if __name__ == '__main__':
    main()
