"""data_prep's records broken on disk (a hand edit, a crash of another tool, a half-copied OUT): a split's plan,
manifest.json, the shards' indexes, rejects.jsonl. Each is one line naming the file and the field, and what
to do; none is a traceback, none a wrong value used as is. (Done-records: tests/test_data_prep_resume.py.)"""
import json

import pytest

from data_prep.cli import main
from data_prep.format import plan_path
from data_prep.output_status import describe
from data_prep.plan_record import FIELDS as PLAN_FIELDS
from tests.broken_record_checks import COMMON, array_and_single, finalize_errors, rerun_task_1
from tests.fixtures_images import write_imagefolder
from tests.test_data_prep_resume import outputs


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    write_imagefolder(root, ["a", "b", "c", "d"], per_class=10)
    return root


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
        cases.append((f"field {key!r} is {json.dumps(wrong[kind])}, not {kind}",
                      json.dumps({**good, key: wrong[kind]})))
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
    out, single = array_and_single(tree, tmp_path)
    plan = plan_path(out, "train")
    good = plan.read_text()
    fix = "rerun the prep command of split 'train': it writes the plan again (the shards already built to it are kept)"
    for says, line in finalize_errors(out, plan, "plan", _broken_plans(json.loads(good)), fix, capsys):
        assert describe(out)[0] == f"shards       {out}: train: {line}", says
    plan.write_text(json.dumps({k: v for k, v in json.loads(good).items() if k != "shards"}))
    err = rerun_task_1(tree, out, capsys)
    assert "train task 1/2: 2 of 2 shards were complete from an earlier run and kept, 0 built" in err, err
    assert plan.read_text() == good
    assert main(["finalize", str(out)]) == 0
    assert outputs(out) == outputs(single)


def _broken_manifests(good: dict) -> list[tuple[str, str, str | None]]:
    """(what the error says, the manifest's text, the split whose entry is broken or None for the whole file)
    for the ways a hand edit or a cut breaks a manifest its readers take as is."""
    text = json.dumps(good, indent=1)
    val = good["splits"]["val"]
    shard = val["shards"][0]

    def val_is(entry) -> str:
        return json.dumps({**good, "splits": {**good["splits"], "val": entry}})

    def with_val(**fields) -> str:
        return val_is({**val, **fields})

    def with_shard(**fields) -> str:
        return with_val(shards=[{**shard, **fields}, *val["shards"][1:]])

    cases = [("is not valid JSON", "", None), ("is not valid JSON", text[:len(text) // 2], None),
             ("is not valid JSON (not UTF-8 text)", "\udcff" + text[1:], None),
             ("is not a JSON object", json.dumps([good]), None),
             ("has no field 'version'", json.dumps({k: v for k, v in good.items() if k != "version"}), None),
             ("has no field 'classes'", json.dumps({k: v for k, v in good.items() if k != "classes"}), None),
             ("field 'classes' is \"abcd\", not a list of strings", json.dumps({**good, "classes": "abcd"}), None),
             ("field 'splits' is [], not an object", json.dumps({**good, "splits": []}), None),
             ("field 'options' is [], not an object", json.dumps({**good, "options": []}), None),
             ("field 'splits.val' is [], not an object", val_is([]), "val"),
             ("has no field 'splits.val.shards'", val_is({k: v for k, v in val.items() if k != "shards"}), "val"),
             ("field 'splits.val.samples' is \"20\", not a count", with_val(samples="20"), "val"),
             ("field 'splits.val.rejected' is -1, not a count", with_val(rejected=-1), "val"),
             (f"field 'splits.val.samples' is {val['samples'] + 1}, not the sum of its shards' samples "
              f"({val['samples']})", with_val(samples=val["samples"] + 1), "val"),
             ("field 'splits.val.options.holdout' is \"x\", not an object",
              with_val(options={**val["options"], "holdout": "x"}), "val"),
             ("field 'splits.val.shards[0]' is \"val-000000.tar\", not an object",
              with_val(shards=["val-000000.tar"]), "val"),
             ("field 'splits.val.shards[1].name' is \"val-000000.tar\", which shards[0] lists already",
              with_val(shards=[shard, shard, *val["shards"][2:]]), "val")]
    for key, wrong in (("name", 7), ("index", None), ("samples", "8"), ("bytes", 1.5), ("sha256", 0)):
        if key != "index":  # an entry without one: the loaders take the shard's name with .idx
            cases.append((f"has no field 'splits.val.shards[0].{key}'",
                          with_val(shards=[{k: v for k, v in shard.items() if k != key}, *val["shards"][1:]]), "val"))
        cases.append((f"field 'splits.val.shards[0].{key}' is {json.dumps(wrong)}, not ", with_shard(**{key: wrong}),
                      "val"))
    return cases


def test_a_broken_manifest_is_one_line_for_every_reader_and_finalize_writes_it_again(tree, tmp_path, capsys):
    """manifest.json edited by hand or cut short: the loaders raised KeyError or TypeError (a shard without
    `name`, a split that is a list), or took a wrong value as is (a shard listed twice read twice, `classes`
    of "abcd" as 4 classes; launch status showed a split's `samples` other than its shards'); verify crashed
    on a name of 7 or a count of "8", launch status on a `samples` of "20", a rerun on a split entry that is
    a list, and a manifest not UTF-8 was a UnicodeDecodeError for all.
    Now each reader says one line naming the manifest and the field, and what writes it again: finalize, for a
    split's entry (from the split's plan and done-records), or, moved aside, for the whole file."""
    from pipeline.data.shards import ShardSet
    from pipeline.errors import ConfigError

    out = tmp_path / "o"
    for split in ("train", "val"):
        assert main(["imagefolder", str(tree), str(out), "--split", split, *COMMON[2:]]) == 0
    path = out / "manifest.json"
    good = path.read_text()
    capsys.readouterr()
    for says, text, split in _broken_manifests(json.loads(good)):
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        if split is None:
            fix = (f"move it aside and run `python -m data_prep finalize {out}`: it writes the manifest again from "
                   f"{out / '.work'}, with the splits planned there (train, val)")
        else:
            fix = (f"`python -m data_prep finalize {out}` writes the entry of split 'val' again from "
                   f"{out / '.work' / 'val'}")
        with pytest.raises(ConfigError) as caught:
            ShardSet(out, "train")
        line = str(caught.value)
        assert line.startswith(f"data.root: {path}: manifest {says}") and line.endswith(fix), (says, line)
        assert main(["verify", str(out)]) == 2, says
        assert capsys.readouterr().err == f"python -m data_prep: error: {line[len('data.root: '):]}\n", says
        assert describe(out)[1] == f"manifest     {line[len('data.root: '):]}", says
        if split is None:  # finalize cannot tell which splits it listed: it refuses until it is moved aside
            assert main(["finalize", str(out)]) == 2, says
            assert capsys.readouterr().err == f"python -m data_prep: error: {line[len('data.root: '):]}\n", says
            path.rename(tmp_path / "manifest.json.broken")
        assert main(["finalize", str(out)]) == 0, says
        assert path.read_text() == good, says
        capsys.readouterr()
    assert len(ShardSet(out, "train")) == 40


def test_a_manifest_of_another_version_says_which_this_code_reads_and_what_to_do(tree, tmp_path, capsys):
    """A manifest whose `version` is not the one this code writes (another version of resnet-pipeline wrote
    OUT): every reader said `unsupported manifest version 2 (expected 1)`, and nothing of what to do. Now the
    line says which version this code reads, and that the version that wrote it reads it, or that a rerun of
    the prep commands with this one, the manifest moved aside, writes OUT again."""
    from pipeline.data.shards import ShardSet
    from pipeline.errors import ConfigError

    out = tmp_path / "o"
    prep = {split: ["imagefolder", str(tree), str(out), "--split", split, *COMMON[2:]] for split in ("train", "val")}
    for argv in prep.values():
        assert main(argv) == 0
    path = out / "manifest.json"
    good = path.read_text()
    for version in (2, "1", True):
        path.write_text(json.dumps({**json.loads(good), "version": version}))
        line = (f"{path}: manifest version {json.dumps(version)}, but this data_prep reads version 1 only: read it "
                f"with the resnet-pipeline version that wrote it, or move it aside and rerun the prep commands that "
                f"wrote {out} with this one (after Slurm array tasks, then `python -m data_prep finalize {out}`)")
        with pytest.raises(ConfigError, match="^data.root: ") as caught:
            ShardSet(out, "train")
        assert str(caught.value) == f"data.root: {line}"
        assert describe(out)[1] == f"manifest     {line}"
        capsys.readouterr()
        for argv in (["verify", str(out)], ["finalize", str(out)], prep["val"]):
            assert main(argv) == 2, argv
            assert capsys.readouterr().err == f"python -m data_prep: error: {line}\n", argv
    path.rename(tmp_path / "manifest.json.v2")
    for argv in prep.values():
        assert main(argv) == 0
    assert path.read_text() == good


def test_the_trainer_says_a_broken_manifest_in_one_error_line(tree, tmp_path):
    """`python -m pipeline fit` on a manifest whose shard count is a string: it passed int() and the run went on
    (its checkpoints' digest of the split then differs from that of the manifest once repaired: a resume
    refused it as another dataset)."""
    from tests.conftest import REPO, run_cli_in_process

    out = tmp_path / "o"
    assert main(["imagefolder", str(tree), str(out), *COMMON]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["samples"] = "8"
    (out / "manifest.json").write_text(json.dumps(manifest))
    r = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(out),
                           "--data.val_split", "train", "--trainer.default_root_dir", str(tmp_path / "run"),
                           "--tracking.wandb", "false")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == (f"error: data.root: {out / 'manifest.json'}: manifest field 'splits.train.shards[1].samples' "
                        f"is \"8\", not a count (an integer >= 0) (edited by hand, or cut short?); `python -m "
                        f"data_prep finalize {out}` writes the entry of split 'train' again from "
                        f"{out / '.work' / 'train'}\n")


def test_a_broken_index_is_one_line_for_the_loaders_and_verify_and_a_rerun_rebuilds_it(tree, tmp_path, capsys):
    """A shard's .idx that is not UTF-8 was a UnicodeDecodeError traceback in the loaders (the trainer) and in
    verify; one with a negative offset passed the loaders' start-up check (the read then failed mid-epoch with
    an EINVAL traceback) and made verify exit 2 with `[Errno 22] Invalid argument`, naming no file. Now both
    are one line naming the index (and the line), and the rerun the line asks for rebuilds it. The loaders
    read the indexes only without the split's columns file (removed here: with it they read no index)."""
    from pipeline.data.shards import ShardSet
    from pipeline.errors import ConfigError
    from tests.conftest import REPO, run_cli_in_process

    out = tmp_path / "o"
    argv = ["imagefolder", str(tree), str(out), *COMMON]
    assert main(argv) == 0
    idx = out / "train-000002.idx"
    good = idx.read_bytes()
    first = good.split(b"\n")[1]
    offset = first.split(b" ")[1]
    fix = "rerun the prep command that wrote it: it rebuilds the shard with its index"
    for says, data in ((f"{idx}: index is not text (not UTF-8)", b"\xff" + good[1:]),
                       (f"{idx}:2: negative offset or size", good.replace(first, first.replace(offset, b"-" + offset))),
                       (f"{idx}:9: expected groups of 'ext offset size name'", good[:-20])):
        idx.write_bytes(data)
        assert ShardSet(out, "train").columns_fallback == ""  # the columns file: no index read
        (out / "train.columns.npy").unlink()
        with pytest.raises(ConfigError) as caught:
            ShardSet(out, "train")
        assert str(caught.value) == f"{says}; {fix}", str(caught.value)
        capsys.readouterr()
        assert main(["verify", str(out), "--workers", "1"]) == 1, says
        err = capsys.readouterr().err
        assert f"train/train-000002.tar: {says}; {fix}\n" in err, says
        assert "train: columns file " in err and "cannot be read" in err, err
        assert main(argv) == 0, says
        assert "train: 4 of 5 shards were complete from an earlier run and kept, 1 built" in capsys.readouterr().err
        assert idx.read_bytes() == good, says
    idx.write_bytes(b"\xff" + good[1:])
    (out / "train.columns.npy").unlink()
    r = run_cli_in_process("fit", "--config", str(REPO / "conf" / "demo.yaml"), "--data.root", str(out),
                           "--data.val_split", "train", "--trainer.default_root_dir", str(tmp_path / "run"),
                           "--tracking.wandb", "false")
    assert (r.returncode, r.stderr) == (2, f"error: {idx}: index is not text (not UTF-8); {fix}\n"), r.stderr


def test_a_broken_rejects_line_is_one_line_and_finalize_writes_the_file_again(tmp_path, capsys):
    """rejects.jsonl with a line that is JSON but no object (a number, a list) was an AttributeError traceback
    in finalize, and in the rerun of every split; a file that is not UTF-8, a UnicodeDecodeError. Now each is
    one line naming the file (and line); removed, finalize writes the lines of every planned split again."""
    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["a", "b"], per_class=3)
    (src / "a" / "notes.txt").write_text("not an image")
    for split in ("train", "val"):
        assert main(["imagefolder", str(src), str(out), "--split", split, *COMMON[2:]]) == 0
    path = out / "rejects.jsonl"
    good = path.read_text()
    assert [json.loads(line)["split"] for line in good.splitlines()] == ["train", "val"]
    again = (f"run `python -m data_prep finalize {out}`: it writes the lines of the splits planned under "
             f"{out / '.work'} again")
    for says, text in ((f"{path}:1: not a JSON object with a string 'split' (edited by hand?); remove that line, "
                        f"or the file and then {again}", "5\n" + good),
                       (f"{path}:2: not a JSON object with a string 'split' (edited by hand?); remove that line, "
                        f"or the file and then {again}", good.replace('"split": "val", ', "")),
                       (f"{path}: not UTF-8 text (edited by hand?); remove it and then {again}", "\udcff" + good)):
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        capsys.readouterr()
        assert main(["finalize", str(out)]) == 2, says
        assert capsys.readouterr().err == f"python -m data_prep: error: {says}\n"
        path.unlink()
        assert main(["finalize", str(out)]) == 0
        assert path.read_text() == good


def test_verify_counts_each_splits_rejects_lines_against_the_manifest(tmp_path, capsys):
    """rejects.jsonl cut at a line boundary, or lines removed by hand, still parses: the reasons of inputs left
    out were lost and `verify` said OK. It now counts each split's lines against the manifest's `rejected`,
    naming the file, both numbers and what writes the lines again (finalize)."""
    src, out = tmp_path / "src", tmp_path / "o"
    write_imagefolder(src, ["a", "b"], per_class=3)
    for cls in ("a", "b"):
        (src / cls / "notes.txt").write_text("not an image")
    for split in ("train", "val"):
        assert main(["imagefolder", str(src), str(out), "--split", split, *COMMON[2:]]) == 0
    path, manifest = out / "rejects.jsonl", out / "manifest.json"
    good = path.read_text()
    assert [json.loads(line)["split"] for line in good.splitlines()] == ["train", "train", "val", "val"]
    assert main(["verify", str(out)]) == 0
    again = (f"run `python -m data_prep finalize {out}`: it writes the lines of the splits planned under "
             f"{out / '.work'} again")

    def says(split: str, lines: int, there: str = "") -> str:
        return (f"{path}: {lines} line{'' if lines == 1 else 's'} of split {split!r}{there}, but {manifest} says it "
                f"rejected 2 (splits.{split}.rejected) (cut short, or edited by hand?); {again}")

    lines = good.splitlines(keepends=True)
    gone = " (the file is not there)"
    broken = (f"{path}:4: not a JSON line (edited by hand, or cut short?); remove that line, or the file and then "
              f"{again}")
    for text, problems in (("".join(lines[:3]), [says("val", 1)]), ("".join(lines[1:]), [says("train", 1)]),
                           (None, [says("train", 0, gone), says("val", 0, gone)]),
                           ("".join(lines[:3]) + '{"spl', [broken])):
        if text is None:
            path.unlink()
        else:
            path.write_text(text)
        capsys.readouterr()
        assert main(["verify", str(out)]) == 1, text
        err = "".join(f"{p}\n" for p in problems) + f"verify: {len(problems)} problem{'' if len(problems) == 1 else 's'} in {out}\n"
        assert capsys.readouterr().err == err, text
        if problems == [broken]:  # finalize cannot tell whose that line is: the file goes first
            path.unlink()
        assert main(["finalize", str(out)]) == 0
        assert path.read_text() == good
    assert main(["verify", str(out)]) == 0


def test_a_rerun_says_why_it_takes_a_split_out_of_the_manifest(tree, tmp_path, capsys):
    """A rerun into an OUT with a manifest takes a split out of it while it rebuilds shards in place, and said
    it was "being rebuilt with other settings or inputs" whatever the reason. Each reason a rerun to the same
    plan has is now said as it is; the split is back, byte for byte, once the rerun has finalized it."""
    from data_prep.format import done_record_path

    out = tmp_path / "o"
    argv = ["imagefolder", str(tree), str(out), *COMMON]
    assert main(argv) == 0
    before = outputs(out)
    record = done_record_path(out, "train", "train-000002.tar")
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["splits"]["train"]

    def edit_entry(**fields):
        (out / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": {**entry, **fields}}}))

    cases = [
        (lambda: record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                               if k != "name"})),
         f"the done-record {record} has no field 'name' (edited by hand?), so its shard is being rebuilt"),
        (lambda: [p.unlink() for p in (out / ".work" / "train").glob("*.tar.json")],
         f"5 of its 5 shards have no done-record in {out / '.work' / 'train'} (removed, or OUT copied without them?) "
         f"and are being rebuilt"),
        (lambda: (out / "train-000003.tar").unlink(),
         "shard train-000003.tar is missing or not of the size its done-record gives, and is being rebuilt"),
        (lambda: edit_entry(samples="40"),
         "its entry there is broken (field 'splits.train.samples' is \"40\", not a count (an integer >= 0); edited by "
         "hand?) and is written again"),
        (lambda: edit_entry(shards=entry["shards"][::-1]),
         "its entry there lists other shards than their done-records (edited by hand?) and is written again"),
    ]
    for damage, says in cases:
        damage()
        capsys.readouterr()
        assert main(argv) == 0, says
        err = capsys.readouterr().err
        assert (f"data_prep: {out / 'manifest.json'} no longer lists split 'train' until it is finalized again (this "
                f"run, or `python -m data_prep finalize {out}` after array tasks): {says}\n") in err, err
        assert "other settings or inputs" not in err, err
        assert outputs(out) == before, says


def test_a_done_record_whose_counts_are_not_its_shards_is_broken_and_a_rerun_rebuilds_it(tree, tmp_path, capsys):
    """A done-record whose `samples` or `bytes` is a count, but not its shard's (a hand edit, a record copied
    from another run): the rerun's check (size and sha256 of the tar and index) let `samples` pass, so the shard
    was kept, and finalize failed on its sum (`41 written + 0 rejected != 40 inputs ... rerun the split`) on every
    rerun. Now the index header's count and the tar's size are checked: finalize names the record and the field
    in one line, and the task's rerun rebuilds the shard, after which finalize writes what a single run does."""
    from data_prep.format import done_record_path

    out, single = array_and_single(tree, tmp_path)
    record = done_record_path(out, "train", "train-000001.tar")
    good = json.loads(record.read_text())
    tar, idx = out / "train-000001.tar", out / "train-000001.idx"
    samples, size = good["samples"], good["bytes"]
    cut = "(the shard cut short or replaced, or the record edited by hand?)"
    copied = "(edited by hand, or copied from another run?)"
    cases = [(f"field 'samples' is {samples + 1}, not the {samples} samples of {idx} {copied}",
              json.dumps({**good, "samples": samples + 1})),
             (f"field 'samples' is 0, not the {samples} samples of {idx} {copied}", json.dumps({**good, "samples": 0})),
             (f"field 'bytes' is {size + 10240}, not the size of {tar} ({size}) {cut}",
              json.dumps({**good, "bytes": size + 10240})),
             (f"field 'bytes' is {size - 1}, not the size of {tar} ({size}) {cut}",
              json.dumps({**good, "bytes": size - 1}))]
    fix = "rerun the prep command: it rebuilds shard train-000001.tar and writes its record again"
    assert [says for says, _line in finalize_errors(out, record, "done-record", cases, fix, capsys)] == \
        [says for says, _text in cases]
    for says, text in cases:
        record.write_text(text)
        listed = (out / "manifest.json").exists()  # from the second case on: the rerun says why it unlists the split
        err = rerun_task_1(tree, out, capsys)
        assert "train task 1/2: 1 of 2 shards was complete from an earlier run and kept, 1 built" in err, (says, err)
        assert not listed or f"the done-record {record} {says}, so its shard is being rebuilt" in err, (says, err)
        assert json.loads(record.read_text()) == good, says
        assert main(["finalize", str(out)]) == 0, says
        assert outputs(out) == outputs(single), says
