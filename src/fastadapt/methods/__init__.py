"""Meta-learners. Importing this package registers every method."""

from .base import MetaLearner
from .protonet import ProtoNet

__all__ = ["MetaLearner", "ProtoNet"]
