"""`local-ngram` against the TF-IDF + logistic regression baseline, on every target of every real
corpus we have, with Mistral's example job and with the defaults.

The baseline is scikit-learn's `make_union(TfidfVectorizer(ngram_range=(1, 2),
sublinear_tf=True), TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))`
+ `LogisticRegression(C=10)`, fitted here on the same 80/20 split (seed 0). The model must reach
the baseline minus 0.005 macro-F1 on each. Measured on 2026-11-30 (2 cores), model / baseline,
identical for both configurations: BBC News 0.9758 / 0.9758; Rotten Tomatoes 0.8021 / 0.7996;
CrowdFlower tweets 0.7201 / 0.7194; election tweets 0.9666 / 0.9657; SMS spam 0.9811 / 0.9811;
Home Assistant intent 0.9277 / 0.9277 and domain 0.8494 / 0.8494. The features are the
baseline's and the solver converges to the same optimum, so the margin is for float noise, not
for a weaker model (the docstring of each corpus loader says what the corpus is).

Two targets (issue 23, section 4: a hidden two-target intent corpus was reported 0.016 and 0.018
below the baseline). Not reproduced on any two-target corpus we have, measured on 7 Dec 2026
(2 cores), model - baseline per target: Home Assistant's templates at 72 sentences per intent
(~2,700 each) in en, de, fr, es, it, nl (-0.0018 to +0.0000), at 60 in en, de, ru, zh-CN
(-0.0040 to +0.0261) and at 30 in fr, de, ru (-0.0003 to +0.0005); through a real factory job the same
(English: intent 0.9277 / 0.9277, domain 0.8494 / 0.8494, both jobs). The two targets share
only the featurizer (fitted on all texts, as each per-target baseline fits it on the same
texts); each has its own regression, C and stopping rule, so one target cannot hold the other
back. The vocabularies and each row's n-grams equal scikit-learn's in en, de, fr, ru, hi, th,
ar, ko, el and tr. Where the two differ, the baseline is the one off its optimum: its lbfgs
stops at tol 1e-4 of a scaled objective, short of the optimum (Russian domain: objective
259.7634 against 259.7003 at the optimum, macro-F1 0.8117 against 0.8378 for the optimum that
Newton-CG, and this model, reach), and such an early stop can land above the optimum as easily
as below it. `home_assistant_fr` adds French (accents, elisions; 41 intents and 18 domains at
20 per intent, 792 sentences, so it stays lean) to the English case: intent 0.7483 / 0.7483,
domain 0.6794 / 0.6723.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sklearn.metrics import f1_score

from service.factory.data import Example
from service.factory.models.base import Head, Hyperparameters
from service.factory.models.ngram import NGramModel, fit, iterations
from tests.support.baseline import baseline_f1
from tests.support.corpora import (
    election_tweets,
    home_assistant_two_targets,
    rotten_tomatoes,
    sentiment_tweets,
    sms_spam,
)
from tests.support.factory import MISTRAL_EXAMPLE as MISTRAL_JOB
from tests.support.factory import bbc_news, split

MARGIN = 0.005
MISTRAL_EXAMPLE = Hyperparameters.from_job(MISTRAL_JOB)  # tests/support/factory.py
DEFAULTS = Hyperparameters()

Rows = list[tuple[str, dict[str, str]]]


def _single(loader: Callable[[], list[tuple[str, str]]], target: str) -> Callable[[], Rows]:
    return lambda: [(text, {target: label}) for text, label in loader()]


def _two_targets(per_intent: int = 60, language: str = "en") -> Callable[[], Rows]:
    return lambda: [(text, {"intent": intent, "domain": domain}) for text, intent, domain
                    in home_assistant_two_targets(per_intent, language=language)]


CORPORA: dict[str, Callable[[], Rows]] = {
    "bbc_news": _single(bbc_news, "topic"),
    "rotten_tomatoes": _single(rotten_tomatoes, "sentiment"),
    "sentiment_tweets": _single(sentiment_tweets, "sentiment"),
    "election_tweets": _single(election_tweets, "author"),
    "sms_spam": _single(sms_spam, "spam"),
    "home_assistant": _two_targets(),
    "home_assistant_fr": _two_targets(20, "fr"),
}


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_local_ngram_never_below_the_baseline(corpus: str) -> None:
    train, test = split(CORPORA[corpus](), 0.2, seed=0)
    targets = sorted({name for _, labels in train for name in labels})
    heads = [Head(name, tuple(sorted({labels[name] for _, labels in train})), "single_class")
             for name in targets]
    examples = [Example(i, text, labels) for i, (text, labels) in enumerate(train)]
    texts = [text for text, _ in test]
    # `fit` reads two things from a job, its iteration budget and its L2 penalty, and is
    # deterministic: jobs that agree on both get the same model, so it is fitted once for them
    # (Mistral's example and the defaults agree today: this halves the file's fitting).
    fitted: dict[tuple[int, float], NGramModel] = {}
    models = {}
    for job, hyper in (("mistral_example", MISTRAL_EXAMPLE), ("defaults", DEFAULTS)):
        settings = (iterations(hyper), hyper.weight_decay)
        if settings not in fitted:
            fitted[settings] = fit(examples, heads, hyper)[0]
        models[job] = fitted[settings]
    predictions = {id(model): model.predict_proba(texts) for model in fitted.values()}
    for head_index, head in enumerate(heads):
        gold = [labels[head.name] for _, labels in test]
        reference = baseline_f1([(t, labels[head.name]) for t, labels in train],
                                [(t, g) for t, g in zip(texts, gold, strict=True)])
        for job, model in models.items():
            probs = predictions[id(model)][head_index]
            predicted = [head.labels[i] for i in probs.argmax(axis=1)]
            ours = float(f1_score(gold, predicted, average="macro"))
            print(f"{corpus}/{head.name} [{job}]: local-ngram {ours:.4f}, baseline {reference:.4f}")
            assert ours >= reference - MARGIN, (corpus, head.name, job, ours, reference)
