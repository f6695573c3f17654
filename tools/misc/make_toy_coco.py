"""Generate the embedded toy COCO instance-segmentation set.

    python tools/misc/make_toy_coco.py data/toy_coco [--num-train 64] ...
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))
from mmcd.datasets import ToyCocoSpec, ensure_toy_coco  # noqa: E402


def main():
    defaults = ToyCocoSpec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('data_root', nargs='?', default='data/toy_coco')
    for field in ('num_train', 'num_val', 'min_side', 'max_side',
                  'max_objects', 'seed'):
        parser.add_argument('--' + field.replace('_', '-'), type=int,
                            default=getattr(defaults, field))
    args = parser.parse_args()
    spec = ToyCocoSpec(**{k: v for k, v in vars(args).items()
                          if k != 'data_root'})
    paths = ensure_toy_coco(args.data_root, spec)
    print(f'toy COCO set ready: {paths["train"]}, {paths["val"]}')


if __name__ == '__main__':
    main()
