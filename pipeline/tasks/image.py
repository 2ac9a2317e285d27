"""The tasks that commit one container into an image archive, each a thin call into the plain core.

Graph for one commit (every output written atomically):
    PackImageLayer* ─┐
    PackContainerLayer ┴─> WriteImageConfig ─> WriteManifest, WriteRepositories ─> WriteImageArchive <─ CommitImage
"""

import logging
import os
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import luigi

from pipeline import assembly, packing, plan
from pipeline.engines import open_storage
from pipeline.engines.container import Layer
from pipeline.errors import LayerError, OutputError
from pipeline.host import failpoint, terminal
from pipeline.host.atomic import write_bytes_atomic
from pipeline.image.archive import read_member
from pipeline.image.imageconfig import CommitOptions, digest_of
from pipeline.image.reference import parse_reference
from pipeline.layer import whiteout
from pipeline.layer.writer import LayerRecord, read_record
from pipeline.store import squash
from pipeline.store.cache import LayerCache, Slot
from pipeline.store.compression import ALGORITHMS, StoredBlob
from pipeline.store.layout import CacheLayout, key_of
from pipeline.tasks.settings import (
    HIDDEN,
    DurableTarget,
    HostTask,
    RepeatableParameter,
    StorageTask,
    commit,
    storage,
)

log = logging.getLogger(__name__)


class _LayerTask(HostTask):
    """Packs one layer_dir into the cache; its target is the layer's record (diff_id, size), named by the
    layer's source key (commit.LayerSource), so a record is only ever found for the content it was made from."""

    _abstract = True

    layer_dir: str = luigi.Parameter(visibility=HIDDEN)
    source_key: str = luigi.Parameter(visibility=HIDDEN)
    cache_dir: str = luigi.Parameter(visibility=HIDDEN)
    clamp_mtime: int | None = luigi.OptionalIntParameter(default=None, visibility=HIDDEN)
    # Where the layer's overlay markers live (container.Layer). Not in the task id: it is a property of the storage
    # the layer_dir belongs to, so it tells no two tasks apart, and rootful storage keeps the ids it had.
    overlay_xattrs: str = luigi.ChoiceParameter(
        choices=whiteout.OVERLAY_XATTRS, default="trusted", significant=False, visibility=HIDDEN
    )
    # The commit's archive is assembled in place (store.pack): the layer goes into slot `slot` of that pack, its
    # only copy. Not in the task id: where a layer is written does not change what it is.
    pack_file: str = luigi.Parameter(default="", significant=False, visibility=HIDDEN)
    slot: int = luigi.IntParameter(default=0, significant=False, visibility=HIDDEN)

    def output(self) -> DurableTarget:
        return DurableTarget(str(CacheLayout(Path(self.cache_dir)).layer_record(self.source_key, self.clamp_mtime)))

    def complete(self) -> bool:
        return LayerCache(Path(self.cache_dir)).has_record(Path(self.output().path))

    def run(self) -> None:
        into = Slot(Path(self.pack_file), self.slot) if self.pack_file else None
        cache, record = LayerCache(Path(self.cache_dir), into=into), Path(self.output().path)
        packing.pack_into_cache(cache, record, self.pack, pausing=self.pausing, step=f"pack:{self.task_family}")
        Progress(self).finish()
        failpoint.reached("task:layer-done")

    def pausing(self) -> AbstractContextManager[object]:
        """What keeps the layer still while it is packed; image layers are immutable and need nothing."""
        return nullcontext()

    def pack(self, cache: LayerCache) -> LayerRecord:
        raise NotImplementedError


class PackImageLayer(_LayerTask):
    """An immutable image layer, packed once per cache and reused by every commit that shares it; reassembled
    byte for byte from the engine's tar-split records when it kept them."""

    tar_split: str = luigi.Parameter(default="", visibility=HIDDEN)
    original_diff_id: str = luigi.Parameter(default="", visibility=HIDDEN)
    # The file bytes of the scan planning took (LayerSource.planned_bytes): that scan is not taken again.
    planned_bytes: int = luigi.IntParameter(default=0, significant=False, visibility=HIDDEN)
    # Shared image layers first: every commit and snapshot of the containers on that image waits for them.
    priority = 10

    def label(self) -> str:
        # The diff_id the engine recorded, else the layer's directory: what `docker image inspect` would show.
        return self.original_diff_id.removeprefix("sha256:")[:12] or Path(self.layer_dir).parent.name[:12]

    def pack(self, cache: LayerCache) -> LayerRecord:
        layer = Layer(
            layer_id="",
            layer_dir=Path(self.layer_dir),
            tar_split=Path(self.tar_split) if self.tar_split else None,
            diff_id=self.original_diff_id,
            overlay_xattrs=self.overlay_xattrs,
        )
        source = plan.LayerSource(self.layer_dir, self.source_key, planned_bytes=self.planned_bytes)
        return packing.pack_image_layer(
            cache, layer, clamp_mtime=self.clamp_mtime, report=Progress(self), planned=source.planned_scan()
        )


class PackContainerLayer(_LayerTask, StorageTask):
    """The container's own writable layer in one state (its source key holds the upper dir's fingerprint), paused
    while packed if it is running."""

    container_id: str = luigi.Parameter()
    container_name: str = luigi.Parameter(default="", significant=False, description="the container's name")

    def label(self) -> str:
        return self.container_name or self.container_id[:12]

    def pausing(self) -> AbstractContextManager[object]:
        container = self.open_storage().read_container(self.container_id)
        markers = CacheLayout(Path(self.cache_dir)).freezer_markers
        return packing.pause_while_packing(container, markers, enabled=self.pause)

    def pack(self, cache: LayerCache) -> LayerRecord:
        return packing.pack_container_layer(
            cache,
            Path(self.layer_dir),
            clamp_mtime=self.clamp_mtime,
            report=Progress(self),
            overlay_xattrs=self.overlay_xattrs,
        )


class PackSquashedLayer(PackContainerLayer):
    """--squash: every layer of the container merged into one (by the kernel); its source key is made of every
    layer's."""

    layer_dirs: tuple[str, ...] = luigi.ListParameter(visibility=HIDDEN)

    def pack(self, cache: LayerCache) -> LayerRecord:
        return squash.pack_squashed(
            [Path(d) for d in self.layer_dirs],
            cache.root,
            clamp_mtime=self.clamp_mtime,
            overlay_xattrs=self.overlay_xattrs,
        )


class _CommitTask(StorageTask):
    """Parameters shared by every task of one commit: the container's state as this run took it (the layers'
    source keys and its metadata digest) and the options, so every target below is named by what it is made of."""

    _abstract = True

    container_id: str = luigi.Parameter()
    container_name: str = luigi.Parameter(default="", significant=False, description="the container's name")
    lower: tuple[tuple[str, ...], ...] = luigi.ListParameter(default=(), visibility=HIDDEN)  # LayerSource.as_param
    upper: tuple[str, ...] = luigi.ListParameter(visibility=HIDDEN)
    metadata: str = luigi.Parameter(visibility=HIDDEN)
    image: str = luigi.Parameter()
    output_path: str = luigi.Parameter()
    author: str = luigi.Parameter(default="")
    message: str = luigi.Parameter(default="")
    changes: tuple[str, ...] = luigi.ListParameter(default=())
    config_file: str = luigi.Parameter(default="", visibility=HIDDEN)
    squash: bool = luigi.BoolParameter(default=False)
    compression: str = luigi.ChoiceParameter(choices=ALGORITHMS, default="none")
    compression_level: int | None = luigi.OptionalIntParameter(default=None)
    # The pack the archive is assembled in, layer i packed into slot i (store.pack); "": copied together.
    pack_file: str = luigi.Parameter(default="", significant=False, visibility=HIDDEN)

    def label(self) -> str:
        return self.container_name or self.container_id[:12]

    def commit_dir(self) -> str:
        # Everything the config, manifest and repositories are made from names their directory: the state, the
        # options, the reference. Not the host (one cache may serve several) and not the archive's path.
        params = sorted(
            (k, v)
            for k, v in self.common().items()
            if k not in ("host", "output_path", "pause", "container_name", "pack_file")
        )
        return str(CacheLayout(Path(self.cache_dir)).commit_dir(*params))

    def options(self) -> CommitOptions:
        return CommitOptions(
            author=self.author,
            message=self.message,
            changes=tuple(self.changes),
            extra_config=plan.read_config_file(self.config_file),
            squash=self.squash,
        )

    def layer_tasks(self) -> list[_LayerTask]:
        shared: dict[str, Any] = {"host": self.host, "cache_dir": self.cache_dir, "clamp_mtime": self.clamp_mtime}
        lower = [plan.LayerSource.from_param(p) for p in self.lower]
        upper = plan.LayerSource.from_param(self.upper)
        container: dict[str, Any] = {
            "container_id": self.container_id,
            "container_name": self.container_name,
            "engine": self.engine,
            "storage_root": self.storage_root,
            "pause": self.pause,
        }
        if self.squash:
            key = key_of(*(s.key for s in (*lower, upper)))
            dirs = tuple(s.layer_dir for s in (*lower, upper))
            # One storage, one namespace of overlay markers: the upper layer's is every layer's.
            squashed = PackSquashedLayer(
                pack_file=self.pack_file,
                layer_dir=upper.layer_dir,
                source_key=f"squash:{key}",
                layer_dirs=dirs,
                overlay_xattrs=upper.overlay_xattrs,
                **container,
                **shared,
            )
            return [squashed]
        tasks: list[_LayerTask] = list(
            image_layer_tasks(lower, self.host, self.cache_dir, self.clamp_mtime, pack_file=self.pack_file)
        )
        tasks.append(
            PackContainerLayer(
                pack_file=self.pack_file,
                slot=len(tasks),
                layer_dir=upper.layer_dir,
                source_key=upper.key,
                overlay_xattrs=upper.overlay_xattrs,
                **container,
                **shared,
            )
        )
        return tasks

    def layer_records(self) -> list[LayerRecord]:
        """Every layer task's record, the container's own last (even when it is empty)."""
        return [read_record(Path(t.output().path)) for t in self.layer_tasks()]

    def image_records(self) -> list[LayerRecord]:
        """The layers the image holds: docker commit adds none for a container that changed nothing."""
        return packing.image_layers(self.layer_records(), squash=self.squash)

    def found_layer_records(self) -> list[LayerRecord] | None:
        """The image's layer records if every layer task has written its own, else None."""
        try:
            return self.image_records()
        except LayerError:  # missing or damaged: the layer task packs it (again)
            return None

    def layer_blobs(self) -> list[StoredBlob]:
        """The layers as stored in the image: compressed (once per cache) when --compression asks for it."""
        cache = LayerCache(Path(self.cache_dir))
        return assembly.layer_blobs(cache, self.image_records(), self.compression, self.compression_level)

    def found_layer_blobs(self) -> list[StoredBlob] | None:
        """The stored layer blobs if every one is already in the cache (nothing is packed or compressed)."""
        records = self.found_layer_records()
        if records is None:
            return None
        cache = LayerCache(Path(self.cache_dir))
        return assembly.find_layer_blobs(cache, records, self.compression, self.compression_level)

    def common(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _ in _CommitTask.get_params()}


class _DerivedFile(_CommitTask):
    """A target computed from other targets' bytes: complete exactly when it holds what build() gives now, so a
    changed input (a layer packed again to another diff_id, a new config) makes it be written again."""

    _abstract = True

    def build(self, *, final: bool) -> bytes | None:
        """The bytes this target must hold, or None while an input is missing; final=False must stay cheap."""
        raise NotImplementedError

    def complete(self) -> bool:
        # Not while the config is to be written again: luigi decides what is complete before anything runs, so
        # a file matching the config as it is now could be stale by the time the archive is written.
        if not WriteImageConfig(**self.common()).complete():
            return False
        expected = self.build(final=False)
        if expected is None:
            return False
        try:
            return Path(self.output().path).read_bytes() == expected
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False

    def run(self) -> None:
        data = self.build(final=True)
        if data is None:
            raise OutputError(f"{self.output().path}: an input of this commit vanished while it ran; re-run")
        write_bytes_atomic(Path(self.output().path), data)

    def config_bytes(self) -> bytes | None:
        try:
            return Path(WriteImageConfig(**self.common()).output().path).read_bytes()
        except FileNotFoundError:
            return None


class WriteImageConfig(_CommitTask):
    """The image config; complete while its diff_ids are those of the current layer records."""

    def requires(self) -> list[_LayerTask]:
        return self.layer_tasks()

    def output(self) -> DurableTarget:
        return DurableTarget(str(CacheLayout.commit_file(Path(self.commit_dir()), "config.json")))

    def complete(self) -> bool:
        records = self.found_layer_records()
        if records is None:
            return False
        return assembly.read_diff_ids(Path(self.output().path)) == [r.diff_id for r in records]

    def run(self) -> None:
        records = self.image_records()
        if assembly.read_diff_ids(Path(self.output().path)) == [r.diff_id for r in records]:
            # A layer record was lost and packed again to the same diff_id: the config written for this state
            # still describes it; keeping it (and its `created`) keeps the image id, the archive and iid file.
            return
        data = assembly.build_config_bytes(
            self.open_storage(), self.container_id, records, self.clamp_mtime, self.options()
        )
        write_bytes_atomic(Path(self.output().path), data)


class WriteManifest(_DerivedFile):
    """docker-archive's manifest.json."""

    def requires(self) -> WriteImageConfig:
        return WriteImageConfig(**self.common())

    def output(self) -> DurableTarget:
        return DurableTarget(str(CacheLayout.commit_file(Path(self.commit_dir()), "manifest.json")))

    def build(self, *, final: bool) -> bytes | None:
        config = self.config_bytes()
        blobs = self.layer_blobs() if final else self.found_layer_blobs()
        if config is None or blobs is None:
            return None
        return assembly.build_manifest_bytes(config, blobs, parse_reference(self.image))


class WriteRepositories(_DerivedFile):
    """docker-archive's legacy repositories file."""

    def requires(self) -> WriteImageConfig:
        return WriteImageConfig(**self.common())

    def output(self) -> DurableTarget:
        return DurableTarget(str(CacheLayout.commit_file(Path(self.commit_dir()), "repositories")))

    def build(self, *, final: bool) -> bytes | None:
        config = self.config_bytes()
        return None if config is None else assembly.build_repositories_bytes(config, parse_reference(self.image))


class WriteImageArchive(_CommitTask):
    """The image at output_path, in one of commit.FORMATS; complete only while the archive there holds this
    commit's image (its index.json, or manifest.json for --format docker, is what this run would write)."""

    format: str = luigi.ChoiceParameter(choices=plan.FORMATS, default="both")

    def requires(self) -> dict[str, Any]:
        # The layers too: the archive copies their cached blobs, which retention or a person may have removed
        # since the config was written; requiring them packs such a layer again instead of failing for good.
        return {
            "config": WriteImageConfig(**self.common()),
            "manifest": WriteManifest(**self.common()),
            "repositories": WriteRepositories(**self.common()),
            "layers": self.layer_tasks(),
        }

    def output(self) -> DurableTarget:
        return DurableTarget(self.output_path)

    def identity(self, *, final: bool) -> tuple[str, bytes] | None:
        """(member name, bytes) that identify this commit's archive, or None while an input is missing."""
        tasks = self.requires()
        try:
            config = Path(tasks["config"].output().path).read_bytes()
            manifest = Path(tasks["manifest"].output().path).read_bytes()
        except FileNotFoundError:
            return None
        blobs = self.layer_blobs() if final else self.found_layer_blobs()
        if blobs is None:
            return None
        return assembly.build_archive_identity(self.format, config, blobs, parse_reference(self.image), manifest)

    def complete(self) -> bool:
        if not WriteImageConfig(**self.common()).complete():  # see _DerivedFile.complete
            return False
        identity = self.identity(final=False)
        return identity is not None and read_member(Path(self.output_path), identity[0]) == identity[1]

    def run(self) -> None:
        inputs = {name: Path(self.input()[name].path).read_bytes() for name in ("config", "manifest", "repositories")}
        replaced = assembly.read_image_id(Path(self.output_path))
        assembly.write_commit_output(
            Path(self.output_path),
            self.format,
            LayerCache(Path(self.cache_dir)),
            self.layer_blobs(),
            inputs["config"],
            {"manifest.json": inputs["manifest"], "repositories": inputs["repositories"]},
            parse_reference(self.image),
            mtime=assembly.archive_mtime(inputs["config"]),
            progress=Progress(self, "written"),
            packed=Path(self.pack_file) if self.pack_file else None,
        )
        Progress(self).finish()
        if replaced is not None:
            log.info("%s: replaced image %s with %s", self.output_path, replaced, digest_of(inputs["config"]))


class WriteIidFile(_DerivedFile):
    """--iidfile: the image id (sha256 of the config), as docker commit --iidfile writes it."""

    iidfile: str = luigi.Parameter()

    def requires(self) -> WriteImageConfig:
        return WriteImageConfig(**self.common())

    def output(self) -> DurableTarget:
        return DurableTarget(self.iidfile)

    def build(self, *, final: bool) -> bytes | None:
        config = self.config_bytes()
        return None if config is None else digest_of(config).encode()


class CommitImage(HostTask, luigi.WrapperTask):
    """Entry point: `luigi --module pipeline CommitImage --id ID [--image NAME[:TAG]] [--output PATH]`."""

    id: str = luigi.Parameter(description="container id, unique id prefix, or name")
    image: str = luigi.Parameter(default="", description="NAME[:TAG] for RepoTags; default: the container's name")

    def label(self) -> str:
        return self.id

    # The flag must be --output, so this parameter shadows Task.output(); a WrapperTask never calls that, and
    # other tasks require WriteImageArchive, never CommitImage.
    output: str = luigi.Parameter(  # type: ignore[assignment]
        default="", description="archive path; default: under [commit] output_dir"
    )

    pause: bool = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="freeze a running container while its layer is packed (--pause false to opt out)",
    )
    format: str | None = luigi.OptionalChoiceParameter(
        choices=plan.FORMATS, default=None, description="both (default), docker, oci or oci-dir; [commit] format"
    )

    author: str = luigi.Parameter(default="", description="the image's author (docker commit --author)")
    message: str = luigi.Parameter(default="", description="a comment for the commit (docker commit --message)")
    change: tuple[str, ...] = RepeatableParameter(
        default=(), description="a Dockerfile instruction to apply (CMD, ENV, EXPOSE, ...); repeatable"
    )
    config: str = luigi.Parameter(default="", description="a JSON file of image config keys to merge in")
    squash: bool = luigi.BoolParameter(default=False, description="commit all layers as one")
    iidfile: str = luigi.Parameter(default="", description="write the image id (config digest) to this file")
    compression: str = luigi.ChoiceParameter(
        choices=ALGORITHMS, default="none", description="layer compression: none, gzip, or zstd (OCI formats only)"
    )
    compression_level: int | None = luigi.OptionalIntParameter(default=None, description="default: gzip 1, zstd 3")

    def requires(self) -> list[luigi.Task]:
        # luigi calls requires() more than once; the container's state is taken once, at the first call, so
        # every task of this run is of one state.
        if self._planned is None:
            self._planned = self._plan()
        return self._planned

    _planned: list[luigi.Task] | None = None

    def _plan(self) -> list[luigi.Task]:
        settings = commit()
        engine, root = storage().engine, storage().storage_root()
        request = plan.CommitRequest(
            id_text=self.id,
            image=self.image,
            output=self.output,
            output_dir=settings.output_dir,
            cache_dir=settings.cache_dir,
            fmt=self.format or settings.format,
            config_file=self.config,
            iidfile=self.iidfile,
            changes=tuple(self.change),
            author=self.author,
            message=self.message,
            compression=self.compression,
            compression_level=self.compression_level,
        )
        resolved = plan.plan_request(open_storage(engine, Path(root)), root, request)
        params: dict[str, Any] = {
            "host": self.host,
            "format": request.fmt,
            "author": self.author,
            "message": self.message,
            "changes": self.change,
            "config_file": resolved.config_file,
            "squash": self.squash,
            "compression": self.compression,
            "compression_level": self.compression_level,
            **commit_params(resolved, engine, root, self.pause),
        }
        archive = WriteImageArchive(**params)
        if plan.assembles_in_place(request, resolved, layers=len(archive.layer_tasks())):
            packed = CacheLayout(Path(params["cache_dir"])).pack(archive.commit_dir(), request.fmt)
            archive = WriteImageArchive(pack_file=str(packed), **params)
        if self.iidfile:
            return [archive, WriteIidFile(iidfile=os.path.abspath(self.iidfile), **archive.common())]
        return [archive]


def image_layer_tasks(
    lower: Sequence[plan.LayerSource], host: str, cache_dir: str, clamp_mtime: int | None, *, pack_file: str = ""
) -> list[PackImageLayer]:
    """One task per image layer: packed once per cache, whichever commit or snapshot needs it first (into slot i
    of pack, when the commit's archive is assembled in place)."""
    return [
        PackImageLayer(
            pack_file=pack_file,
            slot=i,
            host=host,
            cache_dir=cache_dir,
            clamp_mtime=clamp_mtime,
            layer_dir=s.layer_dir,
            source_key=s.key,
            tar_split=s.tar_split,
            original_diff_id=s.diff_id,
            overlay_xattrs=s.overlay_xattrs,
            planned_bytes=s.planned_bytes,
        )
        for i, s in enumerate(lower)
    ]


def commit_params(resolved: plan.CommitPlan, engine: str, root: str, pause: bool) -> dict[str, Any]:
    """The parameters every task of a commit of resolved shares (with the settings of this run)."""
    return {
        "container_id": resolved.container_id,
        "container_name": resolved.name,
        "lower": tuple(s.as_param() for s in resolved.state.lower),
        "upper": resolved.state.upper.as_param(),
        "metadata": resolved.state.metadata,
        "image": str(resolved.reference),
        "output_path": str(resolved.output),
        "engine": engine,
        "storage_root": root,
        "cache_dir": os.path.abspath(commit().cache_dir),
        "clamp_mtime": plan.source_date_epoch(),
        "pause": pause,
    }


class Progress:
    """Reports work to luigid's web UI: a percentage and "<what>: N of M MiB <verb>", at most once a second, and
    100% when done (a finished task must not keep showing 99%); and, on a terminal, to the person watching
    (host.terminal: a line per task on stderr with the rate and the time left)."""

    def __init__(self, task: luigi.Task, verb: str = "packed") -> None:
        self._task = task
        self._verb = verb
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        terminal.update(self._task.task_id, self._what(), done, total, verb=self._verb)
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            self._report(min(99, done * 100 // max(total, 1)), f"{done / MIB:.1f} of {max(total, done) / MIB:.1f} MiB")

    def finish(self, summary: str = "done") -> None:
        terminal.finish(self._task.task_id)
        self._report(100, summary)

    def _what(self) -> str:
        return self._task.label() if isinstance(self._task, HostTask) else self._task.task_family

    def _report(self, percent: int, text: str) -> None:
        # The worker installs these callbacks before run(); outside a worker they are None.
        set_percentage = self._task.set_progress_percentage
        set_message = self._task.set_status_message
        if set_percentage is not None and set_message is not None:
            set_percentage(percent)
            what = self._what()
            set_message(f"{what}: {text} {self._verb}" if percent < 100 else f"{what}: {text}")


MIB = 1 << 20
