"""The errors a person sees.

Every message names the problem and what to do next. The CLI catches FastServeError at
the command boundary and prints it as one red line; anything else is a bug and keeps
its traceback.
"""


class FastServeError(Exception):
    """Base class: a problem the person can fix. `str(err)` is the whole message."""

    exit_code = 1


class ModelNotFound(FastServeError):
    """A model reference that resolves to nothing (unknown alias, missing path)."""


class ModelFormatError(FastServeError):
    """A model file that is truncated, corrupt, or uses an architecture/type we do not support."""


class DownloadError(FastServeError):
    """Fetching a model failed (offline, package index refused, checksum mismatch)."""


class ConfigError(FastServeError):
    """A settings file or flag value that is out of range or malformed."""


class ContextOverflow(FastServeError):
    """A single message is longer than the whole context window."""


class PlanError(FastServeError):
    """The machines found cannot hold the model (or cannot give the spread asked for)."""
