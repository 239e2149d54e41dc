"""Secrets out of every text that came from elsewhere: one rule, applied before any cut.

A foreign text (an upstream's error body, a proxy's echo of our request, a transport's exception, a
URL) is quoted in 502/503 bodies, in logs and in `/tasks`. Two rules make that safe:

- **scrub, then cut.** Cutting first (to keep a message short) can split a key at the cut, and the
  part before the cut no longer matches the key, so it survives a replace; `quote` scrubs a prefix
  long enough to hold any key that starts before the cut, and only then cuts.
- **pieces, not only whole keys.** A proxy may echo a truncated header, or the key may cross a cut
  made by someone else (a proxy that shortens bodies). Any run of `MIN_PIECE` (8) or more
  characters that also occurs in a secret is masked: 8 characters of a random key are 40+ bits of
  it, and no key this gateway handles (Mistral's are 32 characters) is shorter than 8, while
  ordinary words in error messages rarely share 8 characters in a row with a random key.

Not on the hot path: only error messages and configuration are scrubbed.
"""

from __future__ import annotations

from collections.abc import Iterable

MIN_PIECE = 8
MASK = "***"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of a secret, and every run of >= MIN_PIECE characters that is
    a piece of a secret, replaced by `***`. Secrets shorter than MIN_PIECE are masked whole."""
    return _mask(text, _spans(text, secrets))


def quote(raw: bytes | str, secrets: Iterable[str], limit: int) -> str:
    """At most `limit` characters of a foreign text, scrubbed *before* the cut (see above).

    Only a prefix is decoded and searched (an error body can be megabytes): `limit` plus the longest
    secret, which holds every occurrence that starts before the cut. The cut is made at `limit` in
    the original text, so a masked key never pulls text from beyond the cut into the quote."""
    secrets = [secret for secret in secrets if secret]
    window = limit + max((len(secret) for secret in secrets), default=0)
    # 4 bytes per character at most in UTF-8: enough bytes for `window` characters.
    text = raw[:window * 4].decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text[:window].strip()
    spans = [(start, min(end, limit)) for start, end in _spans(text, secrets) if start < limit]
    return _mask(text[:limit], spans)[:limit]


def _spans(text: str, secrets: Iterable[str]) -> list[tuple[int, int]]:
    """Sorted, merged (start, end) ranges of `text` that must be masked."""
    spans: list[tuple[int, int]] = []
    for secret in secrets:
        if not secret:
            continue
        if len(secret) < MIN_PIECE:
            start = text.find(secret)
            while start != -1:
                spans.append((start, start + len(secret)))
                start = text.find(secret, start + 1)
            continue
        pieces = {secret[i:i + MIN_PIECE] for i in range(len(secret) - MIN_PIECE + 1)}
        spans.extend((i, i + MIN_PIECE) for i in range(len(text) - MIN_PIECE + 1)
                     if text[i:i + MIN_PIECE] in pieces)
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:  # overlapping or touching windows: one masked run
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    if not spans:
        return text
    out: list[str] = []
    done = 0
    for start, end in spans:
        out += [text[done:start], MASK]
        done = end
    out.append(text[done:])
    return "".join(out)
