"""The compact listing / lazy plan give exactly what the per-object versions gave (same bytes, order, hashes)."""
from __future__ import annotations

import hashlib
import json
import pickle
import random

from data_prep.inputs import FileTable, LabelledItems
from data_prep.plan import TAR_OVERHEAD, plan_shards, sample_key
from data_prep.sources import FileEntry

ODD = ["a", "B", "_", "-", ".", "é", "日", "\udc80", "\udcff", "\ud800", "😀", "0", "9", ":"]


def _random_entries(rng: random.Random, n: int) -> list[FileEntry]:
    out = []
    for _ in range(n):
        parts = tuple("".join(rng.choice(ODD) for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(0, 4)))
        display = "/src/" + "/".join(parts) if rng.random() < 0.5 else f"/src/a.tar:{'/'.join(parts)}"
        if out and rng.random() < 0.1:
            display = rng.choice(out).display  # duplicate names (possible in tars): ties must stay stable
        path = display if rng.random() < 0.5 else rng.choice(["/src/a.tar", "/src/b.tar"])
        out.append(FileEntry(parts, display, (path, rng.choice([-1, rng.randrange(0, 1 << 40)]), rng.randrange(0, 20_000))))
    return out


def test_file_table_round_trips_every_field():
    rng = random.Random(0)
    entries = _random_entries(rng, 400)
    table = FileTable()
    for e in entries:
        table.append(e)
    assert len(table) == len(entries)
    for got, want in zip(table, entries):
        assert (got.parts, got.display, got.ref) == (want.parts, want.display, want.ref)
    assert table[-1].display == entries[-1].display


def test_sorted_by_display_matches_python_sort_including_fallbacks():
    rng = random.Random(1)
    for trial in range(60):
        entries = _random_entries(rng, rng.randrange(0, 80))
        if trial == 3:
            entries.append(FileEntry(("x",), "/" + "x" * 5000, ("/t", -1, 1)))  # padding too costly: Python sort
        if trial == 4:
            entries.append(FileEntry(("x",), "a\0b", ("/t", -1, 1)))  # NUL: numpy would pad-compare wrongly
        table = FileTable()
        for e in entries:
            table.append(e)
        rows = list(range(len(entries)))
        rng.shuffle(rows)
        rows = rows[:rng.randrange(0, len(rows) + 1)]
        assert list(table.sorted_by_display(rows)) == sorted(rows, key=lambda r: entries[r].display)


def _old_plan(split, items, seed, shard_bytes, samples_per_shard, options):
    """plan_shards as it was before the compact plan (per-item tuples), kept as the reference."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    shards, cur, cur_bytes = [], [], 0
    for i in order:
        disp, ref, label = items[i]
        cur.append((i, disp, ref, label))
        cur_bytes += max(ref[2], 0) + TAR_OVERHEAD
        full = (len(cur) >= samples_per_shard) if samples_per_shard else (cur_bytes >= (shard_bytes or 0))
        if full:
            shards.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        shards.append(cur)
    opt_text = json.dumps(options, sort_keys=True)
    out = []
    for entries in shards:
        h = hashlib.sha256(opt_text.encode())
        for i, disp, ref, label in entries:
            h.update(f"\n{sample_key(split, i)}\t{disp}\t{ref[2]}\t{label}".encode("utf-8", "surrogateescape"))
        out.append((entries, h.hexdigest()))
    return out


def test_lazy_plan_equals_old_plan_and_pickles_only_its_shard():
    rng = random.Random(2)
    entries = [e for e in _random_entries(rng, 300) if "\ud800" not in e.display]  # not encodable for the hash
    table = FileTable()
    for e in entries:
        table.append(e)
    rows = table.sorted_by_display(range(len(entries)))
    labels = [rng.randrange(0, 5) for _ in rows]
    compact = LabelledItems(table, rows, labels)
    as_list = [(entries[r].display, entries[r].ref, lab) for r, lab in zip(rows, labels)]
    assert list(compact) == as_list
    for seed, shard_bytes, per_shard in ((0, None, 7), (3, 5 << 30, None), (9, 1, None), (5, 40_000, None)):
        opts = {"seed": seed, "shard_bytes": shard_bytes, "samples_per_shard": per_shard}
        ref = _old_plan("train", as_list, seed, shard_bytes, per_shard, opts)
        for items in (compact, as_list):
            jobs = plan_shards("train", items, seed, shard_bytes, per_shard, opts)
            assert [(j.entries, j.plan_hash) for j in jobs] == ref
            assert [len(j) for j in jobs] == [len(e) for e, _ in ref]
    jobs = plan_shards("train", compact, 0, None, 50, {})
    back = pickle.loads(pickle.dumps(jobs[0]))
    assert (back.number, back.plan_hash, back.entries) == (jobs[0].number, jobs[0].plan_hash, jobs[0].entries)
    assert len(pickle.dumps(jobs[0])) < len(pickle.dumps([j.entries for j in jobs])) / 3
