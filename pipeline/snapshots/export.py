"""`python -m pipeline export REF -o FILE`: one snapshot of a snapshot store written as a standalone image archive
(for `docker load`, `podman load`, `skopeo ... docker-archive:`), as a commit writes its archive."""

import argparse
import logging
import sys
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.logformat import one_line
from pipeline.snapshots.store import EXPORT_FORMATS, SnapshotStore

# <[commit] output_dir>/store, with output_dir's default.
DEFAULT_STORE = Path("images/store")


def main(argv: list[str] | None = None) -> int:
    """Export one snapshot; 0 on success, 1 with one `ERROR:` line on stderr when it cannot."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline export",
        description="Write one snapshot of a snapshot store as a standalone image archive.",
    )
    parser.add_argument("reference", metavar="REF", help="the snapshot, as the store names it: NAME:STAMP")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="FILE", help="the archive to write")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, metavar="DIR", help=f"default: {DEFAULT_STORE}")
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="both",
        help="both (default: docker-archive and OCI archive in one tar, as docker save writes), docker or oci",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        entry = SnapshotStore(args.store).export_image(args.reference, args.output, args.format)
    except PipelineError as e:
        print(f"ERROR: {one_line(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"ERROR: {one_line(f'{e.filename or args.output}: {e.strerror or e}')}; fix and re-run", file=sys.stderr)
        return 1
    print(f"{args.output}: {entry.reference} ({args.format})")
    return 0
