"""The index keeps the blobs' bytes by kind as rows come and go (store/index.py TOTALS), so the
size check of every build reads a few rows instead of every blob. The totals must equal a count
of the rows whatever wrote them: stored again, forgotten, another process, an index from before
the totals."""

from __future__ import annotations

import random
import sqlite3

from mergebuild.store.index import TOTALS_NAMES, Index


def counted(path) -> dict[str, int]:
    """The reference: every row summed, straight from the database."""
    db = sqlite3.connect(path)
    try:
        return {k: v for k, v in db.execute("SELECT kind, SUM(disk) FROM blobs GROUP BY kind")}
    finally:
        db.close()


def totals(index: Index) -> dict[str, int]:
    return {k: v for k, v in index.blob_bytes().items() if v}


def test_the_totals_follow_every_change_of_the_blobs(tmp_path):
    path = tmp_path / "index.sqlite"
    index, other = Index(path), Index(path)  # two processes' connections to one cache
    rng = random.Random(7)
    stored: list[str] = []
    try:
        for round_ in range(30):
            rows = [(f"{round_}-{i}", rng.randrange(1, 10**9), rng.choice(["merge", "import", "replaced"]))
                    for i in range(rng.randrange(1, 40))]
            again = [(d, 12345, "merge") for d in rng.sample(stored, min(len(stored), 5))]  # stored before
            rng.choice([index, other]).save_blobs(rows + again, round_)
            stored += [d for d, _, _ in rows]
            gone = rng.sample(stored, min(len(stored), rng.randrange(0, 10)))
            rng.choice([index, other]).forget_blobs(gone + ["never-stored"])
            stored = [d for d in stored if d not in gone]
            assert totals(index) == totals(other) == counted(path)
    finally:
        index.close()
        other.close()


def test_an_index_from_before_the_totals_gets_them_filled(tmp_path):
    path = tmp_path / "index.sqlite"
    index = Index(path)
    index.save_blobs([("a", 100, "merge"), ("b", 50, "import"), ("c", 7, "merge")], 1)
    index.close()
    db = sqlite3.connect(path)  # as an older mergebuild left it: no totals, no triggers
    for name in TOTALS_NAMES[1:]:
        db.execute(f"DROP TRIGGER {name}")
    db.execute("DROP TABLE blob_totals")
    db.execute("INSERT INTO blobs VALUES('d', 1000, 'merge', 2)")  # written without them
    db.commit()
    db.close()
    readonly = Index(path, readonly=True)
    try:
        assert totals(readonly) == counted(path) == {"merge": 1107, "import": 50}  # counted, not stored
    finally:
        readonly.close()
    index = Index(path)
    try:
        assert totals(index) == counted(path)
        index.forget_blobs(["a"])
        assert totals(index) == counted(path) == {"merge": 1007, "import": 50}
    finally:
        index.close()
