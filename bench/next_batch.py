"""How long one rank's read of a step takes (Loader._read: the tokens, the masks), the seed's share per rank: 60
samples of 4096 tokens (480 x 4096 over 8 ranks), here from the demo data, on this machine's CPU.

    python bench/next_batch.py data/demo/fast_llm_dataset.json [key=value ...]   # DataConfig fields, e.g. shuffle
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data import Data, DataConfig, Loader  # noqa: E402

config = DataConfig(path=sys.argv[1], split=[98, 2, 0])
data = Data(config, 4096, 4096, 0)
loader = Loader(data, "train", 0, 480, 4, rank=0, world_size=8)
times = []
for step in range(30):
    start = time.perf_counter()
    loader._read(step * 480)
    times.append(time.perf_counter() - start)
loader.close()
print(f"Loader._read, 60 x 4097 tokens: median {statistics.median(times[5:]) * 1e3:.2f} ms, "
      f"max {max(times[5:]) * 1e3:.2f} ms over 25 steps")
