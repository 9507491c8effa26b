"""Training, one concept per module: config (TrainConfig), loop (train), step (one optimizer step: LR,
loss + aux losses, backward, clip, step; every loop takes it), optim (AdamW + carry-over), flops, dist
(DDP/FSDP, devices), checkpoint, metrics (csv + TensorBoard), final (the saved model).

The package's entry points, `TrainConfig` and `train`, are importable from here (the README's
example); everything else from the module that owns it.
"""

from upcycle.train.config import TrainConfig
from upcycle.train.loop import train

__all__ = ["TrainConfig", "train"]
