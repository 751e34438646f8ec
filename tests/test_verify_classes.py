"""`data_prep verify` against a class list edited by hand in manifest.json. A sample carries its label alone
(`KEY.cls`, `KEY.lbl`), so two names swapped, a name listed twice or a class appended left every shard sound and
verify said OK, while the labels then meant other classes at evaluation (or the class count changed). verify now
checks the list against the one each split's labels count (`OUT/.work/<split>/plan.json`, from which finalize
wrote it), without it against the sorted order data_prep writes, and `load_manifest` refuses a name listed
twice, for verify and the loaders alike."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.cli import main
from data_prep.format import ManifestError, load_manifest
from tests.fixtures_images import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Real photos in `<split>/<class>/<file>`, sharded by the command line into a train and a val split."""
    root = tmp_path_factory.mktemp("classes")
    for split, seed in (("train", 0), ("val", 1)):
        write_imagefolder(root / "src" / split, CLASSES, per_class=3, size=(40, 30), seed=seed)
    for split in ("train", "val"):
        done = subprocess.run([sys.executable, "-m", "data_prep", "imagefolder", str(root / "src"), str(root / "out"),
                               "--split", split, "--samples-per-shard", "4", "--workers", "1"],
                              cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return root / "out"


@pytest.fixture
def out(prepared, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(prepared, copy)
    return copy


def edit(out: Path, change) -> None:
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def verify(out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(out), "--workers", "1"])
    return code, capsys.readouterr().err


def one_problem(out: Path, capsys) -> str:
    """verify's one problem line, after checking it found that one alone (exit 1)."""
    code, err = verify(out, capsys)
    assert code == 1 and err.endswith(f"\nverify: 1 problem in {out}\n"), (code, err)
    return err.removesuffix(f"\nverify: 1 problem in {out}\n")


def plans(out: Path) -> str:
    return f"{out / '.work/train/plan.json'}, {out / '.work/val/plan.json'}"


def fix(out: Path) -> str:
    return (f"move it aside and run `python -m data_prep finalize {out}`: it writes the manifest again from "
            f"{out / '.work'}")


def test_the_untouched_output_passes(out, capsys):
    manifest = load_manifest(out)
    assert manifest["classes"] == manifest["class_names"] == CLASSES
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "1"]) == 0
    assert capsys.readouterr().out == f"verify: {out} OK\n"


def _swap(m: dict) -> None:
    for key in ("classes", "class_names"):
        m[key][0], m[key][3] = m[key][3], m[key][0]


def test_two_class_names_swapped_are_named_with_what_the_labels_count(out, capsys):
    edit(out, _swap)
    said = one_problem(out, capsys)
    assert said == (f"{out / 'manifest.json'}: classes[0] is 'cat', but label 0 of splits 'train', 'val' is "
                    f"'airplane' ({plans(out)}: 2 of the 4 classes differ; edited by hand?); {fix(out)}")
    (out / "manifest.json").rename(out / "manifest.edited")  # what the line says to do writes the list again
    capsys.readouterr()
    assert main(["finalize", str(out)]) == 0
    assert load_manifest(out)["classes"] == CLASSES and verify(out, capsys)[0] == 0


def test_a_plain_finalize_writes_the_class_list_of_every_split_again(out, capsys):
    """`finalize OUT` of an OUT whose every split it writes again: the list is their plans', not the edited
    manifest's (two names swapped were refused as a class mismatch between the splits)."""
    edit(out, _swap)
    assert main(["finalize", str(out)]) == 0
    assert load_manifest(out)["classes"] == CLASSES and verify(out, capsys)[0] == 0
    edit(out, _swap)  # a finalize of one split of two keeps the other's entry: refused, naming the mismatch
    assert main(["finalize", str(out), "--splits", "val"]) == 2


def test_only_the_classes_swapped_is_found_too(out, capsys):
    edit(out, lambda m: m["classes"].__setitem__(slice(0, 4, 3), ["cat", "airplane"]))
    code, err = verify(out, capsys)
    assert code == 1 and err.startswith(f"{out / 'manifest.json'}: classes[0] is 'cat', but label 0 of splits "
                                        f"'train', 'val' is 'airplane' ("), err


def test_a_class_name_listed_twice_is_refused_naming_the_file_and_the_name(out, capsys):
    edit(out, lambda m: m["classes"].__setitem__(1, "cat"))
    code, err = verify(out, capsys)
    said = (f"{out / 'manifest.json'}: manifest field 'classes' lists 'cat' twice (classes[1] and classes[3]): two "
            f"labels would be one class (edited by hand, or cut short?)")
    assert code == 2 and err.startswith(f"python -m data_prep: error: {said}; ") and err.count("\n") == 1, err
    with pytest.raises(ManifestError, match=r"lists 'cat' twice \(classes\[1\] and classes\[3\]\)"):
        load_manifest(out)  # the loaders' read of it too


def test_a_class_appended_with_no_sample_is_named(out, capsys):
    def append(m: dict) -> None:
        m["classes"].append("deer")
        m["class_names"].append("deer")
        for entry in m["splits"].values():
            entry["class_counts"].append(0)

    edit(out, append)
    said = one_problem(out, capsys)
    assert said == (f"{out / 'manifest.json'}: classes[4] is 'deer', but splits 'train', 'val' have no label 4 "
                    f"({plans(out)}: 4 classes there, 5 in the manifest; edited by hand?); {fix(out)}")


def test_a_class_name_edited_is_named(out, capsys):
    edit(out, lambda m: m["class_names"].__setitem__(2, "birdie"))
    said = one_problem(out, capsys)
    assert said == (f"{out / 'manifest.json'}: class_names[2] is 'birdie', but the plan of split 'train' names class "
                    f"2 ('bird') 'bird' ({out / '.work/train/plan.json'}; edited by hand?); {fix(out)}")


def test_without_the_work_records_a_list_out_of_sorted_order_is_named(out, capsys):
    shutil.rmtree(out / ".work")
    assert verify(out, capsys)[0] == 0
    edit(out, _swap)
    code, err = verify(out, capsys)
    assert code == 1
    assert err == (f"{out / 'manifest.json'}: classes[0] is 'cat', before classes[1] 'automobile': data_prep writes "
                   f"the classes sorted (a label is a class's position in that order), so the labels would mean "
                   f"other classes (edited by hand?); rerun the prep commands that wrote {out} (there is no .work/ "
                   f"there to check the list against)\nverify: 1 problem in {out}\n")


def test_class_counts_longer_than_the_class_list_is_a_finding_not_a_traceback(out, capsys):
    edit(out, lambda m: m["splits"]["val"]["class_counts"].append(0))
    code, err = verify(out, capsys)
    assert code == 1
    assert err == (f"{out / 'manifest.json'}: splits.val.class_counts has 5 counts, but classes lists 4 (edited by "
                   f"hand?); `python -m data_prep finalize {out}` writes it again\nverify: 1 problem in {out}\n")
