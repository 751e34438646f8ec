"""The DALI backends: "dali" decodes and augments on the GPU (nvJPEG, hardware decoder), "dali-cpu" runs
the same pipeline on the CPU (``device_id=None``).

The contract's sampler decides the samples and their order; DALI only turns bytes into pixels. Each epoch
the sampler's batches are written to a small plan file, and ``fn.external_source`` in batch mode calls
``dali_source.BatchSource`` with ``BatchInfo(iteration, epoch_idx)``: it reads row ``iteration`` of plan
``epoch_idx``, fetches the JPEG bytes and labels with ``ShardSet`` (``os.pread``) and draws every sample's
crop box and flip with ``augment.train_params`` from ``sample_rng(seed, epoch, position)``, exactly as the
cpu backend does. So both backends cut the same boxes of the same samples, and a resumed or re-sharded
run augments each sample as the uninterrupted one would. With ``py_workers > 0`` the source runs in
DALI's parallel worker processes (spawned; they keep running across epochs, the pipeline is reset with
the next plan); with ``py_workers=0`` it runs inline.

The per-sample Python is the byte reading and the header parse in the source; on the GPU decoding,
cropping, resizing, flipping and normalising are DALI operators. On the CPU ("dali-cpu") DALI decodes
(only the crop window, for imagenet training) and the imagenet resizes are done by torchvision's
vectorised uint8 kernel (``resize="torch"``, the cpu backend's own transforms): DALI's CPU resize costs
about three times as much per image (bench/loader.py). ``resize="dali"`` runs the GPU's graph on the CPU
(the tests use it to check that graph without a GPU).

Corrupt samples: the source checks each JPEG's structure (SOI, a frame header with a size, an EOI after
it). A sample failing that is never given to DALI: "fail" raises ``CorruptSampleError`` naming the shard,
"skip" masks it (valid=False, a good sample of the batch stands in), logs and counts it. A sample that
passes the check but that DALI's decoder rejects stops the pipeline; that batch is then decoded by the
cpu backend's decoder (which raises or masks per sample, under the same policy) and a fresh pipeline
continues with the next batch. Damage PIL and libjpeg decode without an error (flipped bits in the
entropy-coded data) is not detected by either backend.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import weakref

import numpy as np
import torch

from pipeline.data.augment import AugmentConfig
from pipeline.data.contract import PAD
from pipeline.data.cpu_backend import ShardBatches, augment_eval, resize_and_flip
from pipeline.data.dali_source import BatchSource
from pipeline.data.shards import CorruptSampleError, ShardSet
from pipeline.data.shared_memory import SharedMemoryError, dali_shortage
from pipeline.data.worker_signals import spawned_without_preemption_signals
from pipeline.data.worker_watchdog import WorkerWatchdog, describe_death
from pipeline.temp_dir import temp_folder

log = logging.getLogger(__name__)

# /dev/shm the live pipelines' source workers fill in this process, by loader (training and validation run
# side by side): a loader's room check counts the others'
_SHM_HELD: dict[int, tuple[str, int]] = {}
_LOADER_KEYS = itertools.count()


class DaliLoader:
    """An iterable of (images, labels, valid) per step of the sampler, made by a DALI pipeline.

    images: float16 normalised with ``cfg.mean``/``cfg.std`` (GPU), or uint8 like the cpu backend's (CPU: the
    module normalises them), shape (B, 3, H, W) in channels_last memory. labels: int64. valid: bool, False
    for padding and skipped corrupt samples.

    Args:
        shards: the split's samples.
        sampler: a contract ``TrainSampler``/``ValSampler`` (exposed as ``.sampler``; Lightning sets its epoch).
        cfg: the augmentation recipe.
        train: training augmentation (else the evaluation transform).
        seed: seed of the per-sample augmentation draws (the same as the cpu backend's).
        num_threads: DALI's CPU threads.
        cpu: run on the CPU ("dali-cpu"); else on ``torch.cuda.current_device()``.
        hw_decoder_load: share of JPEGs for the GPU's hardware decoder ("dali" only).
        on_corrupt: "fail" or "skip" (see the module docstring).
        py_workers: processes running the source (0: inline; None: 0 on the CPU, max(1, min(4, num_threads // 2))
            on the GPU).
        prefetch: batches DALI prepares ahead.
        roi_decode: decode only the crop window (imagenet training), the default. DALI's decoders (nvImageCodec)
            cut regions on the hardware decoder too: an H100 probe decoded random crops at 30.5k img/s against
            24.6k for whole images (docs/loaders.md). False decodes whole images and lets the resize cut the
            window; the result is the same up to resampling (tested).
        resize: where the imagenet recipe's resizes run: "dali" (``fn.resize``) or "torch" (torchvision on
            DALI's decoded window, in this process; CPU only). Default: "torch" on the CPU, "dali" on the GPU.
        ranks_here: training processes on this machine, which share its ``/dev/shm`` (the source workers'
            batches: ``dali_shortage``).
    """

    batch_sampler = None  # Lightning looks for a sampler or a batch sampler to call set_epoch on

    def __init__(
        self,
        shards: ShardSet,
        sampler,
        cfg: AugmentConfig,
        train: bool,
        seed: int = 0,
        num_threads: int = 4,
        cpu: bool = False,
        hw_decoder_load: float = 0.75,
        on_corrupt: str = "fail",
        py_workers: int | None = None,
        prefetch: int | None = None,
        roi_decode: bool | None = None,
        resize: str | None = None,
        ranks_here: int = 1,
    ) -> None:
        if on_corrupt not in ("fail", "skip"):
            raise ValueError(f"data.on_corrupt must be 'fail' or 'skip', got {on_corrupt!r}")
        if not cpu and not torch.cuda.is_available():
            raise RuntimeError("data.backend 'dali' needs a CUDA GPU; use 'dali-cpu' or 'cpu' on this machine")
        self.shards, self.sampler, self.cfg, self.train, self.seed = shards, sampler, cfg, train, seed
        self.num_threads = max(1, int(num_threads))
        self.cpu, self.hw_decoder_load, self.on_corrupt = cpu, float(hw_decoder_load), on_corrupt
        if py_workers is None:
            py_workers = 0 if cpu else max(1, min(4, self.num_threads // 2))
        self.py_workers = int(py_workers)
        # batches computed ahead: 3 on the GPU, as bench/gpu_loader.py measured it (MLPerf's DALI loaders use 3-5)
        self.prefetch = max(1, int(prefetch if prefetch is not None else (2 if cpu else 3)))
        self.roi_decode = True if roi_decode is None else bool(roi_decode)
        resize = resize or ("torch" if cpu else "dali")
        if resize not in ("dali", "torch") or (resize == "torch" and not cpu):
            raise ValueError(f"resize must be 'dali' or, on the CPU, 'torch'; got {resize!r}")
        # torchvision finishes the imagenet recipe; cifar needs no resampling and stays in DALI
        self.torch_resize = resize == "torch" and cfg.recipe == "imagenet"
        self.size = cfg.train_size if train else cfg.val_size
        self.ranks_here = max(1, int(ranks_here))
        self.corrupt_seen = 0
        self._plan_dir = temp_folder("dali-plan-", "the DALI loader writes its epoch plans to")
        self._live = LivePipeline()
        self._watchdog = WorkerWatchdog(  # over the live pipeline's source worker processes
            "a DALI source worker process",
            "DALI cannot go on without it (data.dali_source_workers 0 reads the samples in the training process instead)",
        )
        self._pipe_epoch = -1  # DALI's epoch_idx of the last plan given to the live pipeline
        self._clean = False  # the live pipeline ended its last epoch and can be reset for the next
        self._device = torch.device("cpu")
        self._shm_key = next(_LOADER_KEYS)  # its entry in _SHM_HELD while its pipeline lives
        self._finalizer = weakref.finalize(self, _release, self._plan_dir, self._watchdog, self._shm_key, self._live)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def _pipe(self):
        return self._live.pipe

    @_pipe.setter
    def _pipe(self, pipe) -> None:
        self._live.pipe = pipe

    def close(self) -> None:
        """Stop the pipeline and its source workers now (their /dev/shm freed); the next iteration builds a
        fresh one. The datamodule calls it when a fit, validate or test ends."""
        self._close()

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    # ---- the pipeline -------------------------------------------------------------------------------
    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        cfg, train, cpu = self.cfg, self.train, self.cpu
        device_id = None if cpu else torch.cuda.current_device()
        parallel = self.py_workers > 0
        source = BatchSource(self.shards, self._plan_dir, cfg, train, self.seed)
        norm_mean = [255.0 * m for m in cfg.mean]
        norm_std = [255.0 * s for s in cfg.std]
        dtype = types.UINT8 if cpu else types.FLOAT16
        if cpu:  # uint8 out, as the cpu backend: the module normalises
            norm_mean, norm_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        dec = "cpu" if cpu else "mixed"
        # nvJPEG's buffers sized for all of ImageNet up front (DeepLearningExamples' ConvNets dali.py values):
        # grown on a larger image instead, each regrowth frees device memory, which waits for the device.
        # affine=False: the OS places the decoder's threads; pinned by NVML's hint they may land outside a
        # Slurm step's CPU set (NVIDIA/DALI#1209, #1465), and every rank of a node would pin the same cores.
        hw = {} if cpu else {"hw_decoder_load": self.hw_decoder_load, "device_memory_padding": 211025920,
                             "host_memory_padding": 140544512, "affine": False}
        linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)
        size = self.size
        roi_decode = self.roi_decode
        torch_resize = self.torch_resize
        # shared memory per sample for the workers' results (DALI grows it when a batch needs more)
        hint = int(1.5 * float(self.shards.sizes.mean())) + 1024 if len(self.shards) else 1 << 16
        extra = {"py_num_workers": self.py_workers, "py_start_method": "spawn"} if parallel else {}
        if parallel and len(self.shards):  # a full /dev/shm is a SIGBUS in a worker or in this process
            # (sample_bytes was once named mean, and replaced the normalisation's: with source workers every
            # image came out 0 on the CPU and garbage on the GPU, from 2026-12-05 to 2026-12-07)
            batches, sample_bytes = self.prefetch + 2 * self.py_workers, float(self.shards.sizes.mean())
            others = [held for key, held in _SHM_HELD.items() if key != self._shm_key]
            error = dali_shortage(batches, self.sampler_batch_size(), sample_bytes, self.py_workers, self.ranks_here,
                                  held=sum(n for _, n in others), held_by=" and ".join(w for w, _ in others))
            if error:
                raise SharedMemoryError(error)
            _SHM_HELD[self._shm_key] = ("training" if train else "validation",
                                        int(batches * self.sampler_batch_size() * sample_bytes))

        @pipeline_def(batch_size=self.sampler_batch_size(), num_threads=self.num_threads, device_id=device_id,
                      prefetch_queue_depth=self.prefetch, **extra)
        def pipe():
            # prefetch_queue_depth: batches the workers compute ahead; at DALI's default of 1 the workers take
            # turns on one batch and the source caps the pipeline (9.8k img/s on an H100, whatever the count)
            es = ({"parallel": True, "bytes_per_sample_hint": hint, "prefetch_queue_depth": 2 * self.py_workers}
                  if parallel else {})
            if train:
                jpegs, anchor, shape, flip, labels, valid = fn.external_source(
                    source=source, num_outputs=6, batch=True, batch_info=True, **es
                )
            else:
                jpegs, labels, valid = fn.external_source(
                    source=source, num_outputs=3, batch=True, batch_info=True, **es
                )
                flip = 0
            if torch_resize:  # DALI decodes (the window, in training); _finish_in_torch resizes
                if train:
                    images = fn.decoders.image_slice(
                        jpegs, anchor, shape, device=dec, output_type=types.RGB, axis_names="HW",
                        normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
                    )
                    return images, flip, labels, valid
                images = fn.decoders.image(jpegs, device=dec, output_type=types.RGB, adjust_orientation=False)
                return images, labels, valid
            if train and cfg.recipe == "imagenet" and roi_decode:
                # decode only the random-resized-crop window, then scale it to the training size
                images = fn.decoders.image_slice(
                    jpegs, anchor, shape, device=dec, output_type=types.RGB, axis_names="HW",
                    normalized_anchor=False, normalized_shape=False, adjust_orientation=False, **hw,
                )
                images = fn.resize(images, size=(size, size), **linear)
            elif train and cfg.recipe == "imagenet":
                # decode whole images, then scale the window to the training size in one resampling
                images = fn.decoders.image(jpegs, device=dec, output_type=types.RGB, adjust_orientation=False, **hw)
                images = fn.resize(images, size=(size, size), roi_start=anchor, roi_end=anchor + shape,
                                   roi_relative=False, **linear)
            else:
                images = fn.decoders.image(jpegs, device=dec, output_type=types.RGB, adjust_orientation=False, **hw)
                if train:  # cifar: the image-sized window of the image padded with cfg.pad_fill
                    images = fn.slice(images, anchor, shape, axis_names="HW", normalized_anchor=False,
                                      normalized_shape=False, out_of_bounds_policy="pad",
                                      fill_values=list(cfg.pad_rgb()))
                    images = fn.resize(images, size=(size, size), **linear)
                elif cfg.recipe == "imagenet":
                    images = fn.resize(images, resize_shorter=cfg.val_resize, **linear)
                else:
                    images = fn.resize(images, size=(size, size), **linear)
            images = fn.crop_mirror_normalize(
                images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, mirror=flip, mean=norm_mean,
                std=norm_std, dtype=dtype, output_layout="HWC",
            )
            return images, labels, valid

        p = pipe()
        before = set(multiprocessing.active_children())
        with spawned_without_preemption_signals():  # the source's worker processes start here
            p.build()
        self._watchdog.watch([c for c in multiprocessing.active_children() if c not in before])
        return p

    def sampler_batch_size(self) -> int:
        return int(getattr(self.sampler, "batch_size", 0) or self.sampler.batches.shape[1])

    def _close(self) -> None:
        dead = self._watchdog.dead()
        if dead is not None:  # between epochs: fresh workers for the next one
            log.warning("%s Starting fresh source workers.", describe_death(dead, self._watchdog.what))
            with self._watchdog.waiting():  # DALI's close waits forever on a queue lock the dead worker held
                self._live.shut_down()
        self._watchdog.stop()
        self._live.shut_down()  # its source workers too
        self._clean, self._pipe_epoch = False, -1
        _SHM_HELD.pop(self._shm_key, None)

    def _start(self, plan: np.ndarray) -> None:
        """Give ``plan`` to the pipeline: reset the live one for its next epoch, or build a fresh one."""
        if self._pipe is not None and self._clean and self._watchdog.dead() is None:
            # the plan before the ended epoch's goes (a task of the ended epoch scheduled past its end may still
            # be in a worker, and load its plan): ImageNet's are about 30 MB an epoch per node, kept they took
            # 2.7 GB of $TMPDIR in 90 epochs
            if self._pipe_epoch > 0:
                os.remove(os.path.join(self._plan_dir, f"plan-{self._pipe_epoch - 1}.npy"))
            self._pipe_epoch += 1
            np.save(os.path.join(self._plan_dir, f"plan-{self._pipe_epoch}.npy"), plan)
            with self._watchdog.waiting():
                self._pipe.reset()  # schedules the new epoch's first batches, which read the plan just written
        else:
            self._close()
            self._pipe_epoch = 0
            for old in os.listdir(self._plan_dir):
                os.remove(os.path.join(self._plan_dir, old))
            np.save(os.path.join(self._plan_dir, "plan-0.npy"), plan)
            self._device = torch.device("cpu") if self.cpu else torch.device("cuda", torch.cuda.current_device())
            self._pipe = self._build()
        self._clean = False

    # ---- iteration ----------------------------------------------------------------------------------
    def __iter__(self):
        rows = list(self.sampler)
        b = self.sampler_batch_size()
        plan = np.stack(rows) if rows else np.zeros((0, 3, b), dtype=np.int64)
        return self._epoch(plan)

    def _epoch(self, plan: np.ndarray):
        """The batches of ``plan``. A batch DALI fails on comes from the cpu backend, and a fresh pipeline
        takes the rest of the plan (in this loop: a generator per failure, nested, made every later batch
        pass through all of them, and a thousand failures in an epoch were a RecursionError)."""
        while True:
            self._start(plan)
            failed = None
            for step in range(len(plan)):
                self._watchdog.check()
                try:
                    with self._watchdog.waiting():
                        outs = self._pipe.run(self._output_stream())
                except StopIteration:
                    raise RuntimeError(f"the DALI pipeline ended after {step} of {len(plan)} batches") from None
                except Exception as e:  # a decoder error: this batch by the cpu backend, then a fresh pipeline
                    self._watchdog.check_after_error()  # (not a lost worker)
                    if _out_of_memory(e):  # not the batch's fault: the next pipeline would fail the same way
                        raise RuntimeError(f"DALI ran out of memory: {_first_line(e)}; lower data.batch_size or "
                                           f"data.num_workers (DALI's threads), or free the GPU") from e
                    self._close()
                    failed = step
                    yield self._cpu_batch(plan[step], e)
                    break
                batch = self._to_torch(outs, plan[step])  # copied out of DALI's buffers, or owning its memory
                if step == len(plan) - 1:
                    self._end_epoch()  # now: the consumer stops after len(plan) batches (Lightning does)
                yield batch
            if failed is None:
                if len(plan) == 0:
                    self._end_epoch()
                return
            plan = plan[failed + 1 :]

    def _output_stream(self) -> torch.cuda.Stream | None:
        """On the GPU (outputs that own their memory): torch's current stream, which DALI's outputs are then
        ready on, without a host wait, and in whose order their memory is freed: after the training kernels
        queued on it read the batch (DALI's stream-aware outputs, NVIDIA/DALI#5684). Host-synchronous outputs
        are freed in host order when the batch is dropped, while kernels queued on torch's stream may still
        read them. Not yet measured on a GPU (bench/run_gpu.sh)."""
        if self.cpu or not getattr(self._pipe, "exec_dynamic", False):
            return None
        return torch.cuda.current_stream(self._device)

    def _end_epoch(self) -> None:
        """Run the pipeline into the plan's end, so that the next epoch resets it instead of rebuilding it
        (and respawning its source workers)."""
        try:
            with self._watchdog.waiting():
                self._pipe.run()
        except StopIteration:
            self._clean = True

    def _to_torch(self, outs, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        *pixels, labels, valid = outs  # pixels: images, or (CPU, torch resize, training) windows and flips
        lab = torch.from_numpy(np.array(labels.as_tensor(), copy=True))
        ok = torch.from_numpy(np.array(valid.as_tensor(), copy=True).astype(bool))
        self._check_corrupt(rows[0], ok.numpy())
        if self.torch_resize:
            return self._finish_in_torch(*pixels), lab, ok
        images = pixels[0].as_tensor()
        if getattr(self._pipe, "exec_dynamic", False):  # outputs own their memory: share it, no copy
            with self._device:
                out = torch.from_dlpack(images)
        else:  # the buffers are recycled by the next run: copy
            from nvidia.dali.plugin.pytorch import feed_ndarray

            out = torch.empty(images.shape(), dtype=torch.uint8 if self.cpu else torch.float16, device=self._device)
            feed_ndarray(images, out, cuda_stream=None if self.cpu else torch.cuda.current_stream(self._device))
        if not self.cpu:  # from pinned memory: a copy from pageable memory may wait for the stream's queued work
            lab = lab.pin_memory().to(self._device, non_blocking=True)
            ok = ok.pin_memory().to(self._device, non_blocking=True)
        return out.permute(0, 3, 1, 2), lab, ok  # NCHW shape, channels_last memory

    def _finish_in_torch(self, decoded, flips=None) -> torch.Tensor:
        """CPU, imagenet recipe: DALI's decoded windows (training, with their flips) or images resized with
        the cpu backend's torchvision transforms into a uint8 channels_last batch."""
        flips = np.asarray(flips.as_tensor()) if flips is not None else None
        size = self.size
        batch = torch.empty((len(decoded), size, size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        with _one_torch_thread():  # small per-image kernels: a thread pool only fights DALI's threads
            for i in range(len(decoded)):
                x = torch.from_numpy(np.asarray(decoded[i])).permute(2, 0, 1)  # HWC memory: a channels_last view
                if flips is not None:  # training: the decoded window
                    batch[i].copy_(resize_and_flip(x, self.cfg, bool(flips[i])))
                else:
                    batch[i].copy_(augment_eval(x, self.cfg))
        return batch

    def _check_corrupt(self, ids: np.ndarray, valid: np.ndarray) -> None:
        for j in np.flatnonzero(~valid & (ids != PAD)):
            sid = int(ids[j])
            try:  # the source masks a broken JPEG or a label outside the classes; say which
                self.shards.read_label(sid)
                reason = "not a whole JPEG"
            except ValueError as e:
                reason = str(e)
            msg = f"corrupt {self.shards.describe(sid)}: {reason}"
            if self.on_corrupt == "fail":
                raise CorruptSampleError(msg)
            log.warning("skipping %s", msg)
            self.corrupt_seen += 1

    def _cpu_batch(self, rows: np.ndarray, error: Exception) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch DALI failed on, decoded sample by sample by the cpu backend under the same corrupt policy."""
        cpu = ShardBatches(self.shards, self.cfg, self.train, self.seed, self.on_corrupt)
        try:
            images, labels, valid = cpu[rows]
        except CorruptSampleError as e:
            raise CorruptSampleError(f"{e} (DALI: {_first_line(error)})") from None
        bad = int((~valid.numpy() & (rows[0] != PAD)).sum())
        self.corrupt_seen += bad  # ShardBatches logged each one with its shard
        if bad == 0:
            # DALI prepares batches ahead: its error may be of a later batch than this one, which the cpu backend
            # then decodes whole (it said "DALI failed on a batch that the cpu backend decodes", and the next
            # batch's error named the same sample)
            log.warning("DALI stopped (%s) at this batch or one it was preparing; the cpu backend decoded this "
                        "one, a fresh pipeline goes on", _first_line(error))
        if self.cpu:  # uint8, as the pipeline's own batches
            return images.contiguous(memory_format=torch.channels_last), labels, valid
        mean = torch.tensor(self.cfg.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.cfg.std).view(1, 3, 1, 1) * 255
        x = ((images.float() - mean) / std).to(self._device, torch.float16).contiguous(memory_format=torch.channels_last)
        return x, labels.to(self._device), valid.to(self._device)


def _out_of_memory(error: BaseException) -> bool:
    """DALI's allocation failures (CUDA, pinned host or host memory), which a CPU retry of the batch does not cure."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(k in text for k in ("out of memory", "bad_alloc", "cudaerrormemoryallocation"))


@contextlib.contextmanager
def _one_torch_thread():
    """torch's intra-op threads set to 1 for the block (measured on 2 cores: 2,064 img/s against 1,548
    with torch's default of one thread per core competing with DALI's threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class LivePipeline:
    """A loader's DALI pipeline, held apart from the loader so that the loader's finalizer can shut it down.

    A pipeline that only the cyclic garbage collector frees (its loader in a reference cycle, as the trainer's
    objects are) had its source workers' pool closed before its own executor stopped: there weakref callbacks
    (the pool's close) run before ``__del__`` (the executor's shutdown), the reverse of a free by reference
    count (tests/test_dali_backend.py records the order). Held here, the pipeline outlives its loader until
    ``shut_down`` has stopped its executor, and is then freed in the safe order.
    """

    def __init__(self) -> None:
        self.pipe = None

    def shut_down(self) -> None:
        """Stop the executor (DALI's own exit hook calls the same ``_shutdown``), then drop the pipeline,
        which closes its source workers' pool."""
        pipe, self.pipe = self.pipe, None
        shutdown = getattr(pipe, "_shutdown", None)
        if shutdown is not None:
            shutdown()


def _release(plan_dir: str, watchdog: WorkerWatchdog, shm_key: int, live: LivePipeline) -> None:
    _SHM_HELD.pop(shm_key, None)
    if watchdog.dead() is None:  # else it stays to end a process that DALI's close would hang
        watchdog.stop()
        live.shut_down()
    shutil.rmtree(plan_dir, ignore_errors=True)


def _first_line(error: Exception) -> str:
    """The line of a DALI error that says what went wrong. DALI's messages open with headings ("Critical
    error in pipeline:") and the operator's traceback; the cause follows "encountered:"."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1].rstrip(" :")
    said = [line for line in lines if not line.endswith(":")]
    return (said or lines or [repr(error)])[0]
