"""The layers: mmcd.core is pure PyTorch (none of its modules imports
OpenMMLab); the tools import the package, never each other."""
import ast
import glob
import os.path as osp

from conftest import REPO

OPENMMLAB = ('mmengine', 'mmcv', 'mmdet', 'mmpretrain')


def absolute_imports(path):
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_core_imports_no_openmmlab():
    files = glob.glob(osp.join(REPO, 'mmcd', 'core', '**', '*.py'),
                      recursive=True)
    assert len(files) > 8
    for path in files:
        for name in absolute_imports(path):
            assert not name.startswith(OPENMMLAB), f'{path}: {name}'


def test_tools_do_not_import_each_other():
    """Shared code lives in the package; a tool may import only the
    bootstrap modules that put the repository on the path."""
    files = glob.glob(osp.join(REPO, 'tools', '**', '*.py'), recursive=True)
    tool_modules = {osp.splitext(osp.basename(f))[0] for f in files}
    allowed = {'_bootstrap', '_analysis_bootstrap'}
    assert len(files) > 8
    for path in files:
        for name in absolute_imports(path):
            top = name.split('.')[0]
            assert top not in tool_modules - allowed, f'{path}: {name}'


def resolved_imports(path):
    """Absolute names of every import of ``path`` (relative ones resolved
    against its package)."""
    package = osp.relpath(osp.dirname(path), REPO).split(osp.sep)
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level \
                else []
            yield '.'.join(base + ([node.module] if node.module else []))


def test_the_library_does_not_import_tool_glue_and_core_stays_below():
    """mmcd.utils serves the tools; nothing of the library imports it, and
    mmcd.core imports no other mmcd layer."""
    for path in glob.glob(osp.join(REPO, 'mmcd', '**', '*.py'),
                          recursive=True):
        layer = osp.relpath(path, osp.join(REPO, 'mmcd')).split(osp.sep)[0]
        for name in resolved_imports(path):
            if layer != 'utils':
                assert not name.startswith('mmcd.utils'), f'{path}: {name}'
            if layer == 'core' and name.startswith('mmcd.'):
                assert name.startswith('mmcd.core'), f'{path}: {name}'
