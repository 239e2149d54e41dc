"""Where the factory's files and models live: one interface, a local directory or an S3 bucket.

`FACTORY_STORAGE_URL` unset keeps today's layout in the data directory (`LocalBlobs`): nothing to
start, and a data directory written by an older factory reads as it is. `s3://bucket/prefix`
(`S3Blobs`, with the `cluster` extra) puts them in any S3-compatible store through obstore, with
credentials, region and endpoint from the standard `AWS_*` variables, so that every replica reads
every model and a lost pod volume loses nothing.

Code that reads blobs wants local files (the validator, the trainer child, the ONNX runtime): a
remote blob is fetched once into the data directory's `cache/` and used from there; blobs never
change once written (a file or a model is replaced by a new id, never rewritten), so the cached
copy never goes stale. The cached models are bounded in bytes, least recently used out
(`S3Blobs`).

A model is a directory of files published under `models/<job id>/`. It is visible only once
`MANIFEST.json` (every file's name and size) is written, last; the database record comes after
that. A crash mid-upload leaves files without a manifest, which nothing reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

MANIFEST = "MANIFEST.json"


class BlobMissing(Exception):
    """A blob (or a model's manifest) is not in the store."""


class StorageUnavailable(Exception):
    """The object store cannot be used; the message names the setting and the reason."""


@dataclass(frozen=True)
class BlobInfo:
    """One stored blob: its key, size and when it was last written (seconds since the epoch)."""

    key: str
    bytes: int
    modified: float


class Blobs(ABC):
    """The blob store: flat keys (`files/<id>.jsonl`, `models/<job id>/<file>`)."""

    url: str

    @abstractmethod
    def put_file(self, key: str, source: Path) -> None:
        """Store `source` (a finished local file, which this call consumes) under `key`."""

    @abstractmethod
    def local_file(self, key: str) -> Path:
        """A local path holding the blob `key` (raises `BlobMissing`)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one blob; a missing one is not an error."""

    @abstractmethod
    def publish_dir(self, prefix: str, source: Path) -> int:
        """Store every file of `source` under `prefix`, then its manifest: the model becomes
        visible at once, whole. Returns its size in bytes."""

    @abstractmethod
    def output_dir(self, prefix: str) -> Path:
        """The local directory a trainer writes the model for `prefix` into, before
        `publish_dir` (for a remote store, its cached copy once published)."""

    @abstractmethod
    def local_dir(self, prefix: str) -> Path:
        """A local directory holding the published directory `prefix` (raises `BlobMissing`)."""

    @abstractmethod
    def delete_dir(self, prefix: str) -> None:
        """Unpublish `prefix` (manifest first, so that nothing sees it half gone)."""

    @contextlib.contextmanager
    def pinned(self, prefix: str) -> Iterator[Path]:
        """`local_dir(prefix)`, kept on this machine's disk while the block reads it (a cache
        bound never removes it meanwhile)."""
        yield self.local_dir(prefix)

    @abstractmethod
    def entries(self, prefix: str) -> Iterator[BlobInfo]:
        """Every blob under `prefix` (`files/`, `models/`), in no particular order."""

    def check(self) -> None:  # noqa: B027 - only remote stores have anything to check
        """Fail at start, with the setting named, when the store cannot be reached."""


def manifest_for(source: Path) -> dict[str, Any]:
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = [{"name": p.relative_to(source).as_posix(), "bytes": p.stat().st_size}
               for p in files]
    return {"format": 1, "files": entries, "bytes": sum(e["bytes"] for e in entries)}


def dir_bytes(path: Path) -> int:
    manifest = path / MANIFEST
    if manifest.exists():
        return int(orjson.loads(manifest.read_bytes())["bytes"])
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class LocalBlobs(Blobs):
    """Blobs as plain files under the data directory (the layout of every factory so far)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)
        for sub in ("files", "models", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)

    def local_file(self, key: str) -> Path:
        return self._path(key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def publish_dir(self, prefix: str, source: Path) -> int:
        target = self._path(prefix)
        if source.resolve() != target.resolve():
            staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
            shutil.copytree(source, staging)
            staging.rename(target)
        manifest = manifest_for(target)
        partial = target / f".{MANIFEST}.{uuid.uuid4().hex}"
        partial.write_bytes(orjson.dumps(manifest))
        partial.rename(target / MANIFEST)
        return int(manifest["bytes"])

    def output_dir(self, prefix: str) -> Path:
        return self._path(prefix)

    def local_dir(self, prefix: str) -> Path:
        # Models of factories before the manifest have none: their directory is whole anyway
        # (the trainer renames it into place), so its existence is enough here.
        path = self._path(prefix)
        if not path.is_dir():
            raise BlobMissing(prefix)
        return path

    def delete_dir(self, prefix: str) -> None:
        path = self._path(prefix)
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def entries(self, prefix: str) -> Iterator[BlobInfo]:
        base = self._path(prefix)
        for path in base.rglob("*") if base.is_dir() else ():
            try:
                if path.is_file():
                    stat = path.stat()
                    yield BlobInfo(path.relative_to(self.root).as_posix(), stat.st_size,
                                   stat.st_mtime)
            except FileNotFoundError:  # removed meanwhile (a delete on this machine)
                continue


class S3Blobs(Blobs):
    """Blobs in an S3-compatible bucket (`s3://bucket/prefix`) through obstore, fetched on use
    into `cache_dir`.

    The cached models are bounded by `cache_bytes` (FACTORY_DISK_CACHE_BYTES): each use of a
    model (`local_dir`) stamps its manifest's modification time, and a fetch that takes the
    cache over the bound removes the least recently used models until it fits, never the one
    being used nor one `pinned` (being loaded or exported). Only published models (with their
    manifest) go: a model being trained into the cache has none yet, and an evicted one is
    fetched again on its next use. An eviction renames the directory away before removing it,
    so a reader sees a model whole or absent."""

    def __init__(self, url: str, cache_dir: Path, cache_bytes: int | None = None) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise StorageUnavailable(
                f"FACTORY_STORAGE_URL={url} needs the `cluster` extra: "
                "pip install 'classifier-gateway[cluster]'") from None
        self.url = url
        self.cache_dir = cache_dir
        self.cache_bytes = cache_bytes
        self._cache_lock = threading.Lock()
        self._pins: Counter[str] = Counter()
        (cache_dir / "tmp").mkdir(parents=True, exist_ok=True)
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageUnavailable(f"FACTORY_STORAGE_URL={url!r} names no bucket: "
                                     "use s3://bucket/prefix")
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        config: S3Config = {}
        if endpoint:
            # Path-style requests: what MinIO, Ceph and moto expect at a bare endpoint.
            config["endpoint"] = endpoint
            config["virtual_hosted_style_request"] = False
        if not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            config["region"] = "us-east-1"
        client: ClientConfig | None = (
            {"allow_http": True} if endpoint and endpoint.startswith("http://") else None)
        try:
            # obstore reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and
            # AWS_REGION itself; what is passed here only adds to them.
            self.store = S3Store(bucket, prefix=prefix.strip("/") or None, config=config,
                                 client_options=client)
        except Exception as exc:
            raise StorageUnavailable(f"FACTORY_STORAGE_URL={url}: {exc}") from None

    def check(self) -> None:
        import obstore

        try:
            obstore.list(self.store, "files/", chunk_size=1).collect()
        except Exception as exc:
            raise StorageUnavailable(
                f"the object store FACTORY_STORAGE_URL={self.url} cannot be used "
                f"(endpoint {os.environ.get('AWS_ENDPOINT_URL') or 'AWS'}): "
                f"{str(exc).splitlines()[0]}") from None

    def _fetch(self, key: str, target: Path) -> None:
        import obstore

        target.parent.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir / "tmp" / uuid.uuid4().hex
        try:
            result = obstore.get(self.store, key)
        except FileNotFoundError:
            raise BlobMissing(key) from None
        with partial.open("wb") as out:
            for chunk in result:
                out.write(chunk)
        partial.rename(target)

    def put_file(self, key: str, source: Path) -> None:
        import obstore

        obstore.put(self.store, key, source)
        # The uploader is likely to read it again (validation): keep it as the cached copy.
        target = self.cache_dir / key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)

    def local_file(self, key: str) -> Path:
        target = self.cache_dir / key
        if not target.exists():
            self._fetch(key, target)
        return target

    def delete(self, key: str) -> None:
        import obstore

        obstore.delete(self.store, key)
        (self.cache_dir / key).unlink(missing_ok=True)

    def publish_dir(self, prefix: str, source: Path) -> int:
        import obstore

        manifest = manifest_for(source)
        for entry in manifest["files"]:
            obstore.put(self.store, f"{prefix}/{entry['name']}", source / entry["name"])
        obstore.put(self.store, f"{prefix}/{MANIFEST}", orjson.dumps(manifest))
        if source.resolve() == self.output_dir(prefix).resolve():  # it is the cached copy now
            (source / MANIFEST).write_bytes(orjson.dumps(manifest))
        return int(manifest["bytes"])

    def output_dir(self, prefix: str) -> Path:
        return self.cache_dir / prefix

    def local_dir(self, prefix: str) -> Path:
        import obstore

        target = self.cache_dir / prefix
        if (target / MANIFEST).exists():
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: fetch it again
                os.utime(target / MANIFEST)  # its last use, for the cache's bound
                return target
        try:
            raw = bytes(obstore.get(self.store, f"{prefix}/{MANIFEST}").bytes())
        except FileNotFoundError:
            raise BlobMissing(prefix) from None
        manifest = orjson.loads(raw)
        staging = self.cache_dir / "tmp" / uuid.uuid4().hex
        try:
            for entry in manifest["files"]:
                self._fetch(f"{prefix}/{entry['name']}", staging / entry["name"])
                if (staging / entry["name"]).stat().st_size != entry["bytes"]:
                    raise BlobMissing(f"{prefix}/{entry['name']} (size differs from manifest)")
            (staging / MANIFEST).write_bytes(raw)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                staging.rename(target)
            except OSError:  # another thread fetched it first
                if not (target / MANIFEST).exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.bound_cache(keep=prefix)
        return target

    @contextlib.contextmanager
    def pinned(self, prefix: str) -> Iterator[Path]:
        with self._cache_lock:
            self._pins[prefix] += 1
        try:
            yield self.local_dir(prefix)
        finally:
            with self._cache_lock:
                self._pins[prefix] -= 1
                if self._pins[prefix] <= 0:
                    del self._pins[prefix]

    def cached_models(self) -> list[tuple[str, int, float]]:
        """The published models on this disk: (prefix, bytes, last use), least recent first."""
        out = []
        for manifest in (self.cache_dir / "models").glob(f"*/{MANIFEST}"):
            try:
                used = manifest.stat().st_mtime
                size = dir_bytes(manifest.parent)
            except (FileNotFoundError, ValueError, KeyError):
                continue  # evicted meanwhile, or a manifest being written
            out.append((f"models/{manifest.parent.name}", size, used))
        return sorted(out, key=lambda entry: entry[2])

    def bound_cache(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used models beyond `cache_bytes`; returns their
        prefixes."""
        if self.cache_bytes is None:
            return []
        evicted = []
        with self._cache_lock:
            models = self.cached_models()
            total = sum(size for _, size, _ in models)
            for prefix, size, _ in models:
                if total <= self.cache_bytes:
                    break
                if prefix == keep or self._pins.get(prefix):
                    continue
                away = self.cache_dir / "tmp" / f"evicted-{uuid.uuid4().hex}"
                try:
                    (self.cache_dir / prefix).rename(away)
                except FileNotFoundError:
                    continue
                shutil.rmtree(away, ignore_errors=True)
                total -= size
                evicted.append(prefix)
        return evicted

    def delete_dir(self, prefix: str) -> None:
        import obstore

        obstore.delete(self.store, f"{prefix}/{MANIFEST}")
        keys = [meta["path"] for batch in obstore.list(self.store, f"{prefix}/")
                for meta in batch]
        if keys:
            obstore.delete(self.store, keys)
        shutil.rmtree(self.cache_dir / prefix, ignore_errors=True)

    def entries(self, prefix: str) -> Iterator[BlobInfo]:
        import obstore

        for batch in obstore.list(self.store, prefix):
            for meta in batch:
                yield BlobInfo(str(meta["path"]), int(meta["size"]),
                               meta["last_modified"].timestamp())


def open_blobs(url: str | None, data_dir: Path, cache_bytes: int | None = None) -> Blobs:
    """The store `FACTORY_STORAGE_URL` names: unset (or a path), the data directory itself.
    `cache_bytes` bounds a remote store's copies on this disk (FACTORY_DISK_CACHE_BYTES)."""
    if not url:
        return LocalBlobs(data_dir)
    if url.startswith("s3://"):
        return S3Blobs(url, data_dir / "cache", cache_bytes)
    if url.startswith("file://") or "://" not in url:
        return LocalBlobs(Path(url.removeprefix("file://")).expanduser().resolve())
    raise StorageUnavailable(f"FACTORY_STORAGE_URL={url!r}: use s3://bucket/prefix, or leave it "
                             "unset for the data directory")
