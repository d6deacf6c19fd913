"""JiT-H/32 on ImageNet 512 px (956M params; 256 tokens); parameters sharded (FSDP).

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-H/32' (H dimensions, patch 32, bottleneck 256, class tokens from block 10):
  official model_jit.py, REFERENCE section 2.
- noise_scale 2.0 (= 512 / 256): official README.
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, heun 50
  steps): config_lib.paper_imagenet, official main_jit.py defaults and README, REFERENCE 3-4.
- cfg_scale 2.3 on [0.1, 1]: official README evaluation table (REFERENCE 4).
- proj_drop 0.2: official README (H).
- FSDP (mesh fsdp = all devices): our choice, not the paper's; the official code is DDP only.
- 600 epochs: FID-50K 1.94 (paper Table 6); 200 epochs gives 2.51:
  `--config configs/jit_h32_in512.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-H/32', image_size=512, cfg_scale=2.3, proj_drop=0.2, fsdp=True)
    return config_lib.apply_overrides(config, arg)
