# The training hooks of an OFQ quantization-aware fine-tuning (a QATDetector
# config lists this file after its detector's config in _base_): the
# quantizers calibrated on 32 train images before the first step, OFQ's
# confidence-guided annealing over the last 10% of training, and the weight
# oscillation statistics over 50-iteration windows.
custom_hooks = [
    dict(type='QuantAwareTrainingHook', calib=dict(num_images=32)),
    dict(type='ConfidenceGuidedAnnealingHook', begin=0.9),  # OFQ's CGA
    dict(type='QuantOscillationHook', window=50)
]
