"""A test-only hook: each rank saves its model state after training, so a
test can check that the ranks of a distributed run ended identical."""
import os.path as osp

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SaveRankStateHook(Hook):
    priority = 'LOWEST'

    def after_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        torch.save({k: v.detach().cpu() for k, v in
                    model.state_dict().items()},
                   osp.join(runner.work_dir, f'rank{runner.rank}_state.pth'))
