"""Tasks: episodes and the sources that draw them."""

from .episode import Episode
from .sampler import ClassPool, EpisodeSampler
from .sinusoid import SinusoidTasks

__all__ = ["Episode", "ClassPool", "EpisodeSampler", "SinusoidTasks"]
