"""Tasks: episodes and the sources that draw them."""

from .episode import Episode, EpisodeWithClasses, LabelledBatch
from .sampler import ClassPool, EpisodeSampler
from .sinusoid import SinusoidTasks
from .optimizee import Problem, make_problem

__all__ = ["Episode", "EpisodeWithClasses", "LabelledBatch", "ClassPool", "EpisodeSampler", "SinusoidTasks", "Problem", "make_problem"]
