"""Which exceptions mean "bad input the user can fix": the command line prints them as one line (exit 1) and the
notebooks as a one-line cell error. One list, so the two never disagree."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes bad input raises, each with a one-line message naming the file or key and the fix."""
    from lycolab.config import ConfigError
    from lycolab.data.images import UnreadableImage
    from lycolab.files import WriteError
    from lycolab.models.download import DownloadError
    from lycolab.models.load import ModelLoadError
    from lycolab.networks import AdapterFileError
    from lycolab.training import TrainingError

    return (ConfigError, TrainingError, ModelLoadError, AdapterFileError, UnreadableImage, DownloadError,
            WriteError, FileNotFoundError, ValueError)
