"""A log formatter that prints the pipeline's own errors as one line instead of a traceback."""

import logging
import re

from pipeline.errors import PipelineError

# luigi logs failures of complete()/requires() as preformatted traceback text, whose last line names the error.
_TRACEBACK_TAIL = re.compile(
    r"Traceback \(most recent call last\):.*\npipeline(?:\.\w+)+: (?P<message>[^\n]*)\s*$", re.S
)


class OneLineErrors(logging.Formatter):
    """Formats records carrying a PipelineError as 'ERROR: <message>'; everything else as usual.

    PipelineError messages already name the container, layer or path and say what to do, so a traceback would
    only bury them. Bugs (any other exception) keep their full traceback.
    """

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, PipelineError) or _is_usage_error(error):
            return f"ERROR: {error}"
        if error is None and record.levelno >= logging.WARNING:
            match = _TRACEBACK_TAIL.search(record.getMessage())
            if match:
                return f"ERROR: {match['message']}"
        return super().format(record)


def _is_usage_error(error: BaseException | None) -> bool:
    # luigi's own command-line mistakes (missing or unknown parameters) are the user's, not bugs; matched by
    # name so this module needs no luigi import.
    return error is not None and any(cls.__name__ == "ParameterException" for cls in type(error).__mro__)
