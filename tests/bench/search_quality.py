"""Benchmark (not a test): how well `GET /search` forgives what shoppers mistype, on the seeded
catalog through Serve. From the catalog's words of 5 letters and more (a fixed seed), one
query per word as written and one per kind of single edit (a letter dropped, added, replaced,
two swapped; never the first letter), two edits for words of 9 letters and more, and adjacent
word pairs of product names joined into one ("lunchbox"). A query is a hit when a top-10
result's name contains the original word (for joined pairs: both words).

    python -m tests.bench.search_quality [--words 300]    (SHOW_MISSES=1 prints each miss)

Goal (issue 12): recall@10 >= 0.95 on single-edit typos of words of 5+ letters.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import string
from collections import defaultdict

from tests.bench.common import bench_arguments, bench_environment

SEED = 20261128
GOAL = 0.95


def _other(rng: random.Random, letter: str) -> str:
    return rng.choice([c for c in string.ascii_lowercase if c != letter])


def _single_edits(rng: random.Random, word: str) -> dict[str, str]:
    i = rng.randrange(1, len(word) - 1)  # never the first letter; a swap needs a next one
    return {
        "dropped": word[:i] + word[i + 1 :],
        "added": word[:i] + _other(rng, word[i]) + word[i:],
        "replaced": word[:i] + _other(rng, word[i]) + word[i + 1 :],
        "swapped": word[:i] + word[i + 1] + word[i] + word[i + 2 :],
    }


def _queries(
    rng: random.Random, words: list[str], pairs: list[tuple[str, str]]
) -> list[tuple[str, str, str]]:
    """(kind, query, what a hit's name must contain)."""
    out: list[tuple[str, str, str]] = []
    for word in words:
        out.append(("exact", word, word))
        for kind, typo in _single_edits(rng, word).items():
            if typo != word:
                out.append((kind, typo, word))
        if len(word) >= 9:
            twice = _single_edits(rng, word)["replaced"]
            out.append(("two edits (9+ letters)", _single_edits(rng, twice)["dropped"], word))
    out += [("joined pair", a + b, f"{a} {b}") for a, b in pairs]
    return out


def main() -> None:
    args = bench_arguments(__doc__, seconds=0, concurrency=1, words=300)
    bench_environment()
    import httpx
    from sqlalchemy import text

    from deployments.launcher import backend
    from models.db import make_engine

    with backend(reset=True) as settings:
        base = f"http://{settings.http_host}:{settings.http_port}"

        async def catalog() -> tuple[list[str], list[str]]:
            engine = make_engine(settings.database_url or "", pool_size=1, max_overflow=0)
            try:
                async with engine.connect() as conn:
                    words = (
                        await conn.execute(
                            text(
                                "SELECT word FROM search_words WHERE products > 0 AND length(word) >= 5"
                                " AND word ~ '^[a-z]+$' ORDER BY word"
                            )
                        )
                    ).scalars()
                    names = (
                        await conn.execute(
                            text("SELECT lower(name) FROM products WHERE is_active ORDER BY sku")
                        )
                    ).scalars()
                    return list(words), list(names)
            finally:
                await engine.dispose()

        words, names = asyncio.run(catalog())
        in_names = {w for name in names for w in re.findall("[a-z]+", name)}
        words = [w for w in words if w in in_names]  # not brand-only words: hits look at names
        rng = random.Random(SEED)
        sample = rng.sample(words, min(args.words, len(words)))
        pairs = sorted(
            {
                (a, b)
                for name in names
                for a, b in zip(name.split(), name.split()[1:], strict=False)
                if re.fullmatch("[a-z]{3,}", a) and re.fullmatch("[a-z]{3,}", b)
            }
        )
        queries = _queries(rng, sample, rng.sample(pairs, min(100, len(pairs))))

        hits: dict[str, list[bool]] = defaultdict(list)
        corrected: dict[str, int] = defaultdict(int)
        with httpx.Client(base_url=base, timeout=30, headers={"X-Forwarded-For": "10.9.8.7"}) as client:
            for kind, query, wanted in queries:
                response = client.get("/search", params={"q": query, "limit": 10})
                response.raise_for_status()
                body = response.json()
                hits[kind].append(any(wanted in item["name"].lower() for item in body["items"]))
                if not hits[kind][-1] and os.environ.get("SHOW_MISSES"):
                    print(
                        "miss",
                        kind,
                        query,
                        wanted,
                        body["corrected_q"],
                        [i["name"] for i in body["items"]][:3],
                    )
                corrected[kind] += body["corrected_q"] is not None

    print(f"\n{len(sample)} catalog words of 5+ letters (seed {SEED}); hit = a top-10 name contains the word")
    print(f"{'queries':26} {'n':>5} {'recall@10':>10} {'corrected':>10}")
    for kind, found in hits.items():
        print(f"{kind:26} {len(found):5d} {sum(found) / len(found):10.3f} {corrected[kind]:10d}")
    single = [h for kind in ("dropped", "added", "replaced", "swapped") for h in hits[kind]]
    recall = sum(single) / len(single)
    print(f"\nsingle-edit typos of 5+ letters: recall@10 {recall:.3f} (goal >= {GOAL})")
    print(
        f"search_quality single_edit_recall10={recall:.3f} exact_recall10={sum(hits['exact']) / len(hits['exact']):.3f}"
    )


if __name__ == "__main__":
    main()
