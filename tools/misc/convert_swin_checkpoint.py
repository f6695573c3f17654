"""Convert a Swin Transformer repository detection checkpoint (Mask R-CNN /
Cascade Mask R-CNN Swin, mmdet 2.11) for mmdet 3's SwinTransformer.

    python tools/misc/convert_swin_checkpoint.py IN.pth OUT.pth

The backbone gets mmdet 3's module names and patch-merging channel order
(:func:`mmcd.models.swin_checkpoint.convert_swin_detection_state`); the
neck and heads keep theirs. The result loads into configs/swin/ and the
Mask R-CNN Swin configs (``tools/test.py CONFIG OUT.pth``).
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(
    __file__)))))
import torch  # noqa: E402

from mmcd.compat import load_from_local_weights_only  # noqa: E402
from mmcd.models.swin_checkpoint import \
    convert_swin_detection_state  # noqa: E402
from mmcd.utils.runner_setup import (UserError, check_checkpoint,  # noqa
                                     run_main)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='the Swin repository checkpoint')
    parser.add_argument('dst', help='where to write the converted one')
    args = parser.parse_args()
    check_checkpoint(args.src)
    checkpoint = load_from_local_weights_only(args.src)
    state = checkpoint.get('state_dict', checkpoint)
    try:
        converted = convert_swin_detection_state(state)
    except ValueError as err:
        raise UserError(f'{args.src}: {err}') from None
    meta = dict(checkpoint.get('meta') or {}, converted_from=args.src,
                converter='tools/misc/convert_swin_checkpoint.py')
    torch.save(dict(state_dict=converted, meta=meta), args.dst)
    print(f'wrote {args.dst}: {len(converted)} tensors')


if __name__ == '__main__':
    run_main(main)
