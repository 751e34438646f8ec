"""Where does DALI decoding time go on a GPU? A probe run after bench/gpu_loader.py measured 9.8k img/s
for DaliLoader's decode+augment (target 25k). It times, on the same shards, in one process:
a plain DALI webdataset-reader pipeline (decode only; decode + random crop + resize), and DaliLoader with
several source-worker / thread counts. Run like bench/run_gpu.sh (DALI unpacked in /tmp/site)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_loader as g  # noqa: E402
import torch  # noqa: E402

from data_prep.format import index_name_of  # noqa: E402
from pipeline.data.augment import AugmentConfig  # noqa: E402
from pipeline.data.contract import TrainSampler  # noqa: E402
from pipeline.data.shards import ShardSet  # noqa: E402


def reader_rate(tars, idxs, mode: str, hw: float, threads: int, steps: int = 60) -> float:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=256, num_threads=threads, device_id=0, prefetch_queue_depth=3)
    def pipe():
        jpg = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg"], random_shuffle=True,
                                    initial_fill=1024, name="r")
        if mode == "decode":
            return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=hw)
        img = fn.decoders.image_random_crop(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=hw)
        img = fn.resize(img, size=(224, 224))
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT16, output_layout="HWC",
                                        mirror=fn.random.coin_flip())

    return pipeline_rate(pipe(), steps, warmup=10)


def pipeline_rate(p, steps: int, warmup: int, batch: int = 256) -> float:
    """Images/s of a DALI pipeline's ``run()`` after ``warmup`` runs (the probes' shared timing loop)."""
    p.build()
    for _ in range(warmup):
        p.run()
    t0 = time.perf_counter()
    for _ in range(steps):
        p.run()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    from pipeline.data.dali_backend import DaliLoader

    shards_dir = g.make_shards(Path("/tmp/gpu-loader-bench"), 20000, os.cpu_count() or 2)
    shards = ShardSet(shards_dir, "train")
    tars = [str(shards_dir / n) for n in shards.shard_names]
    idxs = [str(shards_dir / index_name_of(n)) for n in shards.shard_names]
    dev = torch.device("cuda")
    for mode in ("decode", "crop"):
        for hw in (0.0, 0.75):
            print(f"readers.webdataset {mode:6s} hw={hw}: {reader_rate(tars, idxs, mode, hw, 8):9,.0f} img/s",
                  flush=True)
    cfg = AugmentConfig(recipe="imagenet", train_size=224)
    for threads, workers, roi in ((8, 5, False), (8, 10, False), (4, 12, False), (8, 5, True)):
        sampler = TrainSampler(shards.shard_sizes, seed=0, world_size=1, rank=0, batch_size=256)
        dl = DaliLoader(shards, sampler, cfg, train=True, seed=0, num_threads=threads, cpu=False,
                        hw_decoder_load=0.75, py_workers=workers, prefetch=3, roi_decode=roi)
        rate = g.decode_rate(dl, 80, 10, dev)
        print(f"DaliLoader threads={threads} py_workers={workers} roi_decode={roi}: {rate:9,.0f} img/s", flush=True)
        del dl


if __name__ == "__main__":
    main()
