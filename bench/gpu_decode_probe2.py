"""Second probe: is it the external source or a decoder flag that keeps DaliLoader off the hardware JPEG
decoder? Same shards as gpu_decode_probe.py; decode only, hw_decoder_load 0.75."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpu_decode_probe import pipeline_rate  # bench/ is on sys.path when run as bench/gpu_decode_probe2.py
from data_prep.format import index_name_of  # after it: importing gpu_decode_probe puts the repository on sys.path
from pipeline.data.shards import ShardSet

ROOT = Path("/tmp/gpu-loader-bench/shards")


def rate(pipe, steps: int = 50) -> float:
    return pipeline_rate(pipe, steps, warmup=8)


def main() -> None:
    from nvidia.dali import fn, pipeline_def, types

    shards = ShardSet(ROOT, "train")
    tars = [str(ROOT / n) for n in shards.shard_names]
    idxs = [str(ROOT / index_name_of(n)) for n in shards.shard_names]
    data = [np.frombuffer(shards.read_jpeg(i), dtype=np.uint8) for i in range(4096)]

    @pipeline_def(batch_size=256, num_threads=8, device_id=0)
    def reader(adjust: bool):
        jpg = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg"])
        return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=0.75,
                                 adjust_orientation=adjust)

    class Src:
        def __init__(self):
            self.i = 0

        def __call__(self):
            b = [data[(self.i + k) % len(data)] for k in range(256)]
            self.i += 256
            return b

    @pipeline_def(batch_size=256, num_threads=8, device_id=0)
    def ext(dtype_hint: bool):
        kw = {"dtype": types.UINT8, "ndim": 1} if dtype_hint else {}
        jpg = fn.external_source(source=Src(), batch=True, **kw)
        return fn.decoders.image(jpg, device="mixed", output_type=types.RGB, hw_decoder_load=0.75)

    print(f"reader, adjust_orientation=True : {rate(reader(True)):9,.0f} img/s", flush=True)
    print(f"reader, adjust_orientation=False: {rate(reader(False)):9,.0f} img/s", flush=True)
    print(f"external_source inline, no dtype : {rate(ext(False)):9,.0f} img/s", flush=True)
    print(f"external_source inline, uint8 1-D: {rate(ext(True)):9,.0f} img/s", flush=True)


if __name__ == "__main__":
    main()
