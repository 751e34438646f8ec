"""LightningDataModule over a sharded split pair: picks the backend, owns the loader position.

The loader position (epoch, samples consumed) is part of every checkpoint through ``state_dict``; on
resume the samplers continue the epoch from there, for whatever world size the new job has.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from data_prep.format import MANIFEST_NAME, load_manifest
from pipeline.data.augment import AugmentConfig
from pipeline.data.contract import Position, TrainSampler, ValSampler, steps_in_epoch
from pipeline.data.shards import ShardSet, open_shards_for_window
from pipeline.data.shared_memory import shortage
from pipeline.data.worker_signals import shield_worker
from pipeline.data.worker_start import START_METHODS, resolve, worker_context
from pipeline.errors import ConfigError, require
from pipeline.file_access import unreachable_reason
from pipeline.wording import plural
from pipeline.evaluation_way_out import way_out
from pipeline.resume_geometry import epoch_finished

log = logging.getLogger(__name__)

MAX_WORKERS = 256  # loader processes per rank; 100000 forked until the kernel killed the run, without a word


def eval_batch(batch_size: int, num_samples: int, world_size: int) -> int:
    """A rank's evaluation batch: ``data.val_batch_size``, at most its share of the split (batches are padded
    to full size, and a batch of 10^9 for a split of thousands was allocated, then killed for memory)."""
    return max(1, min(batch_size, -(-num_samples // world_size)))

BACKENDS = ("auto", "cpu", "dali", "dali-cpu", "synthetic")


# the data module's ShardSet of each split setting
SHARDS_OF = {"train_split": "train_shards", "val_split": "val_shards", "test_split": "test_shards"}


class ShardDataModule(pl.LightningDataModule):
    """Train/val/test loaders over ``root`` (a data_prep output directory with ``manifest.json``).

    Args:
        root: directory with manifest.json, shards and indexes.
        train_split: the manifest's split ``fit`` trains on.
        val_split: the manifest's split ``fit`` validates on, and ``validate`` scores.
        test_split: the split ``python -m pipeline test`` scores (default: val_split), with the validation's
            transform, batch size and exact metrics, logged as ``test/...``.
        backend: "cpu" (torchvision's libjpeg-turbo decode, PIL for the rest, in DataLoader workers), "dali"
            (GPU decoding), "dali-cpu" (DALI on the CPU), "synthetic" (random tensors, for benchmarks) or "auto"
            (dali when a GPU and DALI are present).
        batch_size: per-rank batch size (global batch = batch_size * world size * grad accumulation).
        val_batch_size: per-rank validation batch size (default: batch_size).
        num_workers: loader processes (cpu backend) or threads (DALI) per rank.
        worker_start_method: how the cpu backend's loader processes start: "forkserver" (forked by a fresh
            one-thread process; see ``pipeline.data.worker_start``), "fork" (forked by the rank itself, which
            in a multi-rank run can hang a worker for good on CPython before 3.11.10) or "auto" (forkserver
            with more than one rank, else fork).
        seed: seed of the epoch permutations and of the augmentation.
        window_shards: shards mixed together by the shard-aware shuffle.
        on_corrupt: "fail" (stop with the shard's name) or "skip" (mask the sample, count and log it).
        augment: the augmentation recipe.
        dali_hw_decoder_load: share of JPEG decoding on the hardware decoder (dali backend).
        dali_source_workers: processes that read the samples' bytes and draw their crops for DALI (dali,
            dali-cpu); 0 reads them in the training process. Default: 0 for dali-cpu,
            max(1, min(4, num_workers // 2)) for dali.
        prefetch_batches: batches prepared ahead: per loader process for the cpu backend (torch's prefetch_factor,
            default 2), in DALI's queue for dali (default 3) and dali-cpu (default 2). More evens out slow
            batches, at the cost of memory (``/dev/shm`` for the cpu backend's processes).
    """

    def __init__(
        self,
        root: str = "data/shards",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        backend: str = "auto",
        batch_size: int = 256,
        val_batch_size: int | None = None,
        num_workers: int = 8,
        worker_start_method: str = "auto",
        seed: int = 0,
        window_shards: int = 4,
        on_corrupt: str = "fail",
        augment: AugmentConfig | None = None,
        dali_hw_decoder_load: float = 0.75,
        dali_source_workers: int | None = None,
        prefetch_batches: int | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"data.backend must be one of {BACKENDS}, got {backend!r}")
        require(batch_size >= 1, "data.batch_size", ">= 1", batch_size)
        require(val_batch_size is None or val_batch_size >= 1, "data.val_batch_size",
                ">= 1 (or null: data.batch_size)", val_batch_size)
        require(0 <= num_workers <= MAX_WORKERS, "data.num_workers", f"in [0, {MAX_WORKERS}] (per rank)", num_workers)
        require(worker_start_method in START_METHODS, "data.worker_start_method",
                "one of " + ", ".join(repr(m) for m in START_METHODS), worker_start_method)
        require(seed >= 0, "data.seed", ">= 0", seed)  # numpy's seed sequences take non-negative integers only
        require(window_shards >= 1, "data.window_shards", ">= 1", window_shards)
        require(on_corrupt in ("fail", "skip"), "data.on_corrupt", "'fail' or 'skip'", on_corrupt)
        require(0 <= dali_hw_decoder_load <= 1, "data.dali_hw_decoder_load", "in [0, 1]", dali_hw_decoder_load)
        require(dali_source_workers is None or dali_source_workers >= 0, "data.dali_source_workers",
                ">= 0 (or null for the default)", dali_source_workers)
        require(prefetch_batches is None or prefetch_batches >= 1, "data.prefetch_batches",
                ">= 1 (or null for the backend's default)", prefetch_batches)
        self.root, self.train_split, self.val_split = root, train_split, val_split
        self.test_split = test_split or val_split
        self.backend = backend
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.seed, self.window_shards = num_workers, seed, window_shards
        self.worker_start_method = worker_start_method
        self.on_corrupt = on_corrupt
        self.augment = augment or AugmentConfig()
        self.augment.check()
        self.dali_hw_decoder_load = dali_hw_decoder_load
        self.dali_source_workers = dali_source_workers
        self.prefetch_batches = prefetch_batches
        self._dataset_record: dict | None = None  # the digests of the data read at the start (dataset_record)
        self._train: ShardSet | None = None
        self._val: ShardSet | None = None
        self._test: ShardSet | None = None
        self._start = Position()
        self._restored = False  # a checkpoint gave the position
        self._said_epoch_end: tuple[int, int, int] | None = None
        self._train_sampler: TrainSampler | None = None
        self._saved_global = 0  # world size x batch size of that checkpoint
        self._dali_loaders: weakref.WeakSet = weakref.WeakSet()  # closed at teardown

    # ---- data -------------------------------------------------------------------------------------
    def _shards(self, split: str) -> ShardSet:
        if (why := unreachable_reason(self.root)) is not None:
            raise ConfigError(f"data.root: cannot reach shard directory {self.root!r}: {why}; give this user "
                              f"access to it (or its group's), or copy the shards where it can read them")
        if Path(self.root).exists() and not Path(self.root).is_dir():
            raise ConfigError(f"data.root: {self.root!r} is a file; data.root is the shard directory (data_prep's "
                              f"OUT, holding manifest.json)")
        if not Path(self.root).is_dir():
            raise ConfigError(f"data.root: shard directory {self.root!r} does not exist")
        try:
            shards = ShardSet(self.root, split)
        except ConfigError as e:
            if str(e).startswith(f"split {split!r} is not in"):  # name the setting that chose it
                key = ("data.train_split" if split == self.train_split else
                       "data.val_split" if split == self.val_split else "data.test_split")
                raise ConfigError(f"{key}: {e}") from None
            raise
        if split == self.train_split:  # the shuffle reads a window of shards (two across its boundaries)
            shards.max_open = open_shards_for_window(self.window_shards)
        if (shards.columns_fallback and len(shards.shard_names) > 1
                and (self.trainer is None or self.trainer.is_global_zero)):
            log.warning("data.root: read the %d indexes of split %r, not its columns file: %s; `python -m data_prep "
                        "finalize %s` writes it (one file for every rank to read at start)",
                        len(shards.shard_names), split, shards.columns_fallback, self.root)
        return shards

    @property
    def train_shards(self) -> ShardSet:
        if self._train is None:
            self._train = self._shards(self.train_split)
        return self._train

    @property
    def val_shards(self) -> ShardSet:
        if self._val is None:
            self._val = self._shards(self.val_split)
        return self._val

    @property
    def test_shards(self) -> ShardSet:
        if self._test is None:
            self._test = self.val_shards if self.test_split == self.val_split else self._shards(self.test_split)
        return self._test

    @property
    def num_classes(self) -> int:
        """The manifest's class count, which every split shares, read from the manifest alone: an evaluation reads
        only the split it scores (the validation shards copied to another machine with the manifest, which lists
        the training shards too); ``fit``'s ``check_splits`` checks the training split's shards. Where the manifest
        cannot be read, the training split's reading names what is wrong."""
        try:
            manifest = load_manifest(self.root)
        except Exception:  # noqa: BLE001
            manifest = None
        if isinstance(manifest, dict) and isinstance(manifest.get("classes"), list):
            return len(manifest["classes"])
        return self.train_shards.num_classes

    def setup(self, stage: str) -> None:
        self.check_backend()
        self.check_trainer_sampler()
        self.check_splits(stage, validating=self.trainer is None or self.trainer.limit_val_batches != 0)
        self.dataset_record()  # read now, with the shards: what every checkpoint of this start records

    def teardown(self, stage: str) -> None:
        """Stop the DALI pipelines when a fit, validate or test ends normally (Lightning skips it after an
        exception): their source workers and /dev/shm go now, not whenever the garbage collector reaches the
        loaders (a ``test`` after ``fit`` in one process would count the fit's workers' /dev/shm as in use)."""
        for loader in list(self._dali_loaders):
            loader.close()

    @staticmethod
    def splits_read(stage: str, validating: bool = True) -> tuple[str, ...]:
        """The split settings ``stage`` reads: ``fit`` its training split, and its validation split unless it
        trains without validation (``trainer.limit_val_batches 0``: a folder of training shards alone will do);
        ``validate`` and ``test`` the split they score."""
        return {"fit": ("train_split", "val_split") if validating else ("train_split",), "validate": ("val_split",),
                "test": ("test_split",)}.get(stage, ())

    def check_splits(self, stage: str, validating: bool = True) -> None:
        """The splits ``stage`` reads are in the manifest and their shards are there: one line naming the
        split setting or the shard. The CLI calls it before the loggers start (a refused start left a W&B
        run behind), ``setup`` again."""
        for key in self.splits_read(stage, validating):
            try:
                _ = getattr(self, SHARDS_OF[key])
            except ConfigError as e:
                if stage == "fit" and key == "val_split" and str(e).startswith("data.val_split: split "):
                    raise ConfigError(f"{e}; or train without validation: --trainer.limit_val_batches 0") from None
                raise

    def check_trainer_sampler(self) -> None:
        """This module splits each epoch across the ranks itself (the epoch contract). A Trainer of one's own
        with Lightning's default ``use_distributed_sampler=True`` wrapped the ``cpu`` loader's sampler in a
        DistributedSampler under DDP, which split the rank's share again: half the data trained on 2 ranks and
        validation scored 165 of 230 images, without a word (the DALI loaders, no DataLoaders, were left alone).
        The CLI sets it off; anyone else gets one line."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ConfigError("trainer.use_distributed_sampler must be false: ShardDataModule splits every epoch "
                              "across the ranks itself, and Lightning's DistributedSampler would split each "
                              f"rank's share again ({trainer.world_size} ranks would each read 1/"
                              f"{trainer.world_size} of it); pl.Trainer(..., use_distributed_sampler=False)")

    def check_backend(self) -> None:
        """A backend this machine cannot run is a one-line error at start (not a traceback at the first
        batch, after the model summary). The CLI calls it before it makes the trainer, ``setup`` again."""
        backend = self.resolved_backend()
        if backend in ("dali", "dali-cpu"):
            try:
                import nvidia.dali  # noqa: F401
            except ImportError as e:
                raise ConfigError(f"data.backend {backend!r} needs NVIDIA DALI, which does not import here ({e}); "
                                  "install the gpu extra (pip install -e '.[gpu]') or use 'cpu'") from None
        if backend == "dali" and not torch.cuda.is_available():
            raise ConfigError("data.backend 'dali' decodes on a CUDA GPU and this machine has none; use 'dali-cpu' "
                              "or 'cpu' (or 'auto', which picks one)")

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "cpu"
        return "dali" if torch.cuda.is_available() else "cpu"

    def _geometry(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _accumulate(self) -> int:
        """The trainer's gradient accumulation: an epoch is the whole optimizer batches that fit in it."""
        trainer = self.trainer
        return max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1)) if trainer is not None else 1

    def _steps(self, world: int, consumed: int = 0) -> int:
        return steps_in_epoch(len(self.train_shards), world, self.batch_size, consumed, self._accumulate())

    def resume_batches(self, epoch: int) -> int | None:
        """Batches of the current size already done in ``epoch`` when the run resumed in it (else None),
        and from now on the base of the position this datamodule saves (``state_dict``).

        A checkpoint taken at an epoch's end saves the start of the next epoch, while Lightning keeps the
        old epoch's batch count (and may even re-enter that epoch): counted in the checkpoint's batch size,
        it would not end that epoch (or would start the next mid-way) once the batch size changed."""
        if not self._restored:
            return None
        world, _ = self._geometry()
        g = world * self.batch_size
        if not self._start.consumed:
            if g == self._saved_global:  # the same epoch length: Lightning closes the epoch itself
                return None
            if epoch == self._start.epoch:
                return 0
            if epoch == self._start.epoch - 1:  # the saved epoch is complete: all of its batches are done
                return self._steps(world)
            return None
        if epoch != self._start.epoch:
            return None
        if self._start.consumed % g:  # a global batch kept across geometries is a multiple of g
            return None
        if self._start.batches != self._start.consumed // g:
            self._start = replace(self._start, batches=self._start.consumed // g)
        length = self._steps(world)
        said = (epoch, self._start.consumed, g)
        if (self._start.batches >= length and said != self._said_epoch_end
                and self.trainer is not None and self.trainer.is_global_zero):
            self._said_epoch_end = said  # once (the loop asks more than once)
            log.warning(
                "the checkpoint stopped epoch %d after %s, where the epoch ends (%s: whole global"
                " batches of %s x batch %d x accumulate %d), so Lightning starts epoch %d without"
                " validating epoch %d (`python -m pipeline validate --ckpt_path ...` validates the checkpoint)",
                epoch, plural(self._start.consumed, "sample"), plural(length * g, "sample"), plural(world, "rank"),
                self.batch_size, self._accumulate(), epoch + 1, epoch)
        return self._start.batches

    def check_one_global_batch(self, world: int, accumulate: int) -> None:
        """The train split holds at least one optimizer step of ``world`` ranks (Lightning would end
        "successfully" untrained). The CLI calls it once the trainer knows its ranks, before the loggers
        start; ``train_dataloader`` again."""
        if steps_in_epoch(len(self.train_shards), world, self.batch_size, 0, accumulate) == 0:
            raise ConfigError(
                f"the {self.train_split!r} split has {plural(len(self.train_shards), 'sample')}, fewer than one"
                f" global batch ({plural(world, 'rank')} x data.batch_size {self.batch_size} x"
                f" trainer.accumulate_grad_batches {accumulate}): no training step could run"
            )

    def train_dataloader(self):
        world, rank = self._geometry()
        self.check_one_global_batch(world, self._accumulate())
        self.resume_batches(self._start.epoch)  # the resume position in batches of the current size
        sampler = TrainSampler(
            self.train_shards.shard_sizes, self.seed, world, rank, self.batch_size, self.window_shards,
            start=self._start, accumulate=self._accumulate(),
        )
        self._train_sampler = sampler
        if self._start.consumed and rank == 0:
            log.info(
                "resuming epoch %d at sample %d of its order (%s x batch %d)",
                self._start.epoch, self._start.consumed, plural(world, "rank"), self.batch_size,
            )
        return self._loader(self.train_shards, sampler, train=True)

    def set_train_epoch(self, epoch: int) -> None:
        """The epoch whose order the train loader's next iteration reads (see ``LoopPosition``)."""
        if self._train_sampler is not None:
            self._train_sampler.set_epoch(epoch)

    def val_dataloader(self):
        world, rank = self._geometry()
        trainer = self.trainer
        if len(self.val_shards) == 0 and (trainer is None or trainer.limit_val_batches != 0):
            raise ConfigError(  # Lightning would validate nothing, rank no best checkpoint, and say little
                f"the {self.val_split!r} split of {self.root} has no samples: nothing would be validated (nor "
                f"any best checkpoint kept); prepare that split (data_prep --split {self.val_split}), name another "
                f"one with data.val_split, or train without validation: --trainer.limit_val_batches 0")
        batch = eval_batch(self.val_batch_size, len(self.val_shards), world)
        sampler = ValSampler(len(self.val_shards), world, rank, batch)
        return self._loader(self.val_shards, sampler, train=False)

    def test_dataloader(self):
        """The validation's loader over ``data.test_split``: every sample exactly once across the ranks."""
        world, rank = self._geometry()
        if len(self.test_shards) == 0:
            raise ConfigError(f"data.test_split: the {self.test_split!r} split of {self.root} has no samples: "
                              f"nothing to test")
        batch = eval_batch(self.val_batch_size, len(self.test_shards), world)
        sampler = ValSampler(len(self.test_shards), world, rank, batch)
        return self._loader(self.test_shards, sampler, train=False)

    def _loader(self, shards: ShardSet, sampler, train: bool):
        backend = self.resolved_backend()
        if backend == "cpu":
            from pipeline.data.cpu_backend import ShardBatches

            dataset = ShardBatches(shards, self.augment, train, self.seed, self.on_corrupt)
            world, rank = self._geometry()
            method = resolve(self.worker_start_method, world)
            if train and rank == 0 and self.num_workers > 0:
                log.info("cpu loader: %s per rank, started by %s",
                         plural(self.num_workers, "worker process", "worker processes"),
                         "a fork server" if method == "forkserver" else "fork")
            trainer = self.trainer
            if self.num_workers > 0 and (trainer is None or trainer.local_rank == 0):
                batch = self.batch_size if train else self.val_batch_size
                size = self.augment.train_size if train else self.augment.val_size
                ranks_here = trainer.num_devices if trainer is not None else 1
                if warning := shortage(batch, size, self.num_workers, ranks_here, self._cpu_prefetch()):
                    log.warning(warning)
            return torch.utils.data.DataLoader(
                dataset,
                sampler=sampler,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=self._cpu_prefetch() if self.num_workers > 0 else None,
                multiprocessing_context=worker_context(method) if self.num_workers > 0 else None,
                worker_init_fn=shield_worker,  # Slurm signals the workers too
            )
        if backend in ("dali", "dali-cpu"):
            from pipeline.data.dali_backend import DaliLoader

            loader = DaliLoader(
                shards, sampler, self.augment, train=train, seed=self.seed, num_threads=self.num_workers,
                cpu=backend == "dali-cpu", hw_decoder_load=self.dali_hw_decoder_load,
                on_corrupt=self.on_corrupt, py_workers=self.dali_source_workers, prefetch=self.prefetch_batches,
                ranks_here=self.trainer.num_devices if self.trainer is not None else 1,
            )
            self._dali_loaders.add(loader)
            return loader
        from pipeline.data.synthetic import SyntheticLoader

        size = self.augment.train_size if train else self.augment.val_size
        return SyntheticLoader(sampler, size, shards.num_classes)

    def _cpu_prefetch(self) -> int:
        return self.prefetch_batches or 2  # torch's own default

    # ---- position in the checkpoint -----------------------------------------------------------------
    def state_dict(self) -> dict:
        trainer = self.trainer
        state = dict(self.dataset_record())
        if trainer is None:
            return state
        world, _ = self._geometry()
        g = world * self.batch_size
        epoch = trainer.current_epoch
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        acc = self._accumulate()
        if done % acc and not epoch_finished(trainer):
            # a stop between two optimizer steps (trainer.max_time, any should_stop: Lightning stops after any
            # micro-batch): the weights hold the last step only, so the position is that step's; the
            # micro-batches after it are trained again after the resume (LoopPosition restates the count)
            if trainer.is_global_zero:
                left = done % acc
                log.info("saving at step %d, between two optimizer steps: the last %s of accumulation %s not"
                         " applied and %s trained again after a resume", trainer.global_step,
                         plural(left, "micro-batch", "micro-batches"),
                         *(("was", "is") if left == 1 else ("were", "are")))
            done -= done % acc
        seed, window = self.seed, self.window_shards  # those of this epoch's order
        if epoch == self._start.epoch and self._start.consumed:
            consumed = self._start.consumed + (done - self._start.batches) * g
            seed = seed if self._start.seed is None else self._start.seed
            window = window if self._start.window_shards is None else self._start.window_shards
        else:
            consumed = done * g
        if epoch_finished(trainer) or self._steps(world, consumed) == 0:
            # the epoch is complete (also one that limit_train_batches cut): the next one starts fresh
            epoch, consumed, done = epoch + 1, 0, 0
            seed, window = self.seed, self.window_shards
        state.update(epoch=epoch, consumed=consumed, batches=done, world_size=world, batch_size=self.batch_size,
                     accumulate=int(trainer.accumulate_grad_batches), seed=seed, window_shards=window)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._check_same_dataset(state)
        if "epoch" in state:
            self._start = Position(
                int(state["epoch"]), int(state["consumed"]), int(state.get("batches", 0)),
                seed=_int_or_none(state.get("seed")), window_shards=_int_or_none(state.get("window_shards")),
            )
            self._restored = True
            order = (self._start.seed, self._start.window_shards)
            if (self._start.consumed and order != (self.seed, self.window_shards) and None not in order
                    and (self.trainer is None or self.trainer.is_global_zero)):  # said once, not by every rank
                log.warning(
                    "data.seed %d / data.window_shards %d differ from the checkpoint's (%d / %d): epoch %d"
                    " finishes in the order it started with (the same samples, none repeated or skipped; their"
                    " crops and flips follow the new seed already), the new order applies from the next epoch",
                    self.seed, self.window_shards, *order, self._start.epoch,
                )
            self._saved_global = int(state.get("world_size", 0)) * int(state.get("batch_size", 0))

    # ---- which dataset a checkpoint was trained on ----------------------------------------------------
    def _manifest(self) -> dict:
        path = Path(self.root) / MANIFEST_NAME
        return json.loads(path.read_bytes()) if path.is_file() else {}

    def dataset_record(self) -> dict:
        """Which dataset this start trains on (``classes_sha256``, ``splits_sha256``; and the manifest's ``classes``
        and ``class_names``, the meaning of each label), read once, at its start:
        read at every save, a manifest deleted or rewritten during the run (``data.root`` removed: the open shards
        still read) put digests of nothing into every later checkpoint, which its own data then refused."""
        if self._dataset_record is None:
            manifest = self._manifest()
            self._dataset_record = {"classes_sha256": self.classes_digest(), "splits_sha256": self.split_digests(),
                                    # what each output means, for `export` (OUT.classes.json beside OUT) and its users
                                    **{k: manifest[k] for k in ("classes", "class_names") if k in manifest}}
        return self._dataset_record

    def classes_digest(self) -> str:
        """What the labels mean: the manifest's class list (its ids, in label order)."""
        return _digest(self._manifest().get("classes"))

    def split_digests(self) -> dict[str, str]:
        """Each split's shards (names, sample counts, sha256): which images it holds."""
        return {name: _digest([[s.get("name"), s.get("samples"), s.get("sha256")] for s in split.get("shards", [])])
                for name, split in self._manifest().get("splits", {}).items()}

    def _check_same_dataset(self, state: dict) -> None:
        """The checkpoint's dataset: the same classes, and every split it recorded that is still there holds
        the same shards (the training split's are what the position counts; a validation split prepared
        again, another hold-out, could hold images the checkpoint trained on). A split added to the shard
        directory after the training is no other dataset: the whole manifest's digest locked such a run out
        of its own resume, validate and test. ``fit`` needs its training split as recorded."""
        manifest = f"{self.root}/{MANIFEST_NAME}"
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        advice = "(start a new run directory, or point data.root back)"
        if not fitting:  # an evaluation has no run to start
            # (a trainer that has not been given a checkpoint path, e.g. the module loaded by hand: none to name)
            sub = str(getattr(self.trainer.state.fn, "value", self.trainer.state.fn))
            ckpt = getattr(self.trainer, "ckpt_path", None)
            advice = way_out(sub, ckpt, self.root, weights_on_this_data=True)
        if "classes_sha256" not in state:  # a checkpoint of before the split-wise digests: the whole file
            saved = state.get("manifest_sha256")
            path = Path(manifest)
            if saved is None or saved == (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""):
                return
            if fitting:
                raise ConfigError(f"the checkpoint was trained on another dataset: {manifest} differs from the "
                                  f"manifest the checkpoint recorded (a checkpoint of before per-split records: a "
                                  f"split added since changes the file too; remove it from the manifest, or start "
                                  f"a new run directory)")
            log.warning("%s differs from the manifest the checkpoint recorded, which was written before per-split "
                        "records: a split added since, or another dataset; the classes are not checked", manifest)
            return
        if state["classes_sha256"] != self.classes_digest():
            if not fitting:  # its weights scored on these classes would mean nothing
                advice = way_out(sub, ckpt, self.root, weights_on_this_data=False)
            raise ConfigError(f"the checkpoint was trained on another dataset: the classes of {manifest} differ "
                              f"from those the checkpoint recorded (its labels would mean other classes) {advice}")
        now, saved = self.split_digests(), state.get("splits_sha256") or {}
        if fitting and saved.get(self.train_split) != now.get(self.train_split):
            raise ConfigError(f"the checkpoint was trained on another dataset: the {self.train_split!r} split "
                              f"(data.train_split) of {manifest} has other shards than those the checkpoint's "
                              f"position counts {advice}")
        changed = sorted(name for name, digest in saved.items() if name in now and now[name] != digest)
        if changed:
            splits = f"split {changed[0]}" if len(changed) == 1 else f"splits {', '.join(changed)}"
            hold = "holds" if len(changed) == 1 else "hold"
            raise ConfigError(f"the checkpoint was trained on another dataset: {splits} of "
                              f"{manifest} {hold} other shards than when the checkpoint was written (prepared again: "
                              f"another seed or hold-out could put its training images there) {advice}")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)
