"""search_words: the catalog's words (product names and brands) with how many active products
carry each, kept by statement triggers on products, for correcting typos in search queries

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 10:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The words of a set of product rows (one per product and word): lower-cased runs of letters
# and digits of name and brand, two characters or more, of active products only.
_WORDS = """
SELECT DISTINCT r.id, w.word FROM {rows} AS r
CROSS JOIN LATERAL regexp_split_to_table(lower(r.name || ' ' || coalesce(r.brand, '')), '[^[:alnum:]]+')
    AS w(word)
WHERE r.is_active AND length(w.word) >= 2
"""

# Add each word's net change; rows are written in word order so that concurrent catalog
# writes lock the dictionary's rows in one order (no deadlock).
_APPLY = """
INSERT INTO search_words AS s (word, products)
SELECT word, sum(delta) FROM ({deltas}) AS d(word, delta)
GROUP BY word HAVING sum(delta) <> 0 ORDER BY word
ON CONFLICT (word) DO UPDATE SET products = s.products + EXCLUDED.products
"""


def _apply(*parts: tuple[str, int]) -> str:
    deltas = " UNION ALL ".join(
        f"SELECT x.word, {sign} FROM ({_WORDS.format(rows=rows)}) AS x" for rows, sign in parts
    )
    return _APPLY.format(deltas=deltas)


def upgrade() -> None:
    # No CHECK (products >= 0): PostgreSQL checks it on the row an upsert proposes, before the
    # conflict turns it into an update, so a word's decrement would fail. A word only ever
    # loses products that added it, so the count cannot go below zero anyway.
    op.execute("CREATE TABLE search_words (word text PRIMARY KEY, products integer NOT NULL DEFAULT 0)")
    # Nearest words by trigram distance (`<->`), first letter kept: see models/search.py.
    op.execute("CREATE INDEX ix_search_words_trgm ON search_words USING gist (word gist_trgm_ops)")
    op.execute(f"""
CREATE FUNCTION search_words_sync() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        {_apply(("new_rows", 1))};
    ELSIF TG_OP = 'DELETE' THEN
        {_apply(("old_rows", -1))};
    ELSE
        {_apply(("new_rows", 1), ("old_rows", -1))};
    END IF;
    RETURN NULL;
END
$$
""")
    op.execute(
        "CREATE TRIGGER search_words_insert AFTER INSERT ON products REFERENCING NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION search_words_sync()"
    )
    op.execute(
        "CREATE TRIGGER search_words_update AFTER UPDATE ON products"
        " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION search_words_sync()"
    )
    op.execute(
        "CREATE TRIGGER search_words_delete AFTER DELETE ON products REFERENCING OLD TABLE AS old_rows"
        " FOR EACH STATEMENT EXECUTE FUNCTION search_words_sync()"
    )
    op.execute(_apply(("products", 1)))


def downgrade() -> None:
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER search_words_{event} ON products")
    op.execute("DROP FUNCTION search_words_sync()")
    op.execute("DROP TABLE search_words")
