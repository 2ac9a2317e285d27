"""A stateful test of the commit's central promise: a run that exits 0 leaves the container as it was during that
run, and nothing older.

One real rocker storage per example, its container's overlay mounted by the test for the whole example (as a
running container's is) and changed only through the kernel's merged view, so every whiteout and opaque directory
is the kernel's own. Between changes hypothesis interleaves commits, re-commits of an unchanged container, deletions
of outputs and cache files, commits SIGKILLed at a failpoint and (when docker-registry is installed) pushes; every
run that exits 0 must hold exactly the merged view recorded just before it ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from tests.support.cli import commit_args, error_lines, run_luigi
from tests.support.imagecheck import (
    check_image_archive,
    compare_trees,
    read_archive_manifest,
    unpack_layers_with_python,
)
from tests.support.overlay_storage import TreeView, build_rocker_storage, overlay_mount, read_tree
from tests.support.registry_server import RegistryServer, serve_registry

NAME = "sm-web"  # the container's name, which --id is given
IMAGE = "sm/c:latest"  # the archive's RepoTags, and what podman knows the loaded image by
PUSH_REPOSITORY, PUSH_TAG = "sm/c", "latest"
RAN = " ran successfully"  # luigi's summary line for tasks that ran; absent when every target was complete
# Where a run may be SIGKILLed (pipeline/host/failpoint.py; `grep -rn 'failpoint.reached(' pipeline/`), and up to which
# hit: a commit of a changed container packs one layer, but writes about six small files atomically.
FAILPOINTS = {
    "pack:started": 1,
    "pack:before-rename": 1,
    "pack:after-rename": 1,
    "pack:PackContainerLayer": 1,
    "task:layer-done": 1,
    "atomic:before-rename": 6,
    "atomic:after-rename": 6,
    "archive:blob-copied": 3,
}
CHANGES = ("write_file", "delete", "replace_dir", "chmod", "hardlink", "symlink", "rename", "set_xattr", "settings")
CACHE_SUBDIRS = ("layers", "commits", "blobs/sha256", "compressed")
MODES = (0o000, 0o600, 0o644, 0o700, 0o755, 0o1777, 0o2750, 0o4755)
_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
_NO_CREDENTIALS = {"PIPELINE_REGISTRY_USERNAME": "", "PIPELINE_REGISTRY_PASSWORD": ""}

# No shrinking: one example takes ~15 s, so shrinking a failure would take many minutes; a failure still prints
# its (at most 10) steps with every draw, which is a readable reproducer as it is.
SETTINGS = settings(
    max_examples=5,
    stateful_step_count=10,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


# --- helpers ------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _epoch(created: str) -> int:
    """An RFC 3339 `created` as whole seconds since the epoch."""
    return int(datetime.fromisoformat(created).timestamp())


def _archive_config(archive: Path) -> bytes:
    """The config blob a docker-archive's manifest.json names."""
    with tarfile.open(archive, "r:") as tar:
        member = tar.extractfile(read_archive_manifest(archive)["Config"])
        assert member is not None
        return member.read()


def _python_view(archive: Path, scratch: Path) -> TreeView:
    """The archive's layers applied by the Python unpacker (every diff_id verified on the way)."""
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        unpack_layers_with_python(archive, scratch)
        return read_tree(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _registry_get(host: str, path: str, accept: str | None = None) -> bytes:
    headers = {"Accept": accept} if accept else {}
    with urllib.request.urlopen(urllib.request.Request(f"http://{host}{path}", headers=headers), timeout=30) as r:
        data: bytes = r.read()
        return data


def _pulled_archive(host: str, dest: Path) -> tuple[bytes, Path]:
    """The tag's config, and its layers fetched from the registry into a minimal docker-archive at dest (so the
    Python unpacker applies them; it gunzips them itself)."""
    manifest = json.loads(_registry_get(host, f"/v2/{PUSH_REPOSITORY}/manifests/{PUSH_TAG}", _ACCEPT))
    config = _registry_get(host, f"/v2/{PUSH_REPOSITORY}/blobs/{manifest['config']['digest']}")
    assert "sha256:" + hashlib.sha256(config).hexdigest() == manifest["config"]["digest"]
    layers = [_registry_get(host, f"/v2/{PUSH_REPOSITORY}/blobs/{layer['digest']}") for layer in manifest["layers"]]
    names = [f"layer{i}" for i in range(len(layers))]
    index = [{"Config": "config.json", "RepoTags": [], "Layers": names}]
    members = [("manifest.json", json.dumps(index).encode()), ("config.json", config), *zip(names, layers, strict=True)]
    with tarfile.open(dest, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return config, dest


def _failure(result: CompletedProcess[str]) -> str:
    """What a failed run said: its one-line errors, else the exceptions its tasks raised, and luigi's summary."""
    lines = result.stderr.splitlines()
    errors = error_lines(result) or sorted({line.strip() for line in lines if "Error: " in line})
    summary = result.stderr[result.stderr.find("===== Luigi Execution Summary") :] if "=====" in result.stderr else ""
    return f"exit {result.returncode}: " + "\n".join(errors) + "\n" + summary


def _regular_files(top: Path) -> list[Path]:
    """The regular files under top, in an order that varies less between runs than their digest names do."""
    found = [p for p in top.rglob("*") if p.is_file() and not p.is_symlink()] if top.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_size, p.name))


def _lower_hardlink_inodes(lowers: list[Path]) -> frozenset[int]:
    """Inodes of lower files with several links. Without overlay's `index` feature a copied-up alias keeps the
    lower inode number in the merged view, so a new link to it would show the untouched lower alias as part of
    the same group there (a reporting artifact of overlay, not a real hardlink): such files are never linked."""
    found = set()
    for lower in lowers:
        for dirpath, _dirs, files in os.walk(os.fsencode(lower)):
            for name in files:
                st_ = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st_.st_mode) and st_.st_nlink > 1:
                    found.add(st_.st_ino)
    return frozenset(found)


# --- the machine ----------------------------------------------------------------------------------------------------


class CommitMachine(RuleBasedStateMachine):
    """A mounted container, its changes, and the commits, kills, deletions and pushes between them."""

    base: ClassVar[Path]  # set by the test: where each example's directory goes
    registry: ClassVar[RegistryServer | None] = None
    stats: ClassVar[Counter[str]] = Counter()
    open_stacks: ClassVar[list[contextlib.ExitStack]] = []  # mounts to undo even if hypothesis never tears down

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="sm-", dir=self.base))
        self.work = self.dir / "work"
        self.archive = self.work / "out" / "c.tar"
        self.iidfile = self.work / "c.iid"
        self.storage = build_rocker_storage(self.dir / "rocker", name=NAME)
        layers = self.storage.root / "overlay2"
        top = layers / self.storage.container_id
        # rocker's lower file lists the image layers bottom first; the kernel wants them top first.
        lowers = [layers / p for p in reversed((top / "lower").read_text().split(":"))]
        self.lower_inodes = _lower_hardlink_inodes(lowers)
        merged = self.dir / "merged"
        merged.mkdir()
        self.stack = contextlib.ExitStack()
        self.open_stacks.append(self.stack)
        self.merged = self.stack.enter_context(overlay_mount(lowers, top / "diff", top / "work", merged))
        self.last_change = time.time()  # the storage was just written
        self.clean = False  # archive and iid file are this state's, written by a run, untouched since
        self.push_clean = False  # the registry's tag is this state's and the cache untouched since that push
        self.diff_ids: list[str] | None = None  # rootfs.diff_ids of the last commit, while the container is unchanged
        self.view: TreeView | None = None
        self.mark: str | None = None  # the container's SM_MARK setting, once a change set one
        self.failed = False
        self.final_check = True  # teardown commits once more and checks with skopeo, umoci and podman
        self.names = 0
        self.stats["examples"] += 1

    # --- running the command line -------------------------------------------------------------------------------

    def _commit(self, env: dict[str, str] | None = None) -> CompletedProcess[str]:
        args = commit_args(
            self.storage.root,
            self.work,
            "--id", NAME, "--image", IMAGE, "--output", str(self.archive), "--iidfile", str(self.iidfile),
        )  # fmt: skip
        return run_luigi(*args, env=env)

    def _push(self, env: dict[str, str] | None = None) -> CompletedProcess[str]:
        assert self.registry is not None
        return run_luigi(
            "PushImage",
            "--id", NAME, "--image", f"{self.registry.host}/{PUSH_REPOSITORY}:{PUSH_TAG}",
            "--storage-root", str(self.storage.root),
            "--commit-cache-dir", str(self.work / "cache"), "--commit-output-dir", str(self.work / "out"),
            "--registry-insecure", "true", "--registry-backoff", "0.05",
            env={"DOCKER_CONFIG": str(self.dir / "no-docker-config"), **_NO_CREDENTIALS, **(env or {})},
        )  # fmt: skip

    @contextlib.contextmanager
    def _step(self, name: str) -> Iterator[None]:
        self.stats[name] += 1
        self.stats["steps"] += 1
        try:
            yield
        except BaseException:
            self.failed = True
            raise

    # --- what every run that exits 0 must have left -------------------------------------------------------------

    def _check_commit(self, view: TreeView, result: CompletedProcess[str]) -> None:
        assert result.returncode == 0, f"commit failed, {_failure(result)}"
        compare_trees(view, _python_view(self.archive, self.dir / "unpacked"), label="python, after a commit")
        config = _archive_config(self.archive)
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        assert self.iidfile.read_text() == digest, "the iid file names another image than the archive holds"
        created = _epoch(json.loads(config)["created"])
        assert created >= int(self.last_change), (
            f"the archive's image was created at {created}, before the container's last change at"
            f" {self.last_change:.3f}: an older state came back"
        )
        self._check_settings(json.loads(config), "the archive")
        self.diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        self.clean = True

    def _check_settings(self, config: dict[str, Any], what: str) -> None:
        if self.mark is not None:
            env = config["config"]["Env"]
            assert f"SM_MARK={self.mark}" in env, f"{what}'s Env {env} lacks the container's SM_MARK={self.mark}"

    def _view(self) -> TreeView:
        """The merged view now, read once per state: a readdir through overlay can itself write to the upper dir
        (the kernel drops a pure-upper directory's stale `trusted.overlay.impure`, which moves its ctime), so the
        view is not read again between a commit and the re-commit that must find the container unchanged."""
        if self.view is None:
            self.view = read_tree(self.merged)
        return self.view

    def _changed(self) -> None:
        self.view = None
        self.last_change = time.time()
        self.clean = self.push_clean = False
        self.diff_ids = None

    # --- changes, through the kernel's merged view --------------------------------------------------------------

    def _view_paths(self, *kinds: str) -> list[bytes]:
        view = read_tree(self.merged)
        return sorted(p for p, e in view.entries.items() if e.kind in kinds)

    def _abs(self, rel: bytes) -> bytes:
        return os.path.join(os.fsencode(self.merged), rel)

    def _new_path(self, data: st.DataObject, what: str) -> bytes:
        parent = data.draw(st.sampled_from([b"", *self._view_paths("dir")]), label=f"parent of the new {what}")
        self.names += 1
        name = b"%s-%d-%s" % (what.encode(), self.names, data.draw(st.text("abcxyz", max_size=4)).encode())
        return os.path.join(parent, name) if parent else name

    @rule(data=st.data(), kinds=st.lists(st.sampled_from(CHANGES), min_size=1, max_size=3))
    def change_container(self, data: st.DataObject, kinds: list[str]) -> None:
        """One to three changes, each as a process in the container makes it: through the merged view."""
        with self._step("change_container"):
            self._change(data, kinds)

    def _change(self, data: st.DataObject, kinds: list[str]) -> None:
        for kind in kinds:
            self.stats[f"change:{kind}"] += 1
            getattr(self, f"_{kind}")(data)
            self._changed()

    def _write_file(self, data: st.DataObject) -> None:
        """Overwrite an existing file (a copy-up when it is a lower one) or create a new one, with random bytes."""
        files = self._view_paths("file")
        overwrite: bool = bool(files) and data.draw(st.booleans(), label="overwrite an existing file")
        if overwrite:
            path = data.draw(st.sampled_from(files), label="file to overwrite")
        else:
            path = self._new_path(data, "file")
        size = data.draw(st.integers(0, 65536) | st.just(0), label="size")
        with open(self._abs(path), "wb") as f:
            f.write(random.Random(data.draw(st.integers(0, 2**32), label="seed")).randbytes(size))

    def _delete(self, data: st.DataObject) -> None:
        """Delete a non-directory (a whiteout when it comes from a lower layer)."""
        candidates = self._view_paths("file", "symlink", "fifo", "char", "block")
        if candidates:
            os.unlink(self._abs(data.draw(st.sampled_from(candidates), label="entry to delete")))

    def _replace_dir(self, data: st.DataObject) -> None:
        """rm -rf a directory and create it again with one new file (the kernel marks it opaque)."""
        path = self._abs(data.draw(st.sampled_from(self._view_paths("dir")), label="directory to replace"))
        shutil.rmtree(path)
        os.mkdir(path, 0o755)
        with open(os.path.join(path, b"recreated"), "wb") as f:
            f.write(random.Random(data.draw(st.integers(0, 2**32), label="seed")).randbytes(100))

    def _chmod(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self._view_paths("file", "dir", "fifo", "char", "block")), label="chmod")
        os.chmod(self._abs(path), data.draw(st.sampled_from(MODES), label="mode"))

    def _hardlink(self, data: st.DataObject) -> None:
        files = [p for p in self._view_paths("file") if os.lstat(self._abs(p)).st_ino not in self.lower_inodes]
        if files:
            source = data.draw(st.sampled_from(files), label="link source")
            os.link(self._abs(source), self._abs(self._new_path(data, "link")))

    def _symlink(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from([b"busybox", b"/bin/busybox", b"../etc/passwd", b"missing/x"]))
        os.symlink(target, self._abs(self._new_path(data, "symlink")))

    def _rename(self, data: st.DataObject) -> None:
        """Move a non-directory (a lower one is copied up and whited out at its old name)."""
        candidates = self._view_paths("file", "symlink", "fifo", "char", "block")
        if candidates:
            source = data.draw(st.sampled_from(candidates), label="entry to move")
            os.rename(self._abs(source), self._abs(self._new_path(data, "moved")))

    def _set_xattr(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(self._view_paths("file", "dir")), label="entry to tag")
        # Never empty: an empty value makes a pax record that POSIX reads as "delete this keyword", and Go's
        # archive/tar (umoci, podman, docker) drops such SCHILY.xattr records, while GNU tar and Python keep them.
        value = data.draw(st.binary(min_size=1, max_size=64), label="user.sm value")
        os.setxattr(self._abs(path), "user.sm", value, follow_symlinks=False)

    def _settings(self, data: st.DataObject) -> None:
        """The container's settings change (as `rocker update` would write them): a new SM_MARK in its Env."""
        path = self.storage.root / "containers" / self.storage.container_id / "config.json"
        doc = json.loads(path.read_bytes())
        self.names += 1
        self.mark = f"{self.names}-{data.draw(st.text('abc123', max_size=6), label='SM_MARK')}"
        env = [e for e in doc["Config"]["Env"] if not e.startswith("SM_MARK=")]
        doc["Config"]["Env"] = [*env, f"SM_MARK={self.mark}"]
        path.write_text(json.dumps(doc, indent=2) + "\n")

    @rule(data=st.data(), kinds=st.lists(st.sampled_from(CHANGES), min_size=1, max_size=3))
    def change_then_commit(self, data: st.DataObject, kinds: list[str]) -> None:
        """The commonest sequence of all, as one step (so that changes are not outnumbered by the other rules)."""
        with self._step("change_then_commit"):
            self._change(data, kinds)
            self._check_commit(self._view(), self._commit())

    # --- commits --------------------------------------------------------------------------------------------------

    @rule()
    def commit(self) -> None:
        with self._step("commit"):
            self._check_commit(self._view(), self._commit())

    # Preconditions and draws depend only on what the rules did, never on what a run did: luigi's task order (and
    # so which write the N-th hit of a failpoint kills) and every digest vary from run to run, and hypothesis
    # requires an example to draw the same way when it is run again.
    @rule()
    def recommit_unchanged(self) -> None:
        """Commit (unless the last run already did), then again with nothing changed: nothing runs, nothing is
        rewritten."""
        with self._step("recommit_unchanged"):
            if not self.clean:
                self._check_commit(self._view(), self._commit())
            before = [(p.stat().st_mtime_ns, p.stat().st_ino, _sha256(p)) for p in (self.archive, self.iidfile)]
            result = self._commit()
            assert result.returncode == 0, f"re-commit failed, {_failure(result)}"
            ran = [line for line in result.stderr.splitlines() if RAN in line or line.startswith("    - ")]
            assert RAN not in result.stderr, f"a re-commit of an unchanged container ran tasks: {ran}"
            after = [(p.stat().st_mtime_ns, p.stat().st_ino, _sha256(p)) for p in (self.archive, self.iidfile)]
            assert after == before, "a re-commit of an unchanged container rewrote the archive or the iid file"

    @rule(data=st.data(), kinds=st.lists(st.sampled_from(CHANGES), max_size=2), push=st.booleans())
    def killed_run(self, data: st.DataObject, kinds: list[str], push: bool) -> None:
        """A commit (or push) SIGKILLed at a failpoint, mostly right after a change (so that it has work to be
        killed in): only complete targets may remain, and the next run must still hold the container as it is."""
        with self._step("killed_run"):
            self._change(data, kinds)
            name = data.draw(st.sampled_from(sorted(FAILPOINTS)), label="failpoint")
            point = f"{name}@{data.draw(st.integers(1, FAILPOINTS[name]), label='at hit')}"
            pushing = (push or self.clean) and self.registry is not None and not self.push_clean
            view = self._view()
            before = _sha256(self.archive) if self.archive.exists() else None
            env = {"PIPELINE_FAILPOINTS": point}
            result = self._push(env) if pushing else self._commit(env)
            self.stats[f"killed_run rc={result.returncode}"] += 1
            assert result.returncode in (0, -9), f"{point}: {_failure(result)}"
            if result.returncode == 0:  # the failpoint was not reached this many times: a normal run
                if not pushing:
                    self._check_commit(view, result)
                return
            if not pushing and self.archive.exists() and _sha256(self.archive) != before:
                # The kill came after the archive's rename: it must be the whole image of this state.
                compare_trees(view, _python_view(self.archive, self.dir / "unpacked"), label=f"python, {point}")

    # --- deletions --------------------------------------------------------------------------------------------------

    @rule(which=st.sampled_from([("archive",), ("iidfile",), ("archive", "iidfile")]))
    def delete_outputs(self, which: tuple[str, ...]) -> None:
        with self._step("delete_outputs"):
            for name in which:
                getattr(self, name).unlink(missing_ok=True)
            self.clean = False

    @rule(data=st.data(), where=st.sampled_from(CACHE_SUBDIRS))
    def delete_cache_files(self, data: st.DataObject, where: str) -> None:
        with self._step("delete_cache_files"):
            top = self.work / "cache" / where
            files = _regular_files(top)
            picks = data.draw(st.lists(st.integers(0, 999), min_size=1, max_size=3), label="files (index mod count)")
            chosen = {files[i % len(files)] for i in picks} if files else set()
            for path in chosen:
                path.unlink()
            self.clean = self.push_clean = False

    @rule(data=st.data(), truncate=st.booleans())
    def damage_cache_blob(self, data: st.DataObject, truncate: bool) -> None:
        """A cached blob cut short, or one byte changed in place (same size): it must be packed again."""
        with self._step("damage_cache_blob"):
            files = [p for p in _regular_files(self.work / "cache" / "blobs" / "sha256") if p.stat().st_size]
            pick = data.draw(st.integers(0, 999), label="blob to damage (index mod count)")
            offset = data.draw(st.integers(0, 2**40), label="offset (mod size)")
            if not files:
                return
            path = files[pick % len(files)]
            size = path.stat().st_size
            with open(path, "r+b") as f:
                if truncate:
                    f.truncate(size // 2)
                else:
                    f.seek(offset % size)
                    byte = f.read(1)
                    f.seek(offset % size)
                    f.write(bytes([byte[0] ^ 0xFF]))
            self.clean = self.push_clean = False

    # --- push -----------------------------------------------------------------------------------------------------

    @precondition(lambda self: self.registry is not None)
    @rule()
    def push(self) -> None:
        """PushImage: the tag then holds this state's layers; an unchanged re-push runs nothing."""
        with self._step("push"):
            assert self.registry is not None
            view = self._view()
            was_clean = self.push_clean
            result = self._push()
            assert result.returncode == 0, f"push failed, {_failure(result)}"
            if was_clean:
                assert RAN not in result.stderr, "a re-push of an unchanged container ran tasks"
            config, pulled = _pulled_archive(self.registry.host, self.dir / "pulled.tar")
            compare_trees(view, _python_view(pulled, self.dir / "unpacked"), label="python, pulled from the registry")
            doc = json.loads(config)
            self._check_settings(doc, "the pushed image")
            assert _epoch(doc["created"]) >= int(self.last_change), "the pushed image predates the last change"
            if self.diff_ids is not None:
                assert doc["rootfs"]["diff_ids"] == self.diff_ids, "push and commit of one state differ in layers"
            self.push_clean = True

    # --- the end of an example: one more commit, checked by every consumer ---------------------------------------

    def teardown(self) -> None:
        try:
            if self.final_check and not self.failed:
                view = self._view()
                self._check_commit(view, self._commit())
                check_image_archive(self.archive, view, self.dir / "full-check", ref=IMAGE)
                self.stats["full checks"] += 1
        finally:
            self.stack.close()
            self.open_stacks.remove(self.stack)
            shutil.rmtree(self.dir, ignore_errors=True)


# --- the test -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer | None]:
    """A docker-registry on 127.0.0.1 for the push rule, or None (the rule is then never chosen)."""
    if shutil.which("docker-registry") is None:
        yield None
        return
    with serve_registry(tmp_path_factory.mktemp("sm-registry")) as server:
        yield server


@pytest.mark.tools
@pytest.mark.overlay
def test_a_successful_run_holds_the_container_as_it_was_during_it(
    tmp_path: Path, registry: RegistryServer | None, capsys: pytest.CaptureFixture[str]
) -> None:
    CommitMachine.base = tmp_path
    CommitMachine.registry = registry
    CommitMachine.stats = Counter()
    started = time.monotonic()
    try:
        run_state_machine_as_test(CommitMachine, settings=SETTINGS)
    finally:
        for stack in list(CommitMachine.open_stacks):  # only when hypothesis stopped before a teardown
            stack.close()
        CommitMachine.open_stacks.clear()
        with capsys.disabled():
            stats = ", ".join(f"{k}={v}" for k, v in sorted(CommitMachine.stats.items()))
            print(f"\n[commit state machine] {time.monotonic() - started:.1f} s; {stats}")


@pytest.mark.overlay
def test_commit_after_a_layer_record_was_deleted(tmp_path: Path) -> None:
    """A regression the machine above found (delete_cache_files in layers/, then a commit): with one layer record
    gone but its commit's config.json still there, WriteRepositories was found complete against the old config
    when the run was scheduled, WriteImageConfig then wrote the config again with a new `created`, and
    WriteImageArchive failed with "Unfulfilled dependency at run time: WriteRepositories" (exit 30)."""
    CommitMachine.base = tmp_path
    CommitMachine.registry = None
    machine = CommitMachine()
    machine.final_check = False
    try:
        machine.commit()
        time.sleep(1.1)  # a config written again now gets another `created`, hence another digest
        min((machine.work / "cache" / "layers").glob("*.json")).unlink()
        machine.clean = False
        machine.commit()
    finally:
        machine.teardown()
