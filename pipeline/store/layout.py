"""The layer cache's directory layout: the one place its paths are built; every other module asks this one.

    <cache_dir>/
      blobs/sha256/<hex>                   layer tars and their gzip/zstd forms, named by digest
      layers/<key>.json                    a layer's record (diff_id, size, fingerprint), named by its source key
      indexes/<key>.idx                    the entry index of an upper dir packed in one state (pipeline.layer.index),
                                           named by that state's source key: what its next delta is taken against
      compressed/<diff hex>-<alg>-<level>.json   which blob holds a layer tar compressed so
      commits/<key>/                       one commit's config.json, manifest.json, repositories
      packs/<key>.tar, <key>.json          image archives assembled in place, and how far (store.pack)
      packed/<hex>.json                    where a layer tar written only into a pack is: pack and offset
      locks/<name>.lock                    per-entry flocks between processes packing or compressing
      freezer/                             markers of containers a commit in flight has frozen
      pushed/<host>.json                   which repositories of a registry got which blobs (mount hints)
      pushed/<host>.tags.json              which manifest each tag pushed from this cache was given

The directory itself is the gc lock (LayerCache.hold / collecting).
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

COMMIT_FILES = ("config.json", "manifest.json", "repositories")


def key_of(*parts: object, length: int = 32) -> str:
    """A file-name-safe key for parts: the first `length` hex digits of the sha256 of their repr."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:length]


def digest_hex(digest: str) -> str:
    """The hex of a sha256 digest, checked before it becomes part of a path (containers/image does the same)."""
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or len(hex_digest) != 64 or any(c not in "0123456789abcdef" for c in hex_digest):
        raise PipelineError(f"{digest!r}: not a sha256 digest; the record holding it is damaged, delete it")
    return hex_digest


@dataclass(frozen=True)
class CacheLayout:
    """Paths inside one cache directory."""

    root: Path

    @property
    def blob_dir(self) -> Path:
        return self.root / "blobs" / "sha256"

    def blob(self, digest: str) -> Path:
        return self.blob_dir / digest_hex(digest)

    @property
    def layer_dir(self) -> Path:
        return self.root / "layers"

    def layer_record(self, source_key: str, clamp_mtime: int | None) -> Path:
        """The record of the layer packed from source_key (commit plan's LayerSource.key) with this clamp."""
        return self.layer_dir / f"{key_of(source_key, clamp_mtime)}.json"

    def layer_records(self) -> list[Path]:
        return sorted(self.layer_dir.glob("*.json"))

    @property
    def index_dir(self) -> Path:
        return self.root / "indexes"

    def entry_index(self, source_key: str) -> Path:
        """The entry index recorded when the upper dir in the state source_key was packed (whole or as a delta)."""
        return self.index_dir / f"{key_of(source_key)}.idx"

    def entry_indexes(self) -> list[Path]:
        return sorted(self.index_dir.glob("*.idx"))

    @property
    def compressed_dir(self) -> Path:
        return self.root / "compressed"

    def compressed_mapping(self, diff_id: str, algorithm: str, level: int) -> Path:
        return self.compressed_dir / f"{digest_hex(diff_id)}-{algorithm}-{level}.json"

    def compressed_mappings(self) -> list[Path]:
        return sorted(self.compressed_dir.glob("*.json"))

    @property
    def commits_dir(self) -> Path:
        return self.root / "commits"

    def commit_dir(self, *identity: object) -> Path:
        """The directory of one commit's small files, named by everything they are made from."""
        return self.commits_dir / key_of(*identity)

    def commit_dirs(self) -> list[Path]:
        return sorted(self.commits_dir.glob("*"))

    @staticmethod
    def commit_file(commit_dir: Path, name: str) -> Path:
        """One of a commit's files: config.json, manifest.json or repositories."""
        if name not in COMMIT_FILES:
            raise ValueError(f"{name!r} is not one of {COMMIT_FILES}")
        return commit_dir / name

    @property
    def pack_dir(self) -> Path:
        return self.root / "packs"

    def pack(self, *identity: object) -> Path:
        """The pack that becomes the archive of the commit identity names (store.pack)."""
        return self.pack_dir / f"{key_of(*identity)}.tar"

    def packs(self) -> list[Path]:
        return sorted(self.pack_dir.glob("*.tar"))

    @staticmethod
    def pack_state(pack: Path) -> Path:
        return pack.with_suffix(".json")

    def pack_named(self, name: str) -> Path:
        """A pack named in a blob pointer, checked before it becomes a path."""
        if not name.endswith(".tar") or len(name) != 36 or any(c not in "0123456789abcdef" for c in name[:32]):
            raise PipelineError(f"{name!r}: not a pack name; the pointer holding it is damaged, delete it")
        return self.pack_dir / name

    @property
    def pointer_dir(self) -> Path:
        return self.root / "packed"

    def blob_pointer(self, digest: str) -> Path:
        return self.pointer_dir / f"{digest_hex(digest)}.json"

    def blob_pointers(self) -> list[Path]:
        return sorted(self.pointer_dir.glob("*.json"))

    def lock(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    @property
    def freezer_markers(self) -> Path:
        return self.root / "freezer"

    def pushed_blobs(self, host: str) -> Path:
        return self.root / "pushed" / f"{_host_name(host)}.json"

    def pushed_tags(self, host: str) -> Path:
        return self.root / "pushed" / f"{_host_name(host)}.tags.json"


def _host_name(host: str) -> str:
    return host.replace("/", "_")
