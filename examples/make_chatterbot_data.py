"""Write the quickstart data from the chatterbot-corpus package (English YAML dialogues, offline).

    pip install chatterbot-corpus==1.3.3 pyyaml
    python examples/make_chatterbot_data.py            # rewrites examples/data/*.jsonl

chatterbot_{train,valid}.jsonl (format = "chat"): every conversation of every English topic file,
its lines alternating user / assistant as the corpus lists them (a trailing user line with no
reply is left off; one-line conversations are skipped). Exact duplicate conversations are written
once (tech_support.yml repeats its 10 dialogues about 100 times each), so that no conversation is
in both files. Split about 90/10 by conversation with a fixed seed.

topics_{train,valid}.jsonl (format = "classification"): the user lines of each topic with at
least 20 distinct ones, labelled with the topic's file name (e.g. "trivia"); a line found under
two topics is left out as ambiguous; at most 80 lines per topic (seeded sample) so no topic
swamps the rest. Split about 90/10 within each topic, so every topic is in both files.

The output is deterministic: same corpus version, same files.
"""

from __future__ import annotations

import collections
import json
import os
import random

import yaml

SEED = 0
VALID_SHARE = 0.1
MIN_TOPIC_LINES = 20
MAX_TOPIC_LINES = 80
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def corpus_dir() -> str:
    import chatterbot_corpus  # the data package; imported only to find its files

    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")


def load_topics(directory: str) -> dict[str, list[list[str]]]:
    """topic (file name without .yml) -> conversations (lists of lines)."""
    topics = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".yml"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                doc = yaml.safe_load(f)
            topics[name[:-4]] = [[str(line).strip() for line in c] for c in doc.get("conversations", [])]
    return topics


def to_messages(lines: list[str]) -> list[dict]:
    lines = lines[: len(lines) // 2 * 2]  # a user line with no reply teaches nothing
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": line} for i, line in enumerate(lines)]


def chat_rows(topics: dict[str, list[list[str]]]) -> list[dict]:
    seen, rows = set(), []
    for conversations in topics.values():
        for lines in conversations:
            messages = to_messages(lines)
            key = json.dumps(messages)
            if messages and key not in seen:
                seen.add(key)
                rows.append({"messages": messages})
    return rows


def topic_rows(topics: dict[str, list[list[str]]], rng: random.Random) -> dict[str, list[str]]:
    lines_by_topic = {
        t: sorted({c[i] for c in convs for i in range(0, len(c), 2) if c[i]}) for t, convs in topics.items()
    }
    where = collections.Counter(line for lines in lines_by_topic.values() for line in lines)
    out = {}
    for topic, lines in lines_by_topic.items():
        lines = [line for line in lines if where[line] == 1]
        if len(lines) >= MIN_TOPIC_LINES:
            out[topic] = sorted(rng.sample(lines, min(len(lines), MAX_TOPIC_LINES)))
    return out


def split(items: list, rng: random.Random) -> tuple[list, list]:
    order = list(range(len(items)))
    rng.shuffle(order)
    n_valid = max(1, round(VALID_SHARE * len(items)))
    valid = set(order[:n_valid])
    return ([x for i, x in enumerate(items) if i not in valid], [x for i, x in enumerate(items) if i in valid])


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):5d} rows to {os.path.relpath(path)}")


def main() -> None:
    topics = load_topics(corpus_dir())
    rng = random.Random(SEED)
    train, valid = split(chat_rows(topics), rng)
    os.makedirs(OUT, exist_ok=True)
    write_jsonl(os.path.join(OUT, "chatterbot_train.jsonl"), train)
    write_jsonl(os.path.join(OUT, "chatterbot_valid.jsonl"), valid)

    topic_train, topic_valid = [], []
    for topic, lines in topic_rows(topics, rng).items():
        tr, va = split(lines, rng)
        topic_train += [{"text": line, "label": topic} for line in tr]
        topic_valid += [{"text": line, "label": topic} for line in va]
    rng.shuffle(topic_train)
    rng.shuffle(topic_valid)
    write_jsonl(os.path.join(OUT, "topics_train.jsonl"), topic_train)
    write_jsonl(os.path.join(OUT, "topics_valid.jsonl"), topic_valid)


if __name__ == "__main__":
    main()
