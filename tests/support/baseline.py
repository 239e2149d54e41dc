"""The baseline every model of the factory is measured against, in one place: scikit-learn's
word 1-2 + char_wb 2-5 TF-IDF (sublinear tf) and `LogisticRegression(C=10)`, fitted on the
training rows of a split and scored on its test rows (macro-F1)."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline, make_union

Rows = Sequence[tuple[str, str]]


def baseline_f1(train_rows: Rows, test_rows: Rows) -> float:
    """Macro-F1 of the TF-IDF + logistic regression baseline on `test_rows`."""
    model = make_pipeline(
        make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
                   TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
        LogisticRegression(C=10, max_iter=2000))
    model.fit([t for t, _ in train_rows], [y for _, y in train_rows])
    return float(f1_score([y for _, y in test_rows], model.predict([t for t, _ in test_rows]),
                          average="macro"))
