"""PushImage: commit a container and push it to an OCI distribution registry; done when the registry holds the tag.

Spec: https://github.com/opencontainers/distribution-spec/blob/main/spec.md. Graph:
    PackImageLayer*, PackContainerLayer ─> WriteImageConfig ─> PushImage (target: the tag's digest in the registry)
"""

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import luigi

from pipeline import commit as commits
from pipeline.engines import open_storage
from pipeline.image.reference import Reference
from pipeline.registry.client import Options, open_registry
from pipeline.registry.push import Image, PushedBlobs, build_image, parse_push_reference, push_image
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
    """Exists when the registry resolves the tag to the image's manifest digest: the registry's state, not a
    local marker, so a tag deleted or moved since counts as not pushed."""

    def __init__(self, reference: Reference, build: Callable[[], Image | None]) -> None:
        self.reference = reference
        self.build = build  # the image, or None while its commit is not written

    def exists(self) -> bool:
        image = self.build()
        if image is None:  # the commit is not written yet, so its digest is unknown
            return False
        assert self.reference.domain is not None
        found = open_registry(self.reference.domain, registry().options()).manifest_digest(
            self.reference.path, self.reference.tag
        )
        if found is not None and found != image.digest:
            log.info("%s points at %s, not at this commit's %s", self.reference, found, image.digest)
        return found == image.digest


class PushImage(HostTask):
    """Entry point: `luigi --module pipeline PushImage --id ID --image HOST[:PORT]/REPO[:TAG]`."""

    id: str = luigi.Parameter(description="container id, unique id prefix, or name")
    image: str = luigi.Parameter(description="HOST[:PORT]/REPO[:TAG] to push to (the registry host is required)")
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
        return RegistryTag(parse_push_reference(self.image), lambda: self.built_image(final=False))

    def run(self) -> None:
        reference = parse_push_reference(self.image)
        image = self.built_image()
        assert reference.domain is not None and image is not None
        pushed = PushedBlobs.in_cache(Path(os.path.abspath(commit().cache_dir)), reference.domain)
        push_image(open_registry(reference.domain, registry().options()), reference, image, pushed)

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
        return build_image(config, records, cache, compression=self.compression, level=self.compression_level)

    _config: WriteImageConfig | None = None

    def _config_task(self) -> WriteImageConfig:
        # The container's state is taken once per run (luigi calls requires() and output() more than once).
        if self._config is None:
            reference = parse_push_reference(self.image)
            engine, root = storage().engine, storage().storage_root()
            commits.check_outside_storage(root, {commits.CACHE_DIR_FLAG: commit().cache_dir})  # only ever read
            plan = commits.plan_commit(open_storage(engine, Path(root)), self.id, str(reference), "", Path(), fmt=None)
            # No archive: output_path stays out of the commit's identity.
            params = commit_params(plan, engine, root, self.pause) | {"output_path": ""}
            self._config = WriteImageConfig(
                host=self.host, compression=self.compression, compression_level=self.compression_level, **params
            )
        return self._config
