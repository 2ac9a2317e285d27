"""`python -m pipeline demo|export|snapshots|thaw ...`: the small commands beside luigi's (also pipeline-* scripts)."""

import sys

from pipeline import cli, demo
from pipeline.host import freezer
from pipeline.snapshots import catalog, export

COMMANDS = {
    "demo": demo.main,
    "export": export.main,
    "run": cli.console_main,
    "snapshots": catalog.main,
    "thaw": freezer.main,
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(
            "usage: python -m pipeline {demo [DIR] | export REF -o FILE [--store DIR] [--format F]"
            " | run TASK [FLAGS] | snapshots [OUTPUT_DIR]"
            " | thaw CACHE_DIR/freezer}",
            file=sys.stderr,
        )
        return 2
    return COMMANDS[sys.argv[1]](sys.argv[2:])


sys.exit(main())
