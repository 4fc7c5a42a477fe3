"""User-facing errors.

Every error a user can cause (bad flags, bad data, a diverging run) is raised as a
:class:`FastAdaptError` with a one-line message that names the problem and the fix. The CLI
prints such errors without a traceback; library users can catch them by class.
"""


class FastAdaptError(Exception):
    """Base class of the errors fastadapt raises for bad input or a failed run."""


class ConfigError(FastAdaptError, ValueError):
    """An option has an impossible value (too many ways, a negative step count, ...)."""


class DataError(FastAdaptError):
    """A dataset is missing, corrupt or too small for the requested episodes."""


class UnknownNameError(ConfigError, KeyError):
    """A method, dataset or backbone name is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NonFiniteLossError(FastAdaptError, FloatingPointError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""
