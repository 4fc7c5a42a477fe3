"""Meta-learners. Importing this package registers every method."""

from .base import MetaLearner
from .protonet import ProtoNet
from .maml import ANIL, FOMAML, MAML, MetaSGD, Pretrained
from .reptile import Reptile
from .imaml import IMAML
from .ncm import NCM
from .qiao import Qiao
from .learned_init import LearnedInit, RandomInit
from .trans_inr import TransINR

__all__ = ["MetaLearner", "ProtoNet", "MAML", "FOMAML", "ANIL", "MetaSGD", "Pretrained", "Reptile", "IMAML", "NCM", "Qiao",
           "LearnedInit", "RandomInit", "TransINR"]
