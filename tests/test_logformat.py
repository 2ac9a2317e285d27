"""One-line errors in luigi's log: an unreachable central scheduler becomes one ERROR line, printed once; every
other exception (a bug, luigid answering nonsense) keeps its traceback."""

import io
import logging
import os
import pty
import socket
import urllib.error
from collections.abc import Iterator

import luigi.rpc
import pytest

from pipeline.logformat import OneLineErrors, OneLineStderr, scheduler_unreachable

URL = "http://127.0.0.1:8082"
HINT = "start luigid there, or run with --local-scheduler / [core] local_scheduler = true"


def _unreachable(cause: BaseException) -> luigi.rpc.RPCError:
    # As luigi/rpc.py's _fetch raises it, inside the handler of the fetcher's error.
    try:
        try:
            raise cause
        except Exception as e:
            raise luigi.rpc.RPCError(f"Errors (3 attempts) when connecting to remote scheduler '{URL}'", e) from None
    except luigi.rpc.RPCError as error:
        return error


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger printing through config/logging.conf's handler and formatter into a string."""
    out = io.StringIO()
    handler = OneLineStderr(out)
    handler.setFormatter(OneLineErrors("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger(f"test-logformat-{id(out)}")
    log.addHandler(handler)
    log.propagate = False
    yield log, out
    log.removeHandler(handler)


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "Connection refused"),
        (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), "Name or service not known"),
        (TimeoutError("timed out"), "timed out"),
        (urllib.error.HTTPError(URL, 404, "Not Found", {}, None), "HTTP Error 404: Not Found"),  # type: ignore[arg-type]
    ],
)
def test_an_unreachable_scheduler_is_one_line_naming_it_and_what_to_do(cause: BaseException, reason: str) -> None:
    assert scheduler_unreachable(_unreachable(cause)) == (
        f"the central scheduler (luigid) at {URL} cannot be reached: {reason}; {HINT}"
    )


def test_luigi_logging_one_unreachable_scheduler_twice_prints_one_line(
    logger: tuple[logging.Logger, io.StringIO],
) -> None:
    log, out = logger
    error = _unreachable(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    for message in (
        "Luigi unexpected framework error while scheduling CommitImage(...)",
        "Uncaught exception in luigi",
    ):
        log.error(message, exc_info=error)
    assert out.getvalue().splitlines() == [
        f"ERROR: the central scheduler (luigid) at {URL} cannot be reached: Connection refused; {HINT}"
    ]
    log.error("Uncaught exception in luigi", exc_info=_unreachable(ConnectionRefusedError(111, "Connection refused")))
    assert len(out.getvalue().splitlines()) == 2, "a new failure is a new line"


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("a bug"),
        luigi.rpc.RPCError(f"Received null response from remote scheduler '{URL}'"),  # luigid answered
        ConnectionRefusedError(111, "Connection refused"),  # not through luigi's scheduler client
    ],
)
def test_other_errors_keep_their_traceback_every_time(
    error: Exception, logger: tuple[logging.Logger, io.StringIO]
) -> None:
    log, out = logger
    for _ in range(2):
        try:
            raise error
        except Exception:
            log.exception("Uncaught exception in luigi")
    printed = out.getvalue()
    assert printed.count("Traceback (most recent call last):") == 2, printed
    assert not any(line.startswith("ERROR:") for line in printed.splitlines()), printed


def test_exc_info_without_an_exception_prints_no_bogus_line(logger: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = logger
    log.warning("Failed connecting to remote scheduler %r", URL, exc_info=True)  # as luigi/rpc.py's retry log does
    assert out.getvalue() == f"WARNING {log.name}: Failed connecting to remote scheduler '{URL}'\n"


def test_on_a_terminal_a_record_takes_the_line_a_progress_line_stands_on() -> None:
    """host/terminal.py draws progress in place, without a newline: a log record (this process's or another
    worker's) erases that line and starts at its beginning; written to a file or pipe, a record is unchanged."""
    parent, child = pty.openpty()
    with os.fdopen(child, "w") as tty:
        handler = OneLineStderr(tty)
        tty.write("\rweb-1: 3.0 of 9.0 MiB packed, 1.0 MiB/s, 0:06 left\x1b[K")
        handler.emit(logging.makeLogRecord({"name": "pipeline", "levelname": "INFO", "msg": "packed web-1"}))
    drawn = os.read(parent, 4096).decode()
    os.close(parent)
    assert drawn.endswith("left\x1b[K\r\x1b[Kpacked web-1\r\n"), repr(drawn)
    piped = io.StringIO()
    OneLineStderr(piped).emit(logging.makeLogRecord({"name": "pipeline", "levelname": "INFO", "msg": "packed web-1"}))
    assert piped.getvalue() == "packed web-1\n"
