"""Writes the layer of what changed in a container's upper dir since an earlier snapshot of it: the walk merged,
directory by directory, with the entry index recorded when that snapshot was packed (pipeline.layer.index).

Spec: https://github.com/opencontainers/image-spec/blob/main/layer.md ("Change Types", "Whiteouts"). Applied on top
of the layers of the earlier snapshot, the delta gives what the whole upper dir would (write_layer): entries new or
changed are written whole, entries gone get a whiteout, and a directory newly opaque is written with its marker and
everything below it. Entries are converted by the same rules (walk.list_dir, whiteout.convert) and written by the
same LayerTar as a whole layer, sorted by tar path, so the same two states always give the same bytes.
"""

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import LayerError
from pipeline.layer import whiteout
from pipeline.layer.index import WHITEOUT, IndexEntry, IndexReader, IndexWriter, kind_of, signature_of
from pipeline.layer.walk import Entry, OpenDirs, check_tar_name, describe, list_dir
from pipeline.layer.writer import LayerRecord, LayerTar


class DeltaNotExpressible(LayerError):
    """The upper dir changed in a way no layer on top of the earlier snapshot can express: a path gone from it, or
    no longer hidden by it, shows a lower layer's version again, which a whiteout would hide and silence would
    leave as the earlier snapshot had it. The kernel never does this (deleting a lower path leaves a whiteout, a
    directory re-created over one is opaque); an upper dir edited offline can. Pack the layer whole instead."""


@dataclass(frozen=True, slots=True)
class _Step:
    """One thing to do in a directory, in tar-name order: an entry to write (or only to descend into), or a
    whiteout for a name gone."""

    key: bytes  # the tar name relative to the directory: the sort key
    entry: Entry | None  # None: a whiteout for a name gone (key is ".wh.<name>")
    conversion: whiteout.Conversion | None  # how to write entry; None: unchanged, not written
    whole: bool = False  # a directory all of whose subtree is written (newly opaque, or below one)


@dataclass
class _Link:
    """A file of more than one link written to the delta."""

    first: bytes  # the tar name it was first written under
    links: int  # its link count
    written: int  # the names of it written
    whole: bool  # one of them below a directory written whole


@dataclass
class _Level:
    """A directory the delta is in."""

    prefix: bytes  # its tar path, "" for the root
    mtime_ns: int  # its mtime, which the whiteouts written in it carry: the time of the deletion
    steps: list[_Step]  # still to do, last first
    earlier_dirs: list[bytes]  # the earlier listing's directories whose listings the index still holds, last first
    lower_hidden: bool  # it or an ancestor is opaque: no lower layer shows below it


def write_delta(
    layer_dir: Path,
    previous_index: Path,
    out: BinaryIO,
    *,
    lower_has: Callable[[bytes], bool],
    index: IndexWriter | None = None,
    clamp_mtime: int | None = None,
    overlay_xattrs: str | None = "trusted",
    progress: Callable[[int], None] | None = None,
) -> LayerRecord:
    """Write to out the layer of what changed in layer_dir since previous_index was recorded (by write_layer or
    write_delta with index=), and return its diff_id and size; index, if given, records the current state for
    the next delta. The tar holds, in tar-name order:

    - every entry new or whose signature (index.py) changed, whole: content changes and metadata-only ones
      (chmod, chown, setfattr) alike, as OCI layers express them; a directory is always walked, since a change
      below it need not change it; a whiteout that was one before is not written again;
    - a whiteout ".wh.<name>" (owned by root, with its directory's mtime) for each name gone from a directory,
      unless the name now holds something else (that replaces it), the name was a whiteout itself, or an ancestor
      went (whose whiteout, or whatever replaced it, covers the subtree);
    - a directory opaque now that was not (rm -rf d; mkdir d over a lower d): with its marker and all of its
      subtree, since the marker hides every earlier layer below it; one opaque before too is written, if
      changed, without the marker again, and its children by difference (the earlier marker still hides the lower
      layers, whether or not the directory was re-created since);
    - hardlinks: link() and unlink() change the inode's ctime, so every name of a changed inode is written, the
      first whole and the others as hardlinks to it. Names below a directory newly opaque are written whether or
      not they changed: a file with other names, unchanged, elsewhere (a directory renamed over a deleted lower
      one) raises DeltaNotExpressible, as the layers would make two files of it.

    lower_has(path) says whether the container's lower layers show path (relative, no trailing "/"; see
    build_lower_lookup); it is asked only where the answer changes the layer, and True there raises
    DeltaNotExpressible (pack whole instead). An index of another directory or format raises IndexUnavailable, a
    damaged one IndexDamaged (both LayerErrors naming the file; pack whole instead): out then holds a partial tar
    to discard. An unchanged layer_dir gives the empty tar (EMPTY_LAYER_DIFF_ID).
    """
    try:
        root_fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise LayerError(f"{layer_dir}: cannot open layer directory ({e.strerror})") from e
    try:
        whiteout.check_markers_visible(layer_dir, overlay_xattrs)
        root = os.fstat(root_fd)
        with IndexReader(previous_index) as previous:
            previous.check_source(root, overlay_xattrs)
            tar = LayerTar(out, layer_dir, clamp_mtime=clamp_mtime)
            if index is not None:
                index.begin(root, overlay_xattrs)
            delta = _Delta(layer_dir, overlay_xattrs, previous, tar, index, lower_has, progress)
            delta.run(root_fd, root)
            previous.finish()  # only now is the whole index known to be intact
    finally:
        os.close(root_fd)
    if index is not None:
        index.finish()
    return tar.finish()


class _Delta:
    """One merge of a walk with an earlier index."""

    def __init__(
        self,
        layer_dir: Path,
        overlay_xattrs: str | None,
        previous: IndexReader,
        tar: LayerTar,
        index: IndexWriter | None,
        lower_has: Callable[[bytes], bool],
        progress: Callable[[int], None] | None,
    ) -> None:
        self._layer_dir = layer_dir
        self._overlay_xattrs = overlay_xattrs
        self._previous = previous
        self._tar = tar
        self._index = index
        self._lower_has = lower_has
        self._progress = progress
        self._linked: dict[tuple[int, int], _Link] = {}  # files of more than one link written, by inode

    def run(self, root_fd: int, root: os.stat_result) -> None:
        """Walk layer_dir as walk.walk_entries does (depth first in tar-name order, at most MAX_DIR_FDS fds), with
        the earlier index read in step: both list a directory when they enter it, so the earlier listing of each
        directory walked is the next one in the index once those of the directories before it are skipped."""
        dirs = OpenDirs(root_fd, self._layer_dir)
        try:
            earlier_root = self._previous.read_listing()
            listing = self._list(root_fd, b"", earlier_root)
            levels = [self._level(b"", root, listing, earlier_root, whole=False, lower_hidden=False)]
            while levels:
                level = levels[-1]
                if not level.steps:
                    self._previous.skip_subtrees(len(level.earlier_dirs))
                    levels.pop()
                    if levels:
                        dirs.leave(levels[-1].prefix)
                    continue
                step = level.steps.pop()
                tar_name = level.prefix + step.key
                check_tar_name(self._layer_dir, tar_name)
                if step.entry is None:
                    self._tar.add_whiteout(tar_name, mtime_ns=level.mtime_ns)
                    continue
                entry = replace(step.entry, tar_name=tar_name)
                if step.conversion is not None:
                    self._tar.add_entry(dirs.fd, level.prefix, entry, step.conversion)
                    if stat.S_ISREG(entry.st.st_mode):
                        if entry.st.st_nlink > 1:
                            self._count_link(entry, step.whole)
                        if self._progress is not None:
                            self._progress(self._tar.size)
                if stat.S_ISDIR(entry.st.st_mode):
                    earlier = self._earlier_listing(level, step)
                    dirs.enter(entry.name, entry.st, level.prefix)
                    listing = self._list(dirs.fd, tar_name, earlier)
                    hidden = level.lower_hidden or isinstance(entry.conversion, whiteout.OpaqueDirectory)
                    levels.append(
                        self._level(tar_name, entry.st, listing, earlier, whole=step.whole, lower_hidden=hidden)
                    )
        finally:
            dirs.close()
        self._check_links()

    def _count_link(self, entry: Entry, whole: bool) -> None:
        link = self._linked.get((entry.st.st_dev, entry.st.st_ino))
        if link is None:
            self._linked[(entry.st.st_dev, entry.st.st_ino)] = _Link(entry.tar_name, entry.st.st_nlink, 1, whole)
        else:
            link.written += 1
            link.whole |= whole

    def _check_links(self) -> None:
        """Refuse a file some of whose names were written only because they are below a directory newly opaque,
        while its other names, unchanged, were not: the layers would hold two files where the container has one.
        A directory of the container's own renamed onto a deleted lower one does that (the kernel marks it opaque,
        and the rename changes no ctime but the directory's). The link count tells, since every name of a changed
        inode is written; it also counts overlay's index=on links in its work dir, which only files copied up
        from a lower hardlink have: then this refuses a delta it need not."""
        for link in self._linked.values():
            if link.whole and link.written < link.links:
                raise DeltaNotExpressible(
                    f"{describe(self._layer_dir, link.first)}: has {link.links} links, but only {link.written} of its"
                    " names are in the layer (below a directory newly opaque) and the others did not change, so the"
                    " layers would make two files of one; pack the layer whole"
                )

    def _list(self, fd: int, prefix: bytes, earlier: list[IndexEntry] | None = None) -> list[Entry]:
        """The directory's listing; an entry whose signature is the one earlier recorded is unchanged, so it is
        what it was then, and its xattrs are not read (a delta's walk costs what changed, not the tree)."""
        known = None
        if earlier:
            before = {e.own_name: e for e in earlier}

            def known(name: bytes, st: os.stat_result) -> whiteout.Conversion | None:
                was = before.get(name)
                if was is None or was.signature != signature_of(st) or was.is_dir != stat.S_ISDIR(st.st_mode):
                    return None
                if was.kind == WHITEOUT:
                    return whiteout.Whiteout(whiteout.WHITEOUT_PREFIX + name)
                # Not written (unchanged): the xattrs it keeps are not needed, only what it is.
                return (whiteout.OpaqueDirectory if was.opaque else whiteout.Plain)(name, {})

        listing = list_dir(fd, self._layer_dir, prefix, self._overlay_xattrs, known=known)
        if self._index is not None:
            self._index.add_listing(listing)
        return listing

    def _earlier_listing(self, level: _Level, step: _Step) -> list[IndexEntry]:
        """The earlier listing of the directory step enters ([] if it was none, or is written whole), after
        skipping those of the earlier directories before it (gone, or no longer directories)."""
        skipped = 0
        while level.earlier_dirs and level.earlier_dirs[-1] < step.key:
            level.earlier_dirs.pop()
            skipped += 1
        self._previous.skip_subtrees(skipped)
        if not level.earlier_dirs or level.earlier_dirs[-1] != step.key:
            return []
        level.earlier_dirs.pop()
        if step.whole:
            self._previous.skip_subtrees(1)
            return []
        return self._previous.read_listing()

    def _level(
        self,
        prefix: bytes,
        st: os.stat_result,
        listing: list[Entry],
        earlier: list[IndexEntry],
        *,
        whole: bool,
        lower_hidden: bool,
    ) -> _Level:
        if whole:
            steps = [_Step(e.tar_name, e, e.conversion, whole=True) for e in listing]
        else:
            steps = self._diff(prefix, listing, earlier, lower_hidden)
        steps.reverse()
        earlier_dirs = [e.name for e in reversed(earlier) if e.is_dir]
        return _Level(prefix, st.st_mtime_ns, steps, earlier_dirs, lower_hidden)

    def _diff(self, prefix: bytes, listing: list[Entry], earlier: list[IndexEntry], lower_hidden: bool) -> list[_Step]:
        """The steps of a directory (whose tar path is prefix) listed now as listing and earlier as earlier."""
        before = {e.name: e for e in earlier}
        steps = [self._compare(prefix, entry, before.get(entry.tar_name), lower_hidden) for entry in listing]
        now_keys = {e.tar_name for e in listing}
        now_names = {e.name: e for e in listing}
        whiteouts = False
        for was in earlier:
            if was.name in now_keys:
                continue
            name = was.own_name
            path = prefix + name
            now = now_names.get(name)
            if now is None:
                if not lower_hidden and self._lower_has(path):
                    raise self._not_expressible(path, "is gone from the upper dir, but a lower layer has it")
                if was.kind != WHITEOUT:
                    steps.append(_Step(whiteout.WHITEOUT_PREFIX + name, None, None))
                    whiteouts = True
            elif (
                not was.is_dir
                and isinstance(now.conversion, whiteout.Plain)
                and stat.S_ISDIR(now.st.st_mode)
                and not lower_hidden
                and self._lower_has(path)
            ):
                # A directory that replaced a file or a whiteout merges with the lower one, unless opaque.
                raise self._not_expressible(path, "is a directory in place of a file or whiteout, but not opaque")
        if whiteouts:
            steps.sort(key=lambda s: s.key)
        return steps

    def _compare(self, prefix: bytes, entry: Entry, was: IndexEntry | None, lower_hidden: bool) -> _Step:
        conversion = entry.conversion
        if isinstance(conversion, whiteout.Whiteout):
            # A whiteout stays what it was as long as it is one: the kernel links every whiteout to one shared
            # inode (Linux 5.8+, ovl_whiteout), whose ctime and link count move with each deletion anywhere.
            return _Step(entry.tar_name, entry, conversion if was is None or was.kind != WHITEOUT else None)
        changed = was is None or was.kind != kind_of(conversion) or was.signature != signature_of(entry.st)
        if isinstance(conversion, whiteout.OpaqueDirectory):
            if was is None or not was.opaque:
                return _Step(entry.tar_name, entry, conversion, whole=True)
            # Opaque in the earlier state too: the marker written then still hides the lower layers, and the
            # difference turns what it held then into what it holds now, even if it was re-created since (whose
            # inode cannot tell: ext4 gives a directory re-created at once the inode number just freed).
            conversion = whiteout.Plain(conversion.name, conversion.xattrs)
        elif was is not None and was.opaque and not lower_hidden and self._lower_has(prefix + entry.name):
            raise self._not_expressible(prefix + entry.name, "was an opaque directory and is no longer opaque")
        return _Step(entry.tar_name, entry, conversion if changed else None)

    def _not_expressible(self, path: bytes, why: str) -> DeltaNotExpressible:
        return DeltaNotExpressible(
            f"{describe(self._layer_dir, path)}: {why}, so the merged view shows the lower layer's version, which"
            " no layer on top of the previous snapshot can express; pack the layer whole"
        )


def build_lower_lookup(lower_dirs: Sequence[Path], overlay_xattrs: str | None = "trusted") -> Callable[[bytes], bool]:
    """lower_has for write_delta: whether the merged view of the lower layer_dirs (oldest first) shows path, looked
    up as overlayfs does (the kernel's ovl_lookup): the topmost layer holding a name decides, a whiteout hides the
    name in the layers below, a non-directory ends the lookup, and so does an opaque directory, at its layer.

    Paths are strings (a gone path is rarely deep): a path this cannot look up (too long, unreadable) counts as
    shown, so write_delta refuses rather than guesses.
    """
    top_first = [os.fsencode(d) for d in reversed(lower_dirs)]

    def lower_has(path: bytes) -> bool:
        parts = path.split(b"/")
        layers = top_first  # the layers the directory looked in so far is merged from, top first
        try:
            for depth in range(len(parts)):
                merged: list[bytes] = []
                for layer in layers:
                    found = _look_up(os.path.join(layer, *parts[: depth + 1]), overlay_xattrs)
                    if found is None:
                        continue
                    if found == _HIDES:
                        break
                    if depth == len(parts) - 1:
                        return True
                    if found == _OTHER:
                        break
                    merged.append(layer)
                    if found == _OPAQUE_DIR:
                        break
                if not merged:
                    return False
                layers = merged
        except OSError:
            return True
        return False

    return lower_has


_DIR, _OPAQUE_DIR, _OTHER, _HIDES = "directory", "opaque directory", "other", "whiteout"


def _look_up(path: bytes, overlay_xattrs: str | None) -> str | None:
    """What the entry at path in one layer_dir is for a lookup, or None if there is none; OSError if that cannot be
    told."""
    try:
        st = os.lstat(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    xattrs: dict[str, bytes] = {}
    if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
        try:
            names = os.listxattr(path, follow_symlinks=False)
            xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.ENODATA):
                raise
    if whiteout.is_whiteout(st.st_mode, st.st_rdev, xattrs, overlay_xattrs):
        return _HIDES
    if not stat.S_ISDIR(st.st_mode):
        return _OTHER
    return _OPAQUE_DIR if whiteout.is_opaque(xattrs, overlay_xattrs) else _DIR
