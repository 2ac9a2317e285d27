"""`python -m pipeline demo|snapshots|thaw ...`: the small commands beside luigi's (same as pipeline-* scripts)."""

import sys

from pipeline import cli, demo
from pipeline.host import freezer
from pipeline.snapshots import catalog

COMMANDS = {"demo": demo.main, "run": cli.main, "snapshots": catalog.main, "thaw": freezer.main}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(
            "usage: python -m pipeline {demo [DIR] | run TASK [FLAGS] | snapshots [OUTPUT_DIR]"
            " | thaw CACHE_DIR/freezer}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


sys.exit(main())
