"""A log formatter that prints the pipeline's own errors as one line instead of a traceback."""

import logging
import sys

from pipeline.errors import PipelineError


class OneLineErrors(logging.Formatter):
    """Formats records carrying a PipelineError as 'ERROR: <message>'; everything else as usual.

    PipelineError messages already name the container, layer or path and say what to do, so a traceback would
    only bury them. Bugs (any other exception) keep their full traceback.
    """

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if error is None and record.levelno >= logging.WARNING and "Traceback" in record.getMessage():
            # luigi logs failures of requires() as preformatted text from inside its except block.
            error = sys.exc_info()[1]
        if isinstance(error, PipelineError):
            return f"ERROR: {error}"
        return super().format(record)
