"""Zero-copy: one file's data shared into another at a block-aligned offset (FICLONERANGE), where the filesystem
can share extents (XFS with reflink, btrfs). The clone is copy-on-write: a later write to either file copies the
blocks it touches, so neither file ever sees the other's changes.

Everything else refuses (ext4, tmpfs, overlayfs, two filesystems, an unaligned offset) with an errno that
clone_range turns into False: the caller copies instead.
"""

import errno
import fcntl
import struct

# linux/fs.h: #define FICLONERANGE _IOW(0x94, 13, struct file_clone_range), the struct being
# { __s64 src_fd; __u64 src_offset; __u64 src_length; __u64 dest_offset; } (32 bytes).
_FICLONERANGE = 0x4020940D
_RANGE = struct.Struct("=qQQQ")

# What a kernel or filesystem that cannot share these extents answers (copy instead).
_REFUSED = {
    errno.EOPNOTSUPP,
    errno.ENOTTY,
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EBADF,
    errno.EPERM,
    errno.ETXTBSY,
    errno.EISDIR,
}


def clone_range(src_fd: int, src_offset: int, length: int, dst_fd: int, dst_offset: int) -> bool:
    """Share length bytes of src_fd from src_offset into dst_fd at dst_offset; False where the filesystem
    refuses (nothing was changed then). Offsets must be block-aligned, and length too unless the range ends at
    src's end of file. Other errors (EIO, ENOSPC for the new extent maps) are raised."""
    if length == 0:
        return True
    try:
        fcntl.ioctl(dst_fd, _FICLONERANGE, _RANGE.pack(src_fd, src_offset, length, dst_offset))
    except OSError as e:
        if e.errno in _REFUSED:
            return False
        raise
    return True
