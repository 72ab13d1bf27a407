"""Run train.py as if each GPU had 80 GB (an H100's capacity) on a larger card: a filler tensor takes
the rest before the run starts, so the recomputation choice and the peak see an 80 GB card.
    torchrun --nproc_per_node=4 bench/as_80gb.py config/llama3_8b.yaml ...
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train  # noqa: E402

device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
total = torch.cuda.get_device_properties(device).total_memory
capacity = 81559 * 2**20  # nvidia-smi's memory.total of an H100 80GB HBM3
filler = torch.empty(max(0, total - capacity), dtype=torch.uint8, device=device)
if device.index == 0:
    print(f"filler: {filler.numel() / 1e9:.1f} GB taken, {capacity / 1e9:.1f} GB left for the run (peaks below include the filler)", flush=True)
sys.exit(train.main(sys.argv[1:]))
