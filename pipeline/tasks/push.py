"""PushImage: commit a container and push it to an OCI distribution registry; done when this cache's push record
gives the tag this commit's manifest digest.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md. Graph:
    PackImageLayer*, PackContainerLayer ─> WriteImageConfig ─> PushImage (target: the tag's recorded digest)
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import luigi

from pipeline import plan
from pipeline.engines import open_storage
from pipeline.image.reference import Reference
from pipeline.registry.client import Options, open_registry
from pipeline.registry.push import Image, PushedBlobs, PushedTags, parse_push_reference, prepare_image, push_image
from pipeline.store.cache import LayerCache
from pipeline.store.compression import ALGORITHMS
from pipeline.tasks.image import WriteImageConfig, commit_params
from pipeline.tasks.settings import HostTask, commit, storage

log = logging.getLogger(__name__)


class registry(luigi.Config):  # noqa: N801 - the class name is the luigi.cfg section [registry]
    insecure: bool = luigi.BoolParameter(
        default=False,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="plain HTTP instead of verified TLS; refused unless the registry host is loopback",
    )
    timeout: float = luigi.FloatParameter(
        default=60.0,
        description="seconds for each whole request (and each MiB of an upload); tries share attempts x this",
    )
    attempts: int = luigi.IntParameter(default=5, description="tries of a request answered 429/5xx or cut off")
    backoff: float = luigi.FloatParameter(default=1.0, description="seconds before the 2nd try, doubling after")
    ca_file: str = luigi.Parameter(default="", description="PEM CA bundle trusted besides the system's")

    def options(self) -> Options:
        return Options(self.insecure, self.timeout, self.attempts, self.backoff, self.ca_file)


class RegistryTag(luigi.Target):
    """Exists when this cache's push record (registry.push.PushedTags) gives the tag the image's manifest digest:
    a record compared, never the network (luigi's complete() must stay cheap), so a tag pushed for another
    state of the container since, or for another container, counts as not pushed."""

    def __init__(self, reference: Reference, tags: PushedTags, build: Callable[[], Image | None]) -> None:
        self.reference = reference
        self.tags = tags
        self.build = build  # the image, or None while its commit is not written

    def exists(self) -> bool:
        image = self.build()
        if image is None:  # the commit is not written yet, so its digest is unknown
            return False
        found = self.tags.digest(self.reference.path, self.reference.tag)
        if found is not None and found != image.digest:
            log.info("%s was pushed as %s, not as this commit's %s", self.reference, found, image.digest)
        return found == image.digest


class PushImage(HostTask):
    """Entry point: `luigi --module pipeline PushImage --id ID --image HOST[:PORT]/REPO[:TAG]`."""

    id: str = luigi.Parameter(description="container id, unique id prefix, or name")
    image: str = luigi.Parameter(description="HOST[:PORT]/REPO[:TAG] to push to (the registry host is required)")

    def label(self) -> str:
        return f"{self.id}_{self.image}"

    compression: str = luigi.ChoiceParameter(
        choices=ALGORITHMS, default="gzip", description="layer compression for the registry: gzip, zstd or none"
    )
    compression_level: int | None = luigi.OptionalIntParameter(default=None, description="default: gzip 1, zstd 3")
    pause: bool = luigi.BoolParameter(
        default=True,
        parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="freeze a running container while its layer is packed (--pause false to opt out)",
    )

    def requires(self) -> dict[str, Any]:
        # The layer tasks directly too: each checks its cached blob, so one deleted since is packed again.
        config = self._config_task()
        return {"config": config, "layers": config.layer_tasks()}

    def output(self) -> RegistryTag:
        reference = parse_push_reference(self.image)
        assert reference.domain is not None
        tags = PushedTags.in_cache(Path(self._config_task().cache_dir), reference.domain)
        return RegistryTag(reference, tags, lambda: self.built_image(final=False))

    def run(self) -> None:
        reference = parse_push_reference(self.image)
        image = self.built_image()
        assert reference.domain is not None and image is not None
        cache_dir = Path(self._config_task().cache_dir)
        host = reference.domain
        pushed, tags = PushedBlobs.in_cache(cache_dir, host), PushedTags.in_cache(cache_dir, host)
        push_image(open_registry(host, registry().options()), reference, image, pushed, tags)

    def built_image(self, *, final: bool = True) -> Image | None:
        """The image this push sends, or None before its config is written (or, unless final, before every
        compressed blob is in the cache: RegistryTag.exists never compresses)."""
        task = self._config_task()
        try:
            config = Path(task.output().path).read_bytes()
        except FileNotFoundError:
            return None
        records = task.found_layer_records()
        if records is None or (not final and task.found_layer_blobs() is None):
            return None
        cache = LayerCache(Path(task.cache_dir))
        return prepare_image(config, records, cache, compression=self.compression, level=self.compression_level)

    _config: WriteImageConfig | None = None

    def _config_task(self) -> WriteImageConfig:
        # The container's state is taken once per run (luigi calls requires() and output() more than once).
        if self._config is None:
            engine, root = storage().engine, storage().storage_root()
            request = plan.CommitRequest(
                id_text=self.id,
                image=str(parse_push_reference(self.image)),
                output=None,  # no archive: output_path stays out of the commit's identity
                cache_dir=commit().cache_dir,
                compression=self.compression,
                compression_level=self.compression_level,
            )
            resolved = plan.plan_request(open_storage(engine, Path(root)), root, request)
            params = commit_params(resolved, engine, root, self.pause) | {"output_path": ""}
            self._config = WriteImageConfig(
                host=self.host, compression=self.compression, compression_level=self.compression_level, **params
            )
        return self._config
