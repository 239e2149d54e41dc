"""Writes the demo datasets (`sentiment.jsonl`, `intent.jsonl`) next to this file.

Source: written for this project (Apache-2.0, like the rest of the repository) by combining the
hand-written phrases below; no third-party data. Run `python -m service.factory.demo.generate` to
regenerate; the output is deterministic (fixed seed), so the committed files match it.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent

THINGS = ["phone", "laptop", "headphones", "delivery", "coffee machine", "app", "hotel room",
          "pizza", "customer service", "jacket", "movie", "book", "update", "checkout", "camera"]

SENTIMENT: dict[str, list[str]] = {
    "positive": [
        "I love this {t}!", "The {t} is absolutely great.", "Fantastic {t}, would buy again.",
        "Really happy with the {t}.", "The {t} works perfectly, thank you!",
        "Best {t} I have ever had.", "Excellent {t}, highly recommended.",
        "Wow, the {t} exceeded my expectations.", "Five stars for the {t}.",
        "The {t} arrived early and it is wonderful.", "Great value, the {t} is superb.",
        "Such a pleasant surprise, I adore the {t}.", "Brilliant {t}, everything just works.",
        "The {t} made my day, so good.", "Amazing quality, the {t} feels premium.",
    ],
    "negative": [
        "I hate this {t}.", "The {t} is terrible.", "Awful {t}, never again.",
        "Really disappointed with the {t}.", "The {t} broke after two days.",
        "Worst {t} I have ever had.", "The {t} is a complete waste of money.",
        "Horrible experience with the {t}.", "One star, the {t} does not work.",
        "The {t} arrived damaged and late.", "I want a refund, the {t} is useless.",
        "Very poor quality, the {t} feels cheap.", "The {t} keeps failing, so frustrating.",
        "Do not buy the {t}, it is awful.", "The {t} was rude and unhelpful.",
    ],
    "neutral": [
        "The {t} arrived on Tuesday.", "I bought the {t} last week.", "The {t} is blue.",
        "Is the {t} available in other colours?", "The {t} comes in a cardboard box.",
        "I am using the {t} at work.", "The {t} has a manual in English.",
        "My sister also ordered the {t}.", "The {t} weighs about one kilogram.",
        "I picked up the {t} from the store.", "The {t} was delivered by courier.",
        "The {t} uses a standard charger.", "I have had the {t} for a month.",
        "The {t} is made in Portugal.", "What is the warranty on the {t}?",
    ],
}

INTENTS: dict[str, list[str]] = {
    "greeting": ["Hello!", "Hi there", "Good morning", "Hey, anyone here?", "Hi, how are you?",
                 "Good evening", "Hello, I have a quick question"],
    "order_status": ["Where is my order?", "My package has not arrived yet",
                     "Can you track my parcel?", "When will my order be delivered?",
                     "Order 12345 still says processing", "Has my order shipped?",
                     "The delivery is late, where is it?"],
    "refund": ["I want my money back", "How do I get a refund?", "Please refund my purchase",
               "Can I return this for a refund?", "I was charged twice, refund me",
               "The refund has not reached my card", "I would like to return the item"],
    "cancel_order": ["Cancel my order please", "I want to cancel my subscription",
                     "Can I still cancel the order I placed?", "Stop my order",
                     "Please cancel order 98765", "I changed my mind, cancel it",
                     "How do I cancel before it ships?"],
    "product_question": ["Does it come in black?", "Is this laptop good for gaming?",
                         "What size should I pick?", "Is the jacket waterproof?",
                         "How long does the battery last?", "Does the phone support 5G?",
                         "Is this compatible with my printer?"],
    "goodbye": ["Thanks, bye!", "That is all, goodbye", "Thank you for your help",
                "See you later", "Great, thanks a lot", "Bye for now", "Cheers, have a nice day"],
}

ASSISTANT = ["Hello! How can I help you today?", "Sure, let me look into that.",
             "Thanks for reaching out.", "Of course, one moment please."]


def sentiment_rows(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for label, templates in SENTIMENT.items():
        for template in templates:
            for thing in rng.sample(THINGS, 8):
                rows.append({"text": template.format(t=thing), "labels": {"sentiment": label}})
    rng.shuffle(rows)
    return rows


def intent_rows(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for label, phrases in INTENTS.items():
        for phrase in phrases:
            for variant in range(8):
                messages = [{"role": "user", "content": phrase}]
                if variant % 2:  # half of them mid-conversation
                    messages = [{"role": "user", "content": rng.choice(INTENTS["greeting"])},
                                {"role": "assistant", "content": rng.choice(ASSISTANT)},
                                *messages]
                if variant >= 4:
                    messages[-1] = {"role": "user",
                                    "content": rng.choice(["", "Hi, ", "Excuse me, ", "Um, "])
                                    + phrase[0].lower() + phrase[1:]}
                rows.append({"messages": messages, "labels": {"intent": label}})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rng = random.Random(20261123)
    for name, rows in (("sentiment", sentiment_rows(rng)), ("intent", intent_rows(rng))):
        (HERE / f"{name}.jsonl").write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")


if __name__ == "__main__":
    main()
