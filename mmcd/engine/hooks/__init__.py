from .post_training_quant_hook import PostTrainingQuantHook

__all__ = ['PostTrainingQuantHook']
