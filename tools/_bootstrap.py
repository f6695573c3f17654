"""Shared start of the command-line tools (import it before torch): quiet a
known deprecation warning of the pinned stack, make the checkout importable
without installing, and put large CPU tensors on transparent huge pages.

PyTorch allocates every CPU tensor afresh; one of more than 32 MB comes from
the kernel page by page (4 KB), and the page faults cost more than the op
that fills it: measured on 2 cores, ``x * 2`` into a new 256 MB tensor took
165 ms against 28 ms into an existing one. PyTorch's own switch
``THP_MEM_ALLOC_ENABLE=1`` (read once, at its first allocation, hence before
``import torch``) asks for 2 MB pages for tensors of 2 MB and more: 37 ms.
RepQ-ViT's one-batch calibration holds the largest tensors (Mask R-CNN
Swin-T, 32 images at 512x768: 176.6 -> 137.8 s,
tools/benchmarks/ptq_speed.py). An explicit ``THP_MEM_ALLOC_ENABLE=0`` is
kept; on kernels with transparent huge pages off it changes nothing.
"""
import os
import os.path as osp
import sys
import warnings

if 'torch' not in sys.modules:
    os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')
# mmengine 0.10.7 imports pkg_resources (setuptools < 82 keeps it).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
