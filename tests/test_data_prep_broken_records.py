"""data_prep's records broken on disk (a hand edit, a crash of another tool, a half-copied OUT): a split's plan,
manifest.json, the shards' indexes, rejects.jsonl. Each is one line naming the file and the field, and what
to do; none is a traceback, none a wrong value used as is. (Done-records: tests/test_data_prep_resume.py.)"""
import json
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.format import plan_path
from data_prep.output_status import describe
from data_prep.plan_record import FIELDS as PLAN_FIELDS
from tests.fixtures_images import write_imagefolder
from tests.test_data_prep_resume import outputs


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_imagefolder(root, ["a", "b", "c", "d"], per_class=10)
    return root


COMMON = ["--split", "train", "--samples-per-shard", "8", "--workers", "1", "--no-progress"]


def _broken_plans(good: dict) -> list[tuple[str, str]]:
    """(what the error says, the plan's text) for the ways a hand edit or a cut breaks a plan: not JSON, not an
    object, each field the readers take missing or of another type, a shard or a reject of the wrong shape."""
    text = json.dumps(good, indent=1)
    wrong = {"a string": 7, "a count (an integer >= 0)": "40", "a list": {}, "an object": [],
             "a list of strings": [7]}
    cases = [("is not valid JSON", ""), ("is not valid JSON", text[:len(text) // 2]),
             ("is not a JSON object", json.dumps([good]))]
    for key, kind in PLAN_FIELDS.items():
        if key != "split_source":  # plans of before it was kept have none
            cases.append((f"has no field {key!r}", json.dumps({k: v for k, v in good.items() if k != key})))
        cases.append((f"field {key!r} is {json.dumps(wrong[kind])}, not {kind}", json.dumps({**good, key: wrong[kind]})))
    shards = good["shards"]
    return cases + [
        ("field 'inputs' is -1, not a count", json.dumps({**good, "inputs": -1})),
        ("field 'shards' item 1 is \"x\", not an object", json.dumps({**good, "shards": [shards[0], "x"]})),
        ("has no field 'shards[1].plan_hash'",
         json.dumps({**good, "shards": [shards[0], {"name": shards[1]["name"]}, *shards[2:]]})),
        ("field 'shards[1].name' is \"train-000000.tar\", not 'train-000001.tar'",
         json.dumps({**good, "shards": [shards[0], shards[0], *shards[2:]]})),
        ("field 'scan_rejects' item 0 is [\"a/x.txt\"], not a [path, reason] pair",
         json.dumps({**good, "scan_rejects": [["a/x.txt"]]})),
        ("field 'options.holdout' is \"x\", not an object",
         json.dumps({**good, "options": {**good["options"], "holdout": "x"}})),
    ]


def test_a_broken_plan_stops_finalize_in_one_line_and_a_rerun_writes_it_again(tree, tmp_path, capsys):
    """A plan edited by hand or cut short: finalize ended in a KeyError or TypeError traceback (a plan without
    `shards`, a hold-out that is no object), or wrote its wrong values into the manifest (a `source` of 7), and
    `launch status` crashed on a shard name that is no string, or left the split out. Now each is one line
    naming the plan and the field, status shows it, and a rerun of the prep command writes the plan again and
    keeps the shards built to it."""
    out, single = tmp_path / "array", tmp_path / "single"
    assert main(["imagefolder", str(tree), str(single), *COMMON]) == 0
    for i in (0, 1):
        assert main(["imagefolder", str(tree), str(out), *COMMON, "--task-index", str(i), "--num-tasks", "2"]) == 0
    plan = plan_path(out, "train")
    good = plan.read_text()
    capsys.readouterr()
    for says, text in _broken_plans(json.loads(good)):
        plan.write_text(text)
        assert main(["finalize", str(out)]) == 2, says
        err = capsys.readouterr().err
        assert err.startswith(f"python -m data_prep: error: {plan}: plan {says}") and err.count("\n") == 1, err
        assert err.endswith("rerun the prep command of split 'train': it writes the plan again (the shards already "
                            "built to it are kept)\n"), err
        assert describe(out)[0] == f"shards       {out}: train: {err.split('error: ', 1)[1].strip()}", says
        assert not (out / "manifest.json").exists()
    plan.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "shards"}))
    assert main(["imagefolder", str(tree), str(out), *COMMON, "--task-index", "1", "--num-tasks", "2"]) == 0
    err = capsys.readouterr().err
    assert "train task 1/2: 2 of 2 shards were complete from an earlier run and kept, 0 built" in err, err
    assert plan.read_text() == good
    assert main(["finalize", str(out)]) == 0
    assert outputs(out) == outputs(single)
