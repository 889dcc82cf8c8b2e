"""One exception family. The CLI turns any EdgemedError into a one-line message and a non-zero exit."""

from __future__ import annotations


class EdgemedWarning(UserWarning):
    """A warning edgemed gives its user on purpose (shown on the terminal; the libraries' go to the log)."""


class EdgemedError(Exception):
    """Base of every error edgemed raises on purpose. The message says what was wrong and what to do."""

    exit_code = 2


class RecipeError(EdgemedError):
    """A recipe file or a --set override is invalid."""


class DataError(EdgemedError):
    """A data file, record or image is unusable."""


class ArchError(EdgemedError):
    """An architecture is not supported, or a model does not match the one expected."""


class ArtifactError(EdgemedError):
    """A run, model or export folder is missing, incomplete, of the wrong kind, or would be overwritten."""


class ExportError(EdgemedError):
    """An export cannot be written (unmappable tensor, quantised input, unsupported quant)."""


class ParityError(EdgemedError):
    """Parity or evaluation could not be run (not: the check failed; that is a result, exit code 1)."""


class ServeError(EdgemedError):
    """The server cannot start with the given settings."""
