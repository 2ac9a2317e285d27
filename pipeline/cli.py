"""`python -m pipeline run TASK [luigi flags]` (or `pipeline-run`): luigi's own command line with
`--module pipeline`, which also waits for, and then succeeds with, other workers of the same luigid.

luigi's exit code reflects this process's view only: a task another worker is running, or ran to completion,
counts as "not run" here (exit codes not_run, missing_data, already_running). Then the root task is checked:
complete means every target exists and the run succeeded (exit 0); otherwise luigi runs again after a pause,
so this process either picks up what the others left or sees them finish, until the root task is complete
or PIPELINE_WAIT_SECONDS (default 3600) have passed.
"""

import logging
import os
import sys
import time

import luigi
import luigi.cmdline_parser
import luigi.retcodes

log = logging.getLogger("luigi-interface")
_POLL_SECONDS = 5.0


def run(argv: list[str]) -> int:
    args = ["--module", "pipeline", *argv]
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


def _run_once(args: list[str]) -> int:
    try:
        luigi.retcodes.run_with_retcodes(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def _root_complete(args: list[str]) -> bool:
    with luigi.cmdline_parser.CmdlineParser.global_instance(args) as parser:
        return bool(parser.get_task_obj().complete())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: pipeline-run TASK [luigi flags], e.g. pipeline-run SnapshotAll --workers 2", file=sys.stderr)
        return 2
    return run(args)
