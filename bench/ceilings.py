"""The two ceilings of this card, measured: an 8192^3 bf16 matmul and a device-to-device copy."""
import torch
from triton.testing import do_bench

a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
print(f"bf16 matmul 8192^3: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s ({torch.cuda.get_device_name()})")
x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
y = torch.empty_like(x)
ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
print(f"device copy 1 GiB: {2 * x.numel() * 2 / ms / 1e9:.2f} TB/s (read + write)")
