"""ShardDataModule under a ``pl.Trainer`` of one's own (a notebook, another training script): Lightning's default
``use_distributed_sampler=True`` wrapped the ``cpu`` loader's sampler in a DistributedSampler under DDP, which split
each rank's share of the epoch again: 2 ranks trained on half the data and validation scored 165 of 230 images,
without a word. It is refused at setup now; with the setting off, the two ranks read the whole epoch once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_prep.format import load_manifest
from tests.conftest import REPO

# Two real DDP ranks on the CPU (Lightning's launcher starts rank 1 by running this script again): each rank
# writes how many samples it trained and validated on.
SCRIPT = """
import json, sys
import pytorch_lightning as pl
import torch
from pipeline.datamodule import ShardDataModule

root, out, uds = sys.argv[1], sys.argv[2], sys.argv[3] == "1"

class Count(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 10)
        self.seen = {"train": 0, "val": 0}
    def training_step(self, batch, i):
        self.seen["train"] += len(batch[0])
        return self.lin(batch[0].float().mean((2, 3))).sum() * 0
    def validation_step(self, batch, i):
        self.seen["val"] += int(batch[2].sum())  # the valid samples, not the padding
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)
    def on_fit_end(self):
        with open(f"{out}.{self.global_rank}", "w") as f:
            json.dump(self.seen, f)

dm = ShardDataModule(root=root, backend="cpu", batch_size=16, val_batch_size=100, num_workers=0)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=uds)
trainer.fit(Count(), datamodule=dm)
"""


def _run(script: Path, shards: Path, out: Path, uds: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(script), str(shards), str(out), "1" if uds else "0"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=script.parent)


def test_lightnings_distributed_sampler_is_refused_and_without_it_two_ranks_read_everything_once(
        digits_shards, tmp_path):
    script = tmp_path / "own_trainer.py"
    script.write_text(SCRIPT)
    out = tmp_path / "seen"
    refused = _run(script, digits_shards, out, uds=True)
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "trainer.use_distributed_sampler must be false: ShardDataModule splits every epoch across the ranks " \
           "itself" in refused.stderr, refused.stderr[-3000:]
    assert not list(tmp_path.glob("seen.*"))

    ran = _run(script, digits_shards, out, uds=False)
    assert ran.returncode == 0, ran.stderr[-3000:]
    seen = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    splits = load_manifest(digits_shards)["splits"]
    train, val = splits["train"]["samples"], splits["val"]["samples"]
    assert seen[0]["train"] == seen[1]["train"] == train // 32 * 16  # whole global batches of 2 x 16
    assert seen[0]["val"] + seen[1]["val"] == val  # every val image once
