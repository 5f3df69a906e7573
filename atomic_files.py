"""Writing files and directories so that a crash never leaves half of one behind, and so that others can
read them: write under a temporary name next to the final one, fsync, then rename. Models, checkpoints,
token caches, top-k stores, tokenizers and JSON records are all written this way (the lowest module:
it imports only the standard library, and safetensors where it writes a tensor file)."""
import json
import os
import shutil
import tempfile
from pathlib import Path


def sync_to_disk(path):
    """fsync a file, or every file and directory under a directory and the directory itself. A rename
    that publishes a finished file or directory must come after this: the kernel may write renames to
    disk before data, so a node crash or power loss could leave the new name on empty files, and the
    previous checkpoint, already deleted, would be lost too. Directories that cannot be fsynced (some
    network filesystems) are skipped."""
    if not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, files in os.walk(path, topdown=False):   # contents before the directory holding them
        for name in files:
            _fsync(os.path.join(root, name))
        fsync_dir(root)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """fsync a directory: makes the renames and new names in it durable (skipped where not supported)."""
    try:
        _fsync(path)
    except OSError:
        pass


def replace_dir(tmp_dir, out_dir):
    """Move a fully written tmp_dir to out_dir, durably: its contents reach the disk first, then the
    rename (and the parent directory that records it). An existing out_dir is moved aside first (two
    renames: POSIX has no atomic exchange of directories) and put back if the second rename fails;
    then it is removed, with what killed writes left beside out_dir."""
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    sync_to_disk(tmp_dir)
    old = None
    if out_dir.exists():
        old = tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent)   # unique, empty
        os.rename(out_dir, old)
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    remove_leftovers_beside(out_dir)


def remove_leftovers_beside(path):
    """Remove the temporary and set-aside copies that killed writes of `path` left next to it
    (.NAME.tmp-*, .NAME.old-*). Called after a write of `path` succeeded: one path, one writer."""
    path = Path(path)
    for p in path.parent.glob(f".{path.name}.*"):
        if not p.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-")):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def rename_durably(src, dst):
    """os.replace(src, dst) for a finished file or directory, with its data on disk before the new name."""
    sync_to_disk(src)
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))


def temp_dir_beside(path):
    """A new, empty, hidden directory next to `path` (same filesystem: a rename moves it into place), with
    the permissions a plain mkdir gives. mkdtemp's own are private (0700), and models, checkpoints, token
    caches and top-k stores are read by other jobs and users on a shared filesystem."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-", dir=parent)
    setgid = os.stat(parent).st_mode & 0o2000           # a group-shared parent passes its group on, as for mkdir
    os.chmod(tmp, (0o777 & ~current_umask()) | setgid)
    return tmp


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_directory(path):
    """A temporary directory next to `path`, and `commit()`, which replaces `path` with it in one rename
    once everything written into it is on disk (replace_dir)."""
    tmp = temp_dir_beside(path)
    return tmp, lambda: replace_dir(tmp, path)


def write_json_atomic(path, obj):
    """obj as JSON at path, written to a temporary name and renamed: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
        rename_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_tensors(tensors, path):
    """safetensors' save_file, with the permissions a plain open() gives: safetensors 0.8 makes its files
    private (0600), and models are read by other jobs and users."""
    from safetensors.torch import save_file
    save_file(tensors, path, {"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())
