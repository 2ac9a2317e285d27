"""The tasks that commit one container into an image archive, each a thin call into the plain core.

Graph for one commit (every output written atomically):
    PackImageLayer* ─┐
    PackContainerLayer ┴─> WriteImageConfig ─> WriteManifest, WriteRepositories ─> WriteImageArchive <─ CommitImage
"""

import hashlib
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import luigi

from pipeline import commit as commits
from pipeline import failpoint, squash
from pipeline.atomic import write_bytes_atomic
from pipeline.cache import LayerCache
from pipeline.compression import ALGORITHMS, CompressedBlob
from pipeline.container import Layer
from pipeline.engines import open_storage
from pipeline.imageconfig import CommitOptions, digest_of
from pipeline.layer import LayerRecord, encode_record, read_record
from pipeline.reference import parse_reference
from pipeline.tasks.settings import DurableTarget, HostTask, RepeatableParameter, StorageTask, commit, storage


class _LayerTask(HostTask):
    """Packs one layer_dir into the cache; its target is the layer's record (diff_id, size)."""

    layer_dir: str = luigi.Parameter()
    cache_dir: str = luigi.Parameter()
    clamp_mtime: int | None = luigi.OptionalIntParameter(default=None)

    def run(self) -> None:
        cache = LayerCache(Path(self.cache_dir))
        with cache.lock(_key(self.output().path)):
            if self.complete():  # another process packed it while this one waited for the lock
                return
            with self.pausing():
                failpoint.reached(f"pack:{self.task_family}")
                record = self.pack(cache)
            with self.output().temporary_path() as temp:
                Path(temp).write_bytes(encode_record(record))
        failpoint.reached("task:layer-done")

    def pausing(self) -> AbstractContextManager[object]:
        """What keeps the layer still while it is packed; image layers are immutable and need nothing."""
        return nullcontext()

    def pack(self, cache: LayerCache) -> LayerRecord:
        return commits.pack_scanned_layer(
            cache, Path(self.layer_dir), clamp_mtime=self.clamp_mtime, report=_Progress(self)
        )

    def complete(self) -> bool:
        # The record alone is not enough: a blob deleted, truncated or altered since must be packed again.
        path = Path(self.output().path)
        try:
            recorded_ns = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        return LayerCache(Path(self.cache_dir)).has_blob(read_record(path), recorded_ns=recorded_ns)


class PackImageLayer(_LayerTask):
    """An immutable image layer, packed once per cache and reused by every commit that shares it; reassembled
    byte for byte from the engine's tar-split records when it kept them."""

    tar_split: str = luigi.Parameter(default="")
    original_diff_id: str = luigi.Parameter(default="")

    def pack(self, cache: LayerCache) -> LayerRecord:
        layer = Layer(
            layer_id="",
            layer_dir=Path(self.layer_dir),
            tar_split=Path(self.tar_split) if self.tar_split else None,
            diff_id=self.original_diff_id,
        )
        return commits.pack_image_layer(cache, layer, clamp_mtime=self.clamp_mtime, report=_Progress(self))

    def output(self) -> DurableTarget:
        key = _key(os.path.realpath(self.layer_dir), self.clamp_mtime)
        return DurableTarget(os.path.join(self.cache_dir, "layers", f"{key}.json"))


class _CommitTask(StorageTask):
    """Parameters shared by every task of one commit."""

    container_id: str = luigi.Parameter()
    image: str = luigi.Parameter()
    output_path: str = luigi.Parameter()
    author: str = luigi.Parameter(default="")
    message: str = luigi.Parameter(default="")
    changes: tuple[str, ...] = luigi.ListParameter(default=())
    config_file: str = luigi.Parameter(default="")
    squash: bool = luigi.BoolParameter(default=False)
    compression: str = luigi.ChoiceParameter(choices=ALGORITHMS, default="none")
    compression_level: int | None = luigi.OptionalIntParameter(default=None)

    def commit_dir(self) -> str:
        # Every significant parameter but the host names the commit, so options never share its files.
        params = sorted(self.to_str_params(only_significant=True).items())
        return os.path.join(self.cache_dir, "commits", _key(*(p for p in params if p[0] != "host")))

    def options(self) -> CommitOptions:
        return CommitOptions(
            author=self.author,
            message=self.message,
            changes=tuple(self.changes),
            extra_config=commits.read_config_file(self.config_file),
            squash=self.squash,
        )

    def layer_tasks(self) -> list[_LayerTask]:
        container = self.open_storage().read_container(self.container_id)
        tasks: list[_LayerTask] = [
            PackImageLayer(
                layer_dir=str(layer.layer_dir),
                cache_dir=self.cache_dir,
                clamp_mtime=self.clamp_mtime,
                host=self.host,
                tar_split=str(layer.tar_split or ""),
                original_diff_id=layer.diff_id,
            )
            for layer in container.lower_layers
        ]
        if self.squash:
            return [self.clone(PackSquashedLayer, layer_dir=str(container.layer.layer_dir))]
        tasks.append(self.clone(PackContainerLayer, layer_dir=str(container.layer.layer_dir)))
        return tasks

    def layer_records(self) -> list[LayerRecord]:
        return [read_record(Path(t.output().path)) for t in self.layer_tasks()]

    def layer_blobs(self) -> list[CompressedBlob]:
        """The layers as stored in the image: compressed (once per cache) when --compression asks for it."""
        cache = LayerCache(Path(self.cache_dir))
        return commits.layer_blobs(cache, self.layer_records(), self.compression, self.compression_level)

    def common(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name, _ in _CommitTask.get_params()}


class PackContainerLayer(_LayerTask, _CommitTask):
    """The container's own writable layer, packed once per commit (paused while packed if it is running)."""

    def pausing(self) -> AbstractContextManager[object]:
        container = self.open_storage().read_container(self.container_id)
        return commits.pause_while_packing(container, Path(self.cache_dir) / "freezer", enabled=self.pause)

    def output(self) -> DurableTarget:
        return DurableTarget(os.path.join(self.commit_dir(), "layer.json"))


class PackSquashedLayer(PackContainerLayer):
    """--squash: every layer of the container merged into one (by the kernel), packed once per commit."""

    def output(self) -> DurableTarget:
        return DurableTarget(os.path.join(self.commit_dir(), "squashed.json"))

    def pack(self, cache: LayerCache) -> LayerRecord:
        container = self.open_storage().read_container(self.container_id)
        layer_dirs = [layer.layer_dir for layer in (*container.lower_layers, container.layer)]
        return squash.pack_squashed(layer_dirs, Path(self.cache_dir), clamp_mtime=self.clamp_mtime)


class WriteImageConfig(_CommitTask):
    def requires(self) -> list[_LayerTask]:
        return self.layer_tasks()

    def output(self) -> DurableTarget:
        return DurableTarget(os.path.join(self.commit_dir(), "config.json"))

    def run(self) -> None:
        records = self.layer_records()
        data = commits.build_config_bytes(
            self.open_storage(), self.container_id, records, self.clamp_mtime, self.options()
        )
        write_bytes_atomic(Path(self.output().path), data)


class WriteManifest(_CommitTask):
    def requires(self) -> WriteImageConfig:
        return WriteImageConfig(**self.common())

    def output(self) -> DurableTarget:
        return DurableTarget(os.path.join(self.commit_dir(), "manifest.json"))

    def run(self) -> None:
        config = Path(self.input().path).read_bytes()
        data = commits.build_manifest_bytes(config, self.layer_blobs(), parse_reference(self.image))
        write_bytes_atomic(Path(self.output().path), data)


class WriteRepositories(_CommitTask):
    def requires(self) -> WriteImageConfig:
        return WriteImageConfig(**self.common())

    def output(self) -> DurableTarget:
        return DurableTarget(os.path.join(self.commit_dir(), "repositories"))

    def run(self) -> None:
        config = Path(self.input().path).read_bytes()
        data = commits.build_repositories_bytes(config, parse_reference(self.image))
        write_bytes_atomic(Path(self.output().path), data)


class WriteImageArchive(_CommitTask):
    """The image at output_path, in one of commit.FORMATS."""

    format: str = luigi.ChoiceParameter(choices=commits.FORMATS, default="both")

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

    def run(self) -> None:
        inputs = {name: Path(self.input()[name].path).read_bytes() for name in ("config", "manifest", "repositories")}
        commits.write_commit_output(
            Path(self.output_path),
            self.format,
            LayerCache(Path(self.cache_dir)),
            self.layer_blobs(),
            inputs["config"],
            {"manifest.json": inputs["manifest"], "repositories": inputs["repositories"]},
            parse_reference(self.image),
            mtime=commits.archive_mtime(inputs["config"]),
        )


class WriteIidFile(_CommitTask):
    """--iidfile: the image id (sha256 of the config), as docker commit --iidfile writes it."""

    iidfile: str = luigi.Parameter()

    def requires(self) -> WriteImageConfig:
        return WriteImageConfig(**self.common())

    def output(self) -> DurableTarget:
        return DurableTarget(self.iidfile)

    def run(self) -> None:
        write_bytes_atomic(Path(self.iidfile), digest_of(Path(self.input().path).read_bytes()).encode())


class CommitImage(HostTask, luigi.WrapperTask):
    """Entry point: `luigi --module pipeline CommitImage --id ID [--image NAME[:TAG]] [--output PATH]`."""

    id: str = luigi.Parameter(description="container id, unique id prefix, or name")
    image: str = luigi.Parameter(default="", description="NAME[:TAG] for RepoTags; default: the container's name")
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
        choices=commits.FORMATS, default=None, description="both (default), docker, oci or oci-dir; [commit] format"
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
        settings = commit()
        engine, root = storage().engine, storage().storage_root()
        commits.check_options(self.change, self.config)  # refuse bad options before any layer is packed
        fmt = self.format or settings.format
        commits.check_compression(self.compression, self.compression_level, fmt)
        plan = commits.plan_commit(
            open_storage(engine, Path(root)), self.id, self.image, self.output, Path(settings.output_dir), fmt
        )
        archive = WriteImageArchive(
            host=self.host,
            container_id=plan.container_id,
            image=str(plan.reference),
            output_path=str(plan.output),
            engine=engine,
            storage_root=root,
            cache_dir=os.path.abspath(settings.cache_dir),
            clamp_mtime=commits.source_date_epoch(),
            pause=self.pause,
            format=fmt,
            author=self.author,
            message=self.message,
            changes=self.change,
            config_file=os.path.abspath(self.config) if self.config else "",
            squash=self.squash,
            compression=self.compression,
            compression_level=self.compression_level,
        )
        if self.iidfile:
            return [archive, WriteIidFile(iidfile=os.path.abspath(self.iidfile), **archive.common())]
        return [archive]


class _Progress:
    """Reports a layer's packing to luigid's web UI: a percentage and "bytes done of total", at most once a second."""

    def __init__(self, task: luigi.Task) -> None:
        self._task = task
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            # The worker installs these callbacks before run(); outside a worker they are None.
            set_percentage = self._task.set_progress_percentage
            set_message = self._task.set_status_message
            if set_percentage is not None and set_message is not None:
                set_percentage(min(99, done * 100 // max(total, 1)))
                set_message(f"{done} of about {total} bytes packed")


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]
