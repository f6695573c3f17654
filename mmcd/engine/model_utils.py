"""Small helpers shared by the MMEngine adapters."""
from mmengine.model import is_model_wrapper
from torch import nn


def bare_model(model: nn.Module) -> nn.Module:
    """The model inside an MMEngine model wrapper (DDP, FSDP...), or the
    model itself."""
    return model.module if is_model_wrapper(model) else model
