"""``python -m pipeline export CKPT OUT``: what it refuses to read or to overwrite, said in one line naming the
file. (The export of a ZeRO directory: tests/test_deepspeed.py; of a resumed run's checkpoint file:
tests/test_resume.py.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.export import main as export_main
from pipeline.run_layout import CONFIG_FILE, last_checkpoint
from tests import preloaded_python
from tests.conftest import REPO, run_cli_in_process, run_module
from tests.damaged_checkpoints import flip_a_weight_byte

CONF = str(REPO / "conf" / "demo.yaml")


@pytest.fixture(scope="module")
def trained(digits_shards, tmp_path_factory) -> Path:
    """A real run of one step: its ``last.ckpt``."""
    run = tmp_path_factory.mktemp("export") / "run"
    run_module("pipeline", "fit", "--config", CONF, "--data.root", str(digits_shards), "--trainer.default_root_dir",
               str(run), "--trainer.max_steps", "1", "--data.num_workers", "0", "--trainer.num_sanity_val_steps", "0",
               "--tracking.wandb", "false")
    return last_checkpoint(run)


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_an_existing_file_other_than_weights_is_not_overwritten(trained, tmp_path, capsys):
    """OUT named after an existing file that is not a weights file (the run's config.yaml, a shard: a slip of
    the shell's completion) was replaced by the weights for good; only a weights file (an earlier export)
    or an empty file is replaced."""
    config = tmp_path / CONFIG_FILE
    shutil.copy(trained.parent.parent / CONFIG_FILE, config)
    before = config.read_bytes()
    assert export_main([str(trained), str(config)]) == 2
    assert _error(capsys) == (f"error: out: {config} exists and is not a weights file (a state_dict of tensors, "
                              f"as export writes); name another output file, or remove it first")
    assert config.read_bytes() == before

    weights = tmp_path / "net.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)  # an earlier export
    empty = tmp_path / "empty.pt"
    empty.touch()
    for out in (weights, empty):
        assert export_main([str(trained), str(out)]) == 0, capsys.readouterr().err
        assert "conv1.weight" in torch.load(out, weights_only=True)


def test_an_unreadable_checkpoint_is_said_in_words(trained, tmp_path, capsys):
    """An empty, foreign or cut-short checkpoint: export (and ``--model.init_weights``, which reads the same
    way) said torch's or pickle's own words ("Ran out of input", "Memo value not found at index 101",
    "[Errno 22] Invalid argument", a paragraph about miniz) where ``--ckpt_path`` said what the file is."""
    whole = trained.read_bytes()
    cases = {"empty.ckpt": (b"", "an empty file"),
             "notes.ckpt": (b"hello\n", "not a torch checkpoint, or torn (a copy cut short?)"),
             "cut-early.ckpt": (whole[:5000], "not a torch checkpoint, or torn (a copy cut short?)"),
             "cut-half.ckpt": (whole[: len(whole) // 2], "not a torch checkpoint, or torn (a copy cut short?)")}
    for name, (data, why) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert export_main([str(tmp_path / name), str(tmp_path / "out.pt")]) == 2
        assert _error(capsys) == f"error: cannot read checkpoint {tmp_path / name}: {why}"
        assert not (tmp_path / "out.pt").exists()
    # one byte of the weights flipped (a bad disk or copy): the same size, and torch loads it without a word
    damaged, record = flip_a_weight_byte(whole)
    (tmp_path / "flipped.ckpt").write_bytes(damaged)
    assert export_main([str(tmp_path / "flipped.ckpt"), str(tmp_path / "out.pt")]) == 2
    assert _error(capsys) == (f"error: checkpoint {tmp_path / 'flipped.ckpt'} is damaged: its record {record} does "
                              "not match the CRC-32 written with it (a bit flipped on disk or in a copy); use another "
                              "checkpoint, or copy this one again from where it came from")
    assert not (tmp_path / "out.pt").exists()


def test_a_run_directory_or_its_checkpoints_folder_is_refused_naming_a_checkpoint(trained, tmp_path, capsys):
    """A run directory given where one checkpoint is meant: export said "not a readable DeepSpeed checkpoint
    directory: Unable to find 'latest' file", validate "holds no DeepSpeed model states" (and, under DeepSpeed,
    found the model states of a ZeRO save inside it and failed in DeepSpeed's traceback)."""
    run = trained.parent.parent
    for given, said in ((run, f"{run} is a run directory, not a checkpoint: name one of its checkpoints, e.g. {trained}"),
                        (trained.parent, f"{trained.parent} is a folder of checkpoints, not one: name one of them, "
                                         f"e.g. {trained}")):
        assert export_main([str(given), str(tmp_path / "out.pt")]) == 2
        assert _error(capsys) == f"error: {said}"
        for sub in ("validate", "fit"):
            r = run_cli_in_process(sub, "--config", str(run / CONFIG_FILE), "--ckpt_path", str(given),
                                   "--trainer.default_root_dir", str(tmp_path / sub))
            assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == f"error: {said}", r.stderr[-2000:]
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "fit").exists()


def test_an_empty_path_is_refused_naming_the_argument(tmp_path, monkeypatch, capsys):
    """``export "$CKPT" "$OUT"`` with a variable unset: the empty checkpoint path was the current directory
    ("error: . is a folder of checkpoints ..." in a run's checkpoints/ folder), an empty OUT "out:  is a
    directory"."""
    (tmp_path / "last.ckpt").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # a run's checkpoints/ folder
    assert export_main(["", "net.pt"]) == 2
    assert _error(capsys) == ("error: checkpoint: an empty path (an unset shell variable?); name a checkpoint file "
                              "or a DeepSpeed checkpoint directory")
    assert export_main(["last.ckpt", ""]) == 2
    assert _error(capsys) == ("error: out: an empty path (an unset shell variable?); name the output file (e.g. "
                              "weights.pt)")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def _signalled_while_writing(weights: Path, target: Path, sig: signal.Signals,
                             logs: Path) -> preloaded_python.ForkedProcess | subprocess.Popen:
    """``python -m pipeline export weights target``, sent ``sig`` as soon as its temporary file appears: while
    it writes (256 MiB: a tenth of a second or more from its first byte to the rename). Its stdout and stderr
    go to ``logs``.out and .err (it forks from the preloaded Python, which takes files, not pipes)."""
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        proc = preloaded_python.popen([sys.executable, "-m", "pipeline", "export", str(weights), str(target)],
                                      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=err)
    mine = f".tmp-{target.name}."
    deadline = time.monotonic() + 300
    while not any(name.startswith(mine) for name in os.listdir(target.parent)):
        assert proc.poll() is None, logs.with_suffix(".err").read_text()
        assert time.monotonic() < deadline, "the export wrote nothing"
        time.sleep(0.001)
    os.kill(proc.pid, sig)
    time.sleep(0.2)
    assert not target.exists(), "the write ended before the signal (a larger file would take longer)"
    return proc


def test_the_next_export_removes_a_killed_ones_temporary_file_and_no_live_ones(tmp_path):
    """A SIGKILL (or SIGTERM: no clean-up runs either) during an export's write left ``.tmp-OUT.*``, as large as
    the weights, beside OUT for good. The next export into that folder removes it, and says so; a live
    export's file (one writing into the same folder at the same time, here stopped mid-write), a writer's on
    another node and a training save's stay."""
    weights = tmp_path / "big.pt"
    torch.save({"fc.weight": torch.zeros(64 * 2**20)}, weights)  # 256 MiB
    out = tmp_path / "out"
    out.mkdir()
    other_node = out / ".tmp-x.pt.export-1-1@another-node.0123456789ab"  # its pid cannot be checked from here
    save = out / ".tmp-last.ckpt.0123456789ab"  # a checkpoint save's (training removes those at its start)
    for f in (other_node, save):
        f.write_bytes(b"x")

    killed = _signalled_while_writing(weights, out / "a.pt", signal.SIGKILL, tmp_path / "killed")
    assert killed.wait() == -signal.SIGKILL
    (left,) = out.glob(".tmp-a.pt.*")
    size = left.stat().st_size

    # it removes the killed one's file
    live = _signalled_while_writing(weights, out / "b.pt", signal.SIGSTOP, tmp_path / "live")
    try:
        (writing,) = out.glob(".tmp-b.pt.*")
        again = run_module("pipeline", "export", str(weights), str(out / "a.pt"))
        assert again.stdout == f"wrote {out / 'a.pt'}: 1 tensors, 67,108,864 fp32 values\n"
        assert "removed" not in again.stderr and writing.exists(), again.stderr
    finally:
        os.kill(live.pid, signal.SIGCONT)
    live.wait(timeout=300)
    stdout, stderr = (tmp_path / "live.out").read_text(), (tmp_path / "live.err").read_text()
    assert live.returncode == 0 and stdout.startswith(f"wrote {out / 'b.pt'}"), stderr
    assert stderr.splitlines() == [f"removed a temporary file of an export killed while writing in {out}: "
                                   f"{left.name} ({size / 2**20:.1f} MiB)"]
    assert sorted(p.name for p in out.iterdir()) == sorted([other_node.name, save.name, "a.pt", "b.pt"])
    for name in ("a.pt", "b.pt"):
        assert torch.load(out / name, weights_only=True, mmap=True)["fc.weight"].shape == (64 * 2**20,)


def test_the_class_list_goes_beside_the_weights(trained, digits_shards, tmp_path, capsys):
    """The weights alone said nothing of what each output means: shipped without the training's manifest.json,
    output 3 was a guess. Checkpoints record the manifest's classes (and class_names), and export writes them
    beside the weights, in label order; a checkpoint saved before they were recorded says so, and leaves no
    earlier export's list beside its weights. A file of that name that is no class list is not overwritten."""
    import json

    manifest = json.loads((digits_shards / "manifest.json").read_text())
    out = tmp_path / "net.pt"
    assert export_main([str(trained), str(out)]) == 0
    listed = tmp_path / "net.pt.classes.json"
    said = capsys.readouterr()
    assert f"; and {listed}: what each output means" in said.out, said.out
    saved = json.loads(listed.read_text())
    assert saved["classes"] == manifest["classes"] and len(saved["classes"]) == 10, saved
    assert saved.get("class_names") == manifest.get("class_names"), saved

    old = torch.load(trained, map_location="cpu", weights_only=False)  # as saved before checkpoints kept the list
    for key in ("classes", "class_names"):
        old["ShardDataModule"].pop(key, None)
    before = tmp_path / "before.ckpt"
    torch.save(old, before)
    assert export_main([str(before), str(out)]) == 0
    said = capsys.readouterr()
    assert not listed.exists() and "what each output means" not in said.out, said.out
    assert f"note: {before} records no class list" in said.err, said.err

    (tmp_path / "mine.pt.classes.json").write_text("my notes\n")
    assert export_main([str(trained), str(tmp_path / "mine.pt")]) == 2
    assert f"out: {tmp_path / 'mine.pt.classes.json'}, where export writes the class list" in _error(capsys)
    assert (tmp_path / "mine.pt.classes.json").read_text() == "my notes\n" and not (tmp_path / "mine.pt").exists()


def test_a_failed_export_leaves_no_class_list_of_another_checkpoint_beside_the_weights(trained, tmp_path,
                                                                                        monkeypatch, capsys):
    """The list was written before the weights: a weights write that failed (a full disk, a quota) left the old
    weights beside the new checkpoint's classes. And `net.pt` and `net.pth` shared one `net.classes.json`, the
    second export's replacing the first's."""
    import json

    import pipeline.export as export_module

    out = tmp_path / "net.pt"
    assert export_main([str(trained), str(out)]) == 0
    before = out.read_bytes()
    write = export_module.atomic_write_bytes

    def full_disk(data, path, *args, **kwargs):
        if Path(path) == out:
            raise OSError(28, "No space left on device")
        return write(data, path, *args, **kwargs)

    monkeypatch.setattr(export_module, "atomic_write_bytes", full_disk)
    capsys.readouterr()
    assert export_main([str(trained), str(out)]) == 2
    assert f"out: cannot write {out}: No space left on device" in _error(capsys)
    assert out.read_bytes() == before and not (tmp_path / "net.pt.classes.json").exists()
    monkeypatch.setattr(export_module, "atomic_write_bytes", write)

    assert export_main([str(trained), str(out)]) == 0 and export_main([str(trained), str(tmp_path / "net.pth")]) == 0
    for name in ("net.pt", "net.pth"):
        assert json.loads((tmp_path / f"{name}.classes.json").read_text())["classes"], name
