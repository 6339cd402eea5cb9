"""Files and directories only their owner may read: creating them so, and tightening old ones.

The agent's state directory and the control plane's data directory hold private keys, tokens,
sealed secrets, the database and the user journal. Mode bits given at creation apply only when
a file is new (``O_CREAT`` ignores them for an existing file; ``mkdir(exist_ok=True)`` leaves an
existing directory as it is, e.g. a Kubernetes emptyDir, which is 0777), so every start also
tightens what is already there.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """An ``opener`` for :func:`open`: a file it creates is 0600 whatever the umask."""
    return os.open(path, flags, PRIVATE_FILE)


def write_private(path: Path, text: str, mode: int = PRIVATE_FILE) -> None:
    """Write ``text`` to ``path`` atomically; the file ends up with exactly ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    # A leftover temporary file from a crash keeps its old mode under O_CREAT: start afresh.
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits `mode` asks for
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) or take the existing one: owned by us, mode 0700.

    As root, a directory owned by someone else (a volume prepared by another user) is taken
    over; as any other user it is refused, since its owner could read what is put inside.
    """
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{path} is not a directory")
    me = os.geteuid()
    if st.st_uid != me:
        if me != 0:
            raise OSError(
                f"{path} belongs to uid {st.st_uid}, not to this process (uid {me}): "
                "give it to this user or use another directory"
            )
        os.chown(path, 0, os.getegid())
    if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
        os.chmod(path, PRIVATE_DIR)


def tighten(path: Path, mode: int = PRIVATE_FILE) -> None:
    """Remove the group and other bits of an existing file (no-op when it does not exist)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return  # never follow a link planted in a private directory
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, mode)


def tighten_tree(root: Path) -> None:
    """Every file below ``root`` 0600 (sockets included), every directory 0700; links skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            sub = Path(dirpath) / name
            if not sub.is_symlink():
                tighten(sub, PRIVATE_DIR)
        for name in filenames:
            tighten(Path(dirpath) / name, PRIVATE_FILE)
