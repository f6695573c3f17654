"""tools/analysis scripts share tools/_bootstrap.py (warning filter, import
path of the checkout)."""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
import _bootstrap  # noqa: E402,F401
