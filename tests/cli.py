"""Runs the real command line (`luigi --module pipeline ...`) in a subprocess, as users do."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_luigi(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`luigi --module pipeline ARGS --local-scheduler` from the repository root (where luigi.cfg is)."""
    full_env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"} | (env or {})
    command = [sys.executable, "-m", "luigi", "--module", "pipeline", *args, "--local-scheduler"]
    # Every scenario doubles as a check that the source storage is only ever read.
    root = Path(args[args.index("--storage-root") + 1]) if "--storage-root" in args else None
    before = tree_fingerprint(root) if root and root.exists() else None
    result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if root and before is not None:
        assert tree_fingerprint(root) == before, f"the run wrote into the source storage {root}"
    return result


def commit_args(storage_root: Path, work: Path, *extra: str) -> list[str]:
    """CommitImage's flags pointing at a storage and at output/cache dirs under work."""
    return [
        "CommitImage",
        "--storage-root",
        str(storage_root),
        "--commit-output-dir",
        str(work / "out"),
        "--commit-cache-dir",
        str(work / "cache"),
        *extra,
    ]


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]


def tree_fingerprint(root: Path) -> str:
    """A digest of everything under root: names, types, content, mode, owner, mtime, xattrs."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        dirnames.sort()
        for name in sorted([b".", *dirnames, *filenames]):
            path = os.path.join(dirpath, name) if name != b"." else dirpath
            st = os.lstat(path)
            h.update(b"%s %o %d %d %d %d\n" % (path, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_rdev))
            for attr in sorted(os.listxattr(path, follow_symlinks=False)):
                h.update(attr.encode() + os.getxattr(path, attr, follow_symlinks=False))
            if os.path.islink(path):
                h.update(os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()
