"""fastadapt: efficient meta-learning and test-time adaptation on PyTorch.

The names below are the short way in; everything is also importable from its own module.
"""

__version__ = "0.1.0"

from . import data, methods, models, optim  # noqa: E402,F401  (importing registers datasets, methods, backbones, optimizers)
from .data import build_task_source  # noqa: E402
from .engine.evaluate import evaluate, format_result  # noqa: E402
from .engine.runs import load_run  # noqa: E402
from .engine.trainer import TrainSettings, meta_train  # noqa: E402
from .methods import ANIL, FOMAML, IMAML, MAML, MetaLearner, MetaSGD, Pretrained, ProtoNet, Reptile  # noqa: E402
from .methods import NCM, Qiao  # noqa: E402
from .methods import LearnedInit, RandomInit, TransINR  # noqa: E402
from .methods.maml import BodyHead  # noqa: E402
from .models import Conv4  # noqa: E402
from .models import ResNet12  # noqa: E402
from .tasks import ClassPool, Episode, EpisodeSampler  # noqa: E402

# Every registered method is exported here (tests/test_public_api.py checks it).
__all__ = ["build_task_source", "evaluate", "format_result", "TrainSettings", "meta_train", "load_run", "MetaLearner",
           "ProtoNet", "MAML", "FOMAML", "ANIL", "MetaSGD", "Reptile", "IMAML", "Pretrained", "BodyHead",
           "Conv4", "ClassPool", "Episode", "EpisodeSampler",
           "NCM", "Qiao", "ResNet12", "TransINR", "LearnedInit", "RandomInit"]
