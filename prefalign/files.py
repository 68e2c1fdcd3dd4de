"""Output files that are never seen half-written, and builds that resume: shared by the data builders and the judge.

    with atomic_write(path) as f:          # written to a temporary file beside `path`, renamed over it at the end
        f.write(text)
    check_settings(path.with_name(path.name + ".settings"), settings, overwrite=False)   # refuse a mismatch
    shards = ShardStore(folder)            # one JSON file per finished shard, each written atomically

An interrupted process leaves either the previous file or none at its path, never a partial one: the rename
(``os.replace``) is atomic on one file system, which is why the temporary file lives in the same folder. A build
that resumes keeps its settings beside its output and refuses to continue with other settings, so one output never
mixes rows made two ways (see docs/builders.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def temporary_path(path: str | Path) -> Path:
    """A temporary name in ``path``'s folder (same file system, so a rename is atomic): ``.<name>.tmp-<pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """An open file that becomes ``path`` only when the block ends without error (fsync, then ``os.replace``);
    on an error the temporary file is removed and ``path`` keeps its previous content (or stays absent)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write ``rows`` as JSON lines to ``path`` atomically (keys in row order, non-ASCII kept); returns the count."""
    count = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented JSON to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def replace_path(tmp: str | Path, path: str | Path) -> None:
    """Move a finished file or folder ``tmp`` to ``path`` (replacing it). A file moves atomically; a folder replaces
    an existing one through a rename to a trash name first, so ``path`` is never a partly written folder."""
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and path.exists():
        trash = temporary_path(path).with_name(temporary_path(path).name + ".old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        os.replace(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, path)


def settings_mismatch(stored: dict, settings: dict, keys: Iterable[str] | None = None) -> str | None:
    """``"key: old → new, ..."`` for the ``keys`` (default: all of ``settings``) whose values differ, or None."""
    keys = list(settings) if keys is None else list(keys)
    changed = [f"{k}: {stored.get(k)!r} → {settings.get(k)!r}" for k in keys if stored.get(k) != settings.get(k)]
    return ", ".join(changed) or None


def check_settings(settings_file: str | Path, settings: dict, overwrite: bool = False, what: str | None = None,
                   write: bool = True) -> None:
    """Refuse to continue an output started with other settings; store ``settings`` in ``settings_file`` (JSON).

    ``what``: the output named in the message (default: the settings file's folder). With ``overwrite`` the stored
    settings are replaced without a check (the caller removes the old output). ``write=False`` only checks (the
    non-main processes of a distributed build)."""
    settings_file = Path(settings_file)
    if settings_file.exists() and not overwrite:
        changed = settings_mismatch(json.loads(settings_file.read_text(encoding="utf-8")), settings)
        if changed:
            raise ValueError(f"{what or settings_file.parent} was started with other settings ({changed}); pass "
                             "overwrite=True (--overwrite) to start again, or the same settings to resume")
    if write:
        write_json(settings_file, settings)


def save_dataset(dataset: Any, path: str | Path) -> Path:
    """Write a ``datasets.Dataset`` to ``path`` atomically: ``.jsonl`` (JSON lines), ``.parquet``, or otherwise a
    ``save_to_disk`` folder; written under a temporary name beside ``path``, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        if path.suffix == ".jsonl":
            dataset.to_json(str(tmp), lines=True, force_ascii=False)
        elif path.suffix == ".parquet":
            dataset.to_parquet(str(tmp))
        else:
            dataset.save_to_disk(str(tmp))
        replace_path(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


class ShardStore:
    """A folder of finished shards, ``shard-00000.json`` ..., each written atomically: a shard file exists only when
    its work is complete, so a restarted build redoes exactly the missing shards."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, index: int) -> Path:
        """The file of shard ``index``."""
        return self.folder / f"shard-{index:05d}.json"

    def missing(self, num_shards: int) -> list[int]:
        """The shard indices below ``num_shards`` not yet written."""
        return [s for s in range(num_shards) if not self.path(s).exists()]

    def save(self, index: int, value: Any) -> None:
        """Store shard ``index`` (any JSON value) atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path(index)) as f:
            f.write(json.dumps(value, ensure_ascii=False) + "\n")

    def load(self, index: int) -> Any:
        """The stored value of shard ``index``."""
        return json.loads(self.path(index).read_text(encoding="utf-8"))

    def clear(self) -> None:
        """Remove every shard (and the folder)."""
        shutil.rmtree(self.folder, ignore_errors=True)
