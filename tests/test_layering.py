"""mmcd.core is pure PyTorch: none of its modules imports OpenMMLab."""
import ast
import glob
import os.path as osp

from conftest import REPO

OPENMMLAB = ('mmengine', 'mmcv', 'mmdet', 'mmpretrain')


def test_core_imports_no_openmmlab():
    files = glob.glob(osp.join(REPO, 'mmcd', 'core', '**', '*.py'),
                      recursive=True)
    assert len(files) > 8
    for path in files:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert not name.startswith(OPENMMLAB), f'{path}: {name}'
