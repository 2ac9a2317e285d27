"""A log formatter that prints the pipeline's own errors as one line instead of a traceback, and the stderr
handler of config/logging.conf, which prints an unreachable central scheduler once."""

import logging
import re
from types import TracebackType
from typing import TextIO

from pipeline.errors import PipelineError

# luigi logs failures of complete()/requires() as preformatted traceback text, whose last line names the error.
_TRACEBACK_TAIL = re.compile(
    r"Traceback \(most recent call last\):.*\npipeline(?:\.\w+)+: (?P<message>[^\n]*)\s*$", re.S
)
# luigi/rpc.py's RPCError when every attempt to reach luigid failed (not its "null response" RPCError: that luigid
# answered, so it is luigid's problem, and keeps its traceback).
_UNREACHABLE = re.compile(r"Errors \(\d+ attempts\) when connecting to remote scheduler '(?P<url>[^']*)'")
# What would break an error's one line: a file name or a stored value may hold newlines and other control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class OneLineErrors(logging.Formatter):
    """Formats records carrying a PipelineError as 'ERROR: <message>'; everything else as usual.

    PipelineError messages already name the container, layer or path and say what to do, so a traceback would
    only bury them. So does a central scheduler (luigid) that cannot be reached: one line names it and says what
    to do. Bugs (any other exception) keep their full traceback.
    """

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PipelineError) or _is_usage_error(error):
            return f"ERROR: {one_line(str(error))}"
        unreachable = scheduler_unreachable(error)
        if unreachable:
            return f"ERROR: {unreachable}"
        if error is None and record.levelno >= logging.WARNING:
            match = _TRACEBACK_TAIL.search(record.getMessage())
            if match:
                return f"ERROR: {match['message']}"
        return super().format(record)

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802 - logging's name
        # luigi logs its scheduler retries with exc_info=True outside any except block, which the standard
        # formatter prints as a bogus "NoneType: None" line: no exception, nothing to print.
        return "" if ei[1] is None else super().formatException(ei)


class OneLineStderr(logging.StreamHandler[TextIO]):
    """A StreamHandler (stderr by default) that prints an unreachable scheduler's error once.

    luigi logs the same RPCError twice: "Luigi unexpected framework error while scheduling ..." (luigi/worker.py)
    and "Uncaught exception in luigi" (luigi/retcodes.py). OneLineErrors turns the first into the one ERROR line;
    this drops the second. Every other record passes.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)  # None: sys.stderr
        self._reported: list[BaseException] = []  # strong references: ids of dead exceptions get reused

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # On a terminal a progress line (host/terminal.py) may stand drawn without its newline, by this process or
        # another worker's: a record erases it and takes the line (the progress is drawn again below at its next
        # update) instead of being appended to its end.
        return _ERASE_LINE + text if _is_terminal(self.stream) else text

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and scheduler_unreachable(error):
            if any(error is seen for seen in self._reported):
                return False
            self._reported.append(error)
        return bool(super().filter(record))


_ERASE_LINE = "\r\x1b[K"  # to the line's start, then erase to its end


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def one_line(message: str) -> str:
    """message with control characters escaped (a newline as \\n), so it stays one line."""
    return _CONTROL.sub(lambda match: match[0].encode("unicode_escape").decode("ascii"), message)


def scheduler_unreachable(error: BaseException | None) -> str | None:
    """The one-line message for luigi's RPCError "when connecting to remote scheduler": which luigid, why, and what
    to do. None for anything else (matched by name so this module needs no luigi import)."""
    if error is None or not any(
        cls.__name__ == "RPCError" and cls.__module__ == "luigi.rpc" for cls in type(error).__mro__
    ):
        return None
    match = _UNREACHABLE.match(str(error))
    if not match:
        return None
    cause = getattr(error, "sub_exception", None) or error.__cause__ or error.__context__
    return (
        f"the central scheduler (luigid) at {match['url']} cannot be reached: {_reason(cause)}; "
        "start luigid there, or run with --local-scheduler / [core] local_scheduler = true"
    )


def _reason(error: BaseException | None) -> str:
    """The innermost operating-system reason ("Connection refused", "timed out") behind a connection error."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        if isinstance(error, TimeoutError):
            return "timed out"
        inner = getattr(error, "reason", None)  # urllib's URLError wraps the socket error
        if not isinstance(inner, BaseException):
            inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return str(error) if error is not None else "no answer"


def _is_usage_error(error: BaseException | None) -> bool:
    # luigi's own command-line mistakes (missing or unknown parameters) are the user's, not bugs; matched by
    # name so this module needs no luigi import.
    return error is not None and any(cls.__name__ == "ParameterException" for cls in type(error).__mro__)
