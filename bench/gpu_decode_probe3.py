"""Third probe: DaliLoader's decode+augment rate once the parallel source computes several batches ahead."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_loader as g  # noqa: E402
import torch  # noqa: E402

from pipeline.data.augment import AugmentConfig  # noqa: E402
from pipeline.data.contract import TrainSampler  # noqa: E402
from pipeline.data.dali_backend import DaliLoader  # noqa: E402
from pipeline.data.shards import ShardSet  # noqa: E402


def main() -> None:
    shards = ShardSet(g.make_shards(Path("/tmp/gpu-loader-bench"), 20000, 16), "train")
    for threads, workers in ((8, 8),):
        sampler = TrainSampler(shards.shard_sizes, seed=0, world_size=1, rank=0, batch_size=256)
        dl = DaliLoader(shards, sampler, AugmentConfig(), train=True, seed=0, num_threads=threads, cpu=False,
                        hw_decoder_load=0.75, py_workers=workers, prefetch=3)
        print(f"DaliLoader threads={threads} py_workers={workers}: "
              f"{g.decode_rate(dl, 80, 10, torch.device('cuda')):9,.0f} img/s", flush=True)
        del dl


if __name__ == "__main__":
    main()
