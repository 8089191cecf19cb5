"""Errors a user can act on.

Every error raised for bad input is a ``DensepipeError`` whose message is one line naming the file,
field or value and what was expected. The CLI prints it as ``error: <message>`` and exits with 2.
"""

from __future__ import annotations


class DensepipeError(Exception):
    """Base class: a one-line, user-facing message."""


class ConfigError(DensepipeError):
    """Invalid configuration: unknown key, wrong type, unknown task or backbone."""


class DataError(DensepipeError):
    """A dataset file is missing, corrupt or not in the expected format."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # survives a process pool
        return (type(self), (self.path, self.problem))


class PluginError(DensepipeError):
    """A task plugin failed to load or violates the plugin contract."""


class CheckpointError(DensepipeError):
    """A checkpoint is truncated, unreadable or belongs to another model configuration."""


class TrackingError(DensepipeError):
    """The MLflow tracking store cannot be reached or written; the message names the URI."""


class TrackingUnreachableError(TrackingError):
    """The tracking server did not answer: worth a retry (the message names the URI)."""


class PrefectServerError(DensepipeError):
    """A Prefect server cannot be started or does not answer; the message names the URL."""


class OutputError(DensepipeError):
    """An output path cannot be written without losing something: it holds files densepipe did
    not write, the project, a git checkout or the user's home."""


class ExportError(DensepipeError):
    """A model, or some of its tasks, cannot be exported in the requested format; the message names
    the tasks or values and what would work (``pipeline.export``)."""


def error_line(e: BaseException) -> str:
    """``"<ExceptionType>: <message on one line>"`` (the type alone for an empty message): how a
    plugin's failure to load or register is reported."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
