"""Tasks: episodes and the sources that draw them."""

from .episode import Episode, EpisodeWithClasses, LabelledBatch
from .sampler import ClassPool, EpisodeSampler
from .sinusoid import SinusoidTasks

__all__ = ["Episode", "EpisodeWithClasses", "LabelledBatch", "ClassPool", "EpisodeSampler", "SinusoidTasks"]
