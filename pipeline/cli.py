"""`python -m pipeline run TASK [luigi flags]` (or `pipeline-run`): luigi's own command line with
`--module pipeline`, which also waits for, and then succeeds with, other workers of the same luigid.

luigi's exit code reflects this process's view only: a task another worker is running, or ran to completion,
counts as "not run" here (exit codes not_run, missing_data, already_running). Then the root task is checked:
complete means every target exists and the run succeeded (exit 0); otherwise luigi runs again after a pause,
so this process either picks up what the others left or sees them finish, until the root task is complete
or PIPELINE_WAIT_SECONDS (default 3600) have passed.

Two differences from plain luigi in choosing the scheduler. `--scheduler-host`, `--scheduler-port` or
`--scheduler-url` mean "use that luigid", even where the config says `[core] local_scheduler = true` (as this
repository's luigi.cfg does; plain luigi then ignores them). And when a luigid is to be used, it is asked once,
without retries, before anything runs: one that cannot be reached is a one-line error at once, not after luigi's
retries.
"""

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import NoReturn

import luigi
import luigi.cmdline_parser
import luigi.configuration
import luigi.interface
import luigi.parameter
import luigi.retcodes
import luigi.rpc

import pipeline.tasks  # noqa: F401 - registers the tasks (pipeline was imported before luigi)
from pipeline.logformat import scheduler_unreachable

log = logging.getLogger("luigi-interface")
_POLL_SECONDS = 5.0
_SCHEDULER_FLAGS = ("--scheduler-host", "--scheduler-port", "--scheduler-url")


def run(argv: list[str]) -> int:
    args = ["--module", "pipeline", *argv]
    # luigi reads [core] rpc_retry_attempts/rpc_retry_wait (config/production.cfg) in luigi/rpc.py, yet its core
    # config class warns they are "not consumed by the task 'core'".
    warnings.filterwarnings(
        "ignore", "The configuration contains the parameter 'rpc_", luigi.parameter.UnconsumedParameterWarning
    )
    if _given(argv, "--local-scheduler") and any(_given(argv, flag) for flag in _SCHEDULER_FLAGS):
        print("ERROR: --local-scheduler and --scheduler-* contradict each other; give one of them", file=sys.stderr)
        return 2
    with _central_scheduler_if(any(_given(argv, flag) for flag in _SCHEDULER_FLAGS)):
        unreachable = _unreachable_scheduler(args)
        if unreachable:
            print(f"ERROR: {unreachable}", file=sys.stderr)
            return int(luigi.retcodes.retcode().unhandled_exception)  # what plain luigi exits with in this case
        return _run_until_complete(args)


def _run_until_complete(args: list[str]) -> int:
    deadline = time.monotonic() + float(os.environ.get("PIPELINE_WAIT_SECONDS", "3600"))
    while True:
        code = _run_once(args)
        codes = luigi.retcodes.retcode()
        if code == 0 or code not in {codes.not_run, codes.missing_data, codes.already_running}:
            return code
        if _root_complete(args):
            log.info("every target exists: the tasks this process did not run were run by other workers")
            return 0
        if time.monotonic() > deadline:
            return code
        log.info("other workers are still running part of this graph; checking again in %.0f s", _POLL_SECONDS)
        time.sleep(_POLL_SECONDS)


def _given(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in argv)


@contextlib.contextmanager
def _central_scheduler_if(wanted: bool) -> Iterator[None]:
    """While active (when wanted): [core] local_scheduler = false in luigi's in-memory config, whatever its files
    say. luigi cannot be told so on its command line: --local-scheduler is a switch that only turns it on."""
    if not wanted:
        yield
        return
    config = luigi.configuration.get_config()
    before = config.get("core", "local_scheduler", None)
    config.set("core", "local_scheduler", "false")
    try:
        yield
    finally:
        if before is None:
            config.remove_option("core", "local_scheduler")
        else:
            config.set("core", "local_scheduler", before)


def _unreachable_scheduler(args: list[str]) -> str | None:
    """None when this run schedules in-process or its luigid answers; otherwise the one-line error naming it.

    One request (luigid's cheap has_task_history), one attempt: luigi's own client retries every call
    ([core] rpc_retry_attempts, rpc_retry_wait: a minute by default) before it gives up with a traceback.
    """
    if _given(args, "--local-scheduler"):
        return None  # in-process: no luigid to ask, and no parser to build for it (luigi builds three per run)
    try:
        with luigi.cmdline_parser.CmdlineParser.global_instance(args):
            core = luigi.interface.core()
    except Exception:  # a malformed flag (--scheduler-port x): luigi's own run reports it, as it always did
        return None
    if core.local_scheduler:
        return None
    url = core.scheduler_url or f"http://{core.scheduler_host}:{core.scheduler_port:d}/"
    scheduler = luigi.rpc.RemoteScheduler(url)  # luigi's own client: http+unix URLs and user:password@ work too
    scheduler._rpc_retry_attempts = 1  # luigi/rpc.py reads its retry policy from these at every call
    scheduler._rpc_log_retries = False
    try:
        scheduler.has_task_history()  # type: ignore[attr-defined]  # rpc.py setattr()s every RPC method
    except luigi.rpc.RPCError as error:
        return scheduler_unreachable(error) or str(error)
    finally:
        scheduler.close()
    return None


def _run_once(args: list[str]) -> int:
    try:
        luigi.retcodes.run_with_retcodes(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def _root_complete(args: list[str]) -> bool:
    with luigi.cmdline_parser.CmdlineParser.global_instance(args) as parser:
        return bool(parser.get_task_obj().complete())


def console_main(argv: list[str] | None = None) -> NoReturn:
    """main() as the command line runs it (pipeline-run, python -m pipeline run): once luigi has returned, every
    task process is joined and every file closed, so the process exits at once after flushing its logs and
    streams, without the interpreter's teardown of every object and module (about 0.13 s of an unchanged
    snapshot run's 0.9 s, measured)."""
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: pipeline-run TASK [luigi flags], e.g. pipeline-run SnapshotAll --workers 2", file=sys.stderr)
        return 2
    return run(args)
