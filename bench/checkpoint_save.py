"""Time one rank's optimizer-shard save at the 8B shapes on the CPU: write_file(safetensors_chunks(...)), the
streamed write with its SHA-256 computed on the way, as save_checkpoint does it.

    python bench/checkpoint_save.py [--world 8] [--folder /tmp/shard] [--repeat 2]

The shard holds this rank's slice of the float32 master weights and both Adam moments (12 bytes a parameter
over 8,030,261,248 parameters / world), as tensors the size of the 8B model's, filled with random values."""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import safetensors_chunks, write_file  # noqa: E402

PARAMETERS = 8_030_261_248  # Llama-3.1-8B


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--folder", default="/tmp/shard")
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    per_rank = PARAMETERS // args.world
    piece = 4096 * 14336  # one MLP projection of the 8B model
    torch.manual_seed(0)
    tensors = {}
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        left, i = per_rank, 0
        while left:
            n = min(piece, left)
            tensors[f"{kind}/p{i}"] = torch.randn(n)
            left, i = left - n, i + 1
    size = sum(t.numel() * 4 for t in tensors.values())
    Path(args.folder).mkdir(parents=True, exist_ok=True)
    path = Path(args.folder) / "optimizer-00000-of-00008.safetensors"
    for _ in range(args.repeat):
        start = time.perf_counter()
        entry = write_file(path, safetensors_chunks(tensors))
        seconds = time.perf_counter() - start
        print(f"{size / 1e9:.2f} GB in {seconds:.1f} s ({size / 1e9 / seconds:.2f} GB/s), sha256 {entry['sha256'][:12]}")
        os.unlink(path)


if __name__ == "__main__":
    main()
