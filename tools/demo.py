"""End-to-end demo on the embedded toy COCO set.

Generates the toy set if missing, trains the CPU-sized Swin Mask R-CNN with
Colinearity Decay through ``tools/train.py`` (resuming if a previous demo was
interrupted), evaluates it with ``tools/test.py``, and prints box/mask mAP
and where everything went.
Each step is the command a user would type; they are printed as they run.
"""
import argparse
import json
import os.path as osp
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = 'configs/toy/mask-rcnn_swin-toy-p4-w7_fpn_12e_toy-coco_cd.py'


def run(cmd):
    print('\n$ ' + ' '.join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument('--data-root', default='data/toy_coco')
    args = parser.parse_args()
    start = time.time()
    run(['tools/misc/make_toy_coco.py', args.data_root])
    run(['tools/train.py', args.config, '--work-dir', args.work_dir,
         '--resume'])
    with open(osp.join(REPO, args.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    test_dir = osp.join(args.work_dir, 'test')
    run(['tools/test.py', args.config, checkpoint, '--work-dir', test_dir])
    with open(osp.join(REPO, test_dir, 'test_metrics.json')) as f:
        metrics = json.load(f)['metrics']
    print('\n==== mmcd demo ({:.0f} s) ===='.format(time.time() - start))
    print(f'config      {args.config}')
    print(f'box  mAP    {metrics["coco/bbox_mAP"]:.3f} '
          f'(AP50 {metrics["coco/bbox_mAP_50"]:.3f})')
    print(f'mask mAP    {metrics["coco/segm_mAP"]:.3f} '
          f'(AP50 {metrics["coco/segm_mAP_50"]:.3f})')
    print(f'checkpoint  {checkpoint}')
    print(f'train logs  {args.work_dir}/<timestamp>/<timestamp>.log')
    print(f'test logs   {test_dir}/ (metrics in test_metrics.json)')


if __name__ == '__main__':
    main()
