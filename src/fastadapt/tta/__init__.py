"""Test-time adaptation: BN adaptation, TENT and Test-Time Training, with CIFAR-10-C shifts.

``from fastadapt.tta import Tent, configure_model, collect_params`` adapts any PyTorch model with
BatchNorm layers; see :mod:`fastadapt.tta.tent`.
"""

from .bn import BNAdapt
from .corruptions import CORRUPTIONS, corrupt, corrupt_dataset
from .tent import Tent, check_model, collect_params, configure_model, setup_tent, softmax_entropy
from .ttt import TTT

__all__ = [
    "BNAdapt", "CORRUPTIONS", "TTT", "Tent", "check_model", "collect_params", "configure_model",
    "corrupt", "corrupt_dataset", "setup_tent", "softmax_entropy",
]
