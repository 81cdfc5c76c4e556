"""lycolab's log lines in the notebook cell that caused them (the bucket report, fallbacks, resume decisions), and
the libraries' chatter kept out of them.

Python's logging prints nothing below WARNING unless something configures it, and notebooks configure nothing; the
CLI configures logging for itself (to stderr). So every notebook's first call (``open_workspace``) puts one handler
on the ``lycolab`` logger. It writes to whatever ``sys.stdout`` is *when a record is emitted* — IPython gives each
cell its own stream, so a handler holding the stream it saw first would print into an old cell or nowhere. INFO lines
appear as they are; warnings and errors get a short prefix instead of a logger name and a timestamp.

diffusers and transformers log loading details and draw a progress bar for every model they load; the CLI and the
notebooks both show errors only from them (:func:`quiet_libraries`), so what remains is lycolab's own account.
"""

from __future__ import annotations

import logging
import sys

PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}


class CurrentCellHandler(logging.Handler):
    """Writes each record to the ``sys.stdout`` of the moment (the running cell's output)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # a log line must never break the step that logs it
            self.handleError(record)


class ShortFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return PREFIXES.get(record.levelno, "") + text


def quiet_libraries() -> None:
    """Hide the libraries' own progress bars and deprecation chatter; our log says what matters."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are hard dependencies
        pass
    for client in ("httpx", "httpx2"):  # huggingface_hub's HTTP clients log every request at INFO
        logging.getLogger(client).setLevel(logging.WARNING)


def in_ipython() -> bool:
    """A running IPython shell (a notebook kernel or the IPython console); scripts and the CLI have none."""
    shell = sys.modules.get("IPython")
    return shell is not None and getattr(shell, "get_ipython", lambda: None)() is not None


def show_logs_here(level: int = logging.INFO, force: bool = False) -> logging.Handler | None:
    """Send lycolab's records at ``level`` and above to the notebook; calling it again changes nothing but the
    level (each notebook's first cell calls it). Outside IPython (scripts, the CLI, tests) it does nothing unless
    ``force``: those configure logging themselves. Records still propagate to the root logger."""
    if not (force or in_ipython()):
        return None
    package_logger = logging.getLogger("lycolab")
    handler = next((item for item in package_logger.handlers if isinstance(item, CurrentCellHandler)), None)
    if handler is None:
        handler = CurrentCellHandler()
        handler.setFormatter(ShortFormatter("%(message)s"))
        package_logger.addHandler(handler)
    handler.setLevel(level)
    if package_logger.level == logging.NOTSET or package_logger.level > level:
        package_logger.setLevel(level)
    quiet_libraries()
    return handler
