"""The one exception hierarchy of deepshrink.

Every error a user can cause is one of these. Each message names the offending value and the
fix. The command-line tool turns them into one-line messages, and each class carries its own
process exit code so that scripts can tell failures apart without parsing text.
"""

from __future__ import annotations


class DeepshrinkError(Exception):
    """Base class of every error deepshrink raises on purpose."""

    exit_code = 1


class ConfigError(DeepshrinkError, ValueError):
    """An argument, option or recipe value is invalid."""

    exit_code = 3


class DataError(DeepshrinkError):
    """A data set could not be found or read."""

    exit_code = 4


class FormatError(DeepshrinkError):
    """A file is malformed: truncated, wrong magic, or fields that disagree."""

    exit_code = 5


class CheckpointError(DeepshrinkError):
    """A checkpoint is missing, unreadable, or does not fit the model."""

    exit_code = 6


class ModelError(DeepshrinkError):
    """A model name or factory could not be resolved or built."""

    exit_code = 7


class UnsupportedLayerError(DeepshrinkError, TypeError):
    """A stage was asked to work on a layer type it does not support."""

    exit_code = 8


class OutputError(DeepshrinkError):
    """A result could not be written: the path is a directory, missing, full or not permitted."""

    exit_code = 9


class InternalError(DeepshrinkError):
    """Not the user's fault: a bug in deepshrink (the CLI reports it with this exit code)."""

    exit_code = 70
