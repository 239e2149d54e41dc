"""Export lines as Parquet, through pyarrow (the `export` extra), for `predictions export`.

Why it looks like this:
- pyarrow is optional (about 40 MB installed): the command line, the gateway and the factory run
  without it, so it is imported only when Parquet is asked for, and its absence is a `UserError`
  that names the extra to install, before anything is fetched from the gateway.
- The columns are the JSONL lines' own fields with explicit types, not pyarrow's inference: the
  dicts keyed by data (a line's `labels` per target, `scores` per target and label) are Parquet
  maps, since a struct would make one column per target or label ever seen and fill every other
  row with nulls. A field a line does not have is null in its row (`text` on a line that keeps only
  `input_sha256`), so reading a file back and dropping the nulls gives the JSONL lines again
  (`tests/integration/test_predictions.py` checks it).
- `messages` (chat tasks) is kept as its JSON text: a message's `content` may be a string or a
  list of parts (Mistral's chat input), which no single Parquet type holds; `json.loads` of it is
  the JSONL line's `messages`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.commands.errors import UserError

#: The extra that brings pyarrow (pyproject.toml).
EXTRA = "export"


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("--format parquet needs pyarrow: install the export extra, "
                        f"pip install 'classifier-gateway[{EXTRA}]' (or use --format "
                        "jsonl)") from None
    return pyarrow, pyarrow.parquet


def require() -> None:
    """Fail now, with what to install, when pyarrow is missing."""
    _pyarrow()


def _schema(pa: Any) -> Any:
    return pa.schema([
        ("text", pa.string()),
        ("messages", pa.string()),  # JSON (see the module docstring)
        ("input_sha256", pa.string()),
        ("labels", pa.map_(pa.string(), pa.string())),
        ("scores", pa.map_(pa.string(), pa.map_(pa.string(), pa.float64()))),
        ("model", pa.string()),
        ("margin", pa.float64()),
        ("response_id", pa.string()),
        ("index", pa.int64()),
        ("time", pa.float64()),
        ("cache", pa.string()),
    ])


def _maps(value: Any) -> Any:
    """A dict as pyarrow takes a map (a list of pairs), nested maps too; None stays None."""
    if isinstance(value, dict):
        return [(key, _maps(inner)) for key, inner in value.items()]
    return value


def _cell(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "messages":
        return json.dumps(value, ensure_ascii=False)
    return _maps(value) if name in ("labels", "scores") else value


def write_parquet(path: Path, lines: list[dict[str, Any]]) -> None:
    """`lines` (prediction log export lines) as one Parquet file at `path`."""
    pa, pq = _pyarrow()
    schema = _schema(pa)
    unknown = {key for line in lines for key in line} - set(schema.names)
    if unknown:  # a new field in the log must get its column here, not vanish silently
        raise UserError(f"cannot write {', '.join(sorted(unknown))} as Parquet: no column for "
                        "it; use --format jsonl")
    columns = {name: [_cell(name, line.get(name)) for line in lines] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    try:
        pq.write_table(table, str(path))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
