"""Shared start of the command-line tools: quiet a known deprecation warning
of the pinned stack, and make the checkout importable without installing."""
import os.path as osp
import sys
import warnings

# mmengine 0.10.7 imports pkg_resources (setuptools < 82 keeps it).
warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
