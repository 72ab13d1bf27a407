"""Run train.py as if each GPU had 80 GB (an H100's capacity), or `--capacity BYTES`, on a larger card: a filler
tensor takes the rest before the run starts, and torch.cuda.mem_get_info reports the capacity as the card's total,
so the recomputation choice and the peak see the smaller card.
    torchrun --nproc_per_node=4 bench/as_80gb.py [--capacity BYTES] config/llama3_8b.yaml ...
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402

args = sys.argv[1:]
capacity = 81559 * 2**20  # nvidia-smi's memory.total of an H100 80GB HBM3
if args[:1] == ["--capacity"]:
    capacity, args = int(float(args[1])), args[2:]
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
total = torch.cuda.get_device_properties(device).total_memory
filler = torch.empty(max(0, total - capacity), dtype=torch.uint8, device=device)
card_free = torch.cuda.mem_get_info
torch.cuda.mem_get_info = lambda device=None: (card_free(device)[0], capacity)
if device.index == 0:
    print(f"filler: {filler.numel() / 1e9:.1f} GB taken, {capacity / 1e9:.1f} GB left for the run (peaks below "
          "include the filler)", flush=True)
sys.exit(train.main(args))
