"""Orphaned blobs swept: what a crash left in the object store that no record names.

Blobs are written before the record that makes them visible (an upload's file, then its row; a
model's files and manifest, then its row), and deleted after the record that named them: so a
crash between the two, or a store that failed mid-delete, leaves blobs nobody reads, never a
record without its blobs. `sweep` removes them.

A blob is an orphan when the database names it nowhere (`Store.referenced_blobs`: live files,
live models, and the models of jobs still at work) **and** it was last written more than
`min_age_s` ago. The age is what makes the sweep safe beside other replicas: a replica uploading
a file, or publishing a model, holds blobs its row does not name yet for the seconds between
the two writes; an hour (`FACTORY_GC_MIN_AGE_S`, 3600 s) is far beyond any of those windows
(an upload of Mistral's largest file, 512 MB, or a model's publication, take seconds to
minutes), so a sweep never races one. The database is read before the store is listed, so a
record created after that read names blobs that are young anyway.

Units: a file is `files/<id>.jsonl`; a model is everything under `models/<job id>/` (its age is
its newest blob's); anything else under `models/` (a local store's staging directory
`models/.<job id>.<hex>` left by a crash) is its own unit, named by its first two segments.
This machine's scratch directory (`<data dir>/tmp`, half-received uploads) is swept by the same
rule.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from service.factory.blobs import BlobInfo
from service.factory.schemas import ACTIVE_STATUSES
from service.factory.store import Store

log = logging.getLogger("service.factory.gc")

#: Blobs younger than this are never swept: see the module's docstring.
DEFAULT_MIN_AGE_S = 3600


@dataclass
class SweepReport:
    removed: list[str] = field(default_factory=list)
    bytes_removed: int = 0
    #: Unreferenced, but too young to be sure of (another replica may be writing them).
    young: list[str] = field(default_factory=list)
    kept: int = 0

    def lines(self) -> list[str]:
        out = [f"removed {key}" for key in self.removed]
        out.append(f"{len(self.removed)} orphan(s) removed ({self.bytes_removed} bytes), "
                   f"{len(self.young)} unreferenced but younger than the minimum age kept, "
                   f"{self.kept} referenced kept")
        return out


def _unit(key: str) -> str:
    """The unit a blob belongs to: the file itself, or its model directory."""
    parts = key.split("/")
    return "/".join(parts[:2]) if parts[0] == "models" and len(parts) > 2 else key


def sweep(store: Store, *, min_age_s: float = DEFAULT_MIN_AGE_S, now: float | None = None,
          dry_run: bool = False) -> SweepReport:
    """Remove (or, `dry_run`, only list) the orphans of `store`'s blob store."""
    referenced = store.referenced_blobs(ACTIVE_STATUSES)
    units: dict[str, list[BlobInfo]] = {}
    for prefix in ("files/", "models/"):
        for blob in store.blobs.entries(prefix):
            units.setdefault(_unit(blob.key), []).append(blob)
    cutoff = (time.time() if now is None else now) - min_age_s
    report = SweepReport()
    for unit, blobs in sorted(units.items()):
        if unit in referenced:
            report.kept += 1
            continue
        if max(b.modified for b in blobs) > cutoff:
            report.young.append(unit)
            continue
        if not dry_run:
            if any(b.key != unit for b in blobs):  # a directory of blobs
                store.blobs.delete_dir(unit)
            else:
                store.blobs.delete(unit)
            log.info("removed the orphaned blob %s (%d bytes)", unit, sum(b.bytes for b in blobs))
        report.removed.append(unit)
        report.bytes_removed += sum(b.bytes for b in blobs)
    _sweep_scratch(store, cutoff, dry_run, report)
    return report


def _sweep_scratch(store: Store, cutoff: float, dry_run: bool, report: SweepReport) -> None:
    """This machine's scratch directory (`<data dir>/tmp`): uploads being received land there
    before they are stored, and a crash leaves them; same age rule."""
    for path in sorted(store.tmp_dir().glob("*")):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if not path.is_file():
            continue
        if stat.st_mtime > cutoff:
            report.young.append(f"tmp/{path.name}")
            continue
        if not dry_run:
            path.unlink(missing_ok=True)
        report.removed.append(f"tmp/{path.name}")
        report.bytes_removed += stat.st_size
