"""rechannel: compress a causal LM, measure what it lost, recover it with routed soft prompts.

The Python API: each function takes a frozen config dataclass (the options of the command of the same name)
and an optional progress callback, and returns what the command prints or writes.

    import rechannel
    report = rechannel.compress(rechannel.CompressConfig(output="out/mag50", method="magnitude"))
"""

from .ops.align.api import AlignRunConfig, align
from .ops.compress.api import CalibrateConfig, CompressConfig, calibrate, compress
from .ops.core.errors import UserError
from .ops.core.progress import Progress
from .ops.core.version import __version__
from .ops.evaluation.api import EvalConfig, evaluate
from .ops.recover.api import TrainConfig, train_prompts

__all__ = ["AlignRunConfig", "CalibrateConfig", "CompressConfig", "EvalConfig", "Progress", "TrainConfig", "UserError",
           "__version__", "align", "calibrate", "compress", "evaluate", "train_prompts"]
