"""JiT-G/32 on ImageNet 512 px (about 2.0B params; 256 tokens); parameters sharded (FSDP).

G is not in the official PyTorch repo (issue #18): the paper trained it on TPU only. Several numbers
below are therefore unconfirmed.

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-G/32' (depth 40, width 1664, 16 heads, bottleneck 256, patch 32): paper
  Table 9 via issue #18 (REFERENCE 2); class tokens from block 10: unconfirmed.
- noise_scale 2.0 (= 512 / 256): official README (for B/L/H at 512 px).
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, heun 50
  steps): config_lib.paper_imagenet, as for the other sizes (REFERENCE 3-4).
- cfg_scale 2.3 on [0.1, 1]: unconfirmed (no G value is published; this is H/32's). Sweep it.
- proj_drop 0.2: unconfirmed (the paper's Table 9 reportedly has 0.2 for H and G).
- FSDP (mesh fsdp = all devices): needed for 2B parameters with AdamW state.
- 600 epochs: FID-50K 1.78 (paper Table 6); 200 epochs gives 2.11:
  `--config configs/jit_g32_in512.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-G/32', image_size=512, cfg_scale=2.3, proj_drop=0.2, fsdp=True)
    return config_lib.apply_overrides(config, arg)
