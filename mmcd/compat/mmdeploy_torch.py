"""mmdeploy 1.3.1 (the last release, for mmdet 3 / mmcv 2) on current PyTorch.

mmdeploy exports through ``torch.onnx.export``'s TorchScript exporter: its
rewriters patch module functions during a trace and its symbolics emit ONNX
nodes from the traced graph. Three things of PyTorch it relies on changed
(measured with torch 2.13 exporting mmdet 3.3's Mask R-CNN):

* since torch 2.9 ``torch.onnx.export`` defaults to ``dynamo=True``, the
  ``torch.export`` exporter, which does not run mmdeploy's symbolics and
  fails inside mmcv's compiled RoIAlign ("The tensor has a non-zero number
  of elements, but its data is not allocated yet"), after which mmdeploy's
  rewriter context fails on exit (``KeyError: -1``);
* ``torch.onnx.symbolic_opset9._cast_Long``, which mmdeploy's RoIAlign
  symbolic imports, was removed (``ImportError``);
* ``torch.fx``'s registry of wrapped functions became a dict (a list
  before), so mmdeploy's rewriter context, which pops the entries added
  during an export from its end, fails on exit with ``KeyError: -1`` and
  hides whatever error the export raised.

:func:`torchscript_export` restores the three for the duration of an export:
``dynamo=False`` unless the caller says otherwise, ``_cast_Long`` as
an ONNX ``Cast`` to int64 (what it was), and the rewriter's exit removing
the registry's newest entries by key. Nothing else of mmdeploy is
changed. mmdeploy pins ``protobuf<=3.20.2``, which onnxruntime 1.32 and
onnx 1.23 refuse; it is installed without its dependencies
(``requirements/mmdeploy.txt``), which this export does not need.
"""
import contextlib
import functools

import torch

#: ONNX TensorProto data type of int64
_INT64 = 7


def _cast_long(g, value, non_blocking):
    return g.op('Cast', value, to_i=_INT64)


def _exit_with_dict_registry(original_exit):
    """mmdeploy's ``FunctionRewriter.exit`` for torch.fx's dict registry:
    the entries added since ``enter`` (the newest, a dict keeps insertion
    order) are removed, then the original exit restores the functions."""

    @functools.wraps(original_exit)
    def exit(self):
        from torch.fx import _symbolic_trace
        registry = _symbolic_trace._wrapped_fns_to_patch
        if isinstance(registry, dict):
            for key in list(registry)[self._ori_fx_wrap_num:]:
                del registry[key]
        return original_exit(self)

    return exit


@contextlib.contextmanager
def torchscript_export():
    """Within the block, ``torch.onnx.export`` uses the TorchScript exporter
    by default, ``torch.onnx.symbolic_opset9._cast_Long`` exists and
    mmdeploy's rewriter exit handles the dict registry (module docstring);
    all three are restored on exit."""
    import torch.onnx.symbolic_opset9 as opset9
    from mmdeploy.core.rewriters.function_rewriter import FunctionRewriter
    original_export = torch.onnx.export
    original_exit = FunctionRewriter.exit
    had_cast_long = hasattr(opset9, '_cast_Long')

    @functools.wraps(original_export)
    def export(*args, **kwargs):
        kwargs.setdefault('dynamo', False)
        return original_export(*args, **kwargs)

    torch.onnx.export = export
    FunctionRewriter.exit = _exit_with_dict_registry(original_exit)
    if not had_cast_long:
        opset9._cast_Long = _cast_long
    try:
        yield
    finally:
        torch.onnx.export = original_export
        FunctionRewriter.exit = original_exit
        if not had_cast_long:
            del opset9._cast_Long
