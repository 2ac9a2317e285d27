import tarfile
from pathlib import Path

from pipeline.image.archive import Member, archive_size, write_image_archive


def test_members_are_written_in_order_once_with_parent_directories(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 1000)
    members = [
        Member("blobs/sha256/aa", path=blob),
        Member("blobs/sha256/aa", path=blob),
        Member("blobs/sha256/cc", data=b"{}"),
        Member("manifest.json", data=b"[]"),
    ]
    size = write_image_archive(tmp_path / "a.tar", members, mtime=42)
    assert size == (tmp_path / "a.tar").stat().st_size
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == ["blobs", "blobs/sha256", "blobs/sha256/aa", "blobs/sha256/cc", "manifest.json"]
        assert {m.mtime for m in tar.getmembers()} == {42}
        assert tar.extractfile("blobs/sha256/aa").read() == b"x" * 1000  # type: ignore[union-attr]


def test_size_estimate_is_never_below_the_real_size(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"y" * 70_001)
    members = [Member("blobs/sha256/" + "a" * 64, path=blob), Member("manifest.json", data=b"[" * 513)]
    real = write_image_archive(tmp_path / "a.tar", members, mtime=0)
    assert real <= archive_size(members) <= real + 8192
