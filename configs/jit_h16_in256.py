"""JiT-H/16 on ImageNet 256 px (953M params, 182 Gflops); parameters sharded (FSDP).

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-H/16' (depth 32, width 1280, 16 heads (head dim 80), bottleneck 256, class
  tokens from block 10): official model_jit.py, REFERENCE section 2.
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, noise_scale
  1.0, heun 50 steps): config_lib.paper_imagenet, official main_jit.py defaults and README, REFERENCE 3-4.
- cfg_scale 2.2 on [0.1, 1]: official README evaluation table and its H/16 training command (REFERENCE 4).
- proj_drop 0.2: official README.
- FSDP (mesh fsdp = all devices): our choice, not the paper's; the official code is DDP only.
- 600 epochs: final model, FID-50K 1.86 / IS 303.4 (paper Table 7); 200 epochs gives 2.29 (Table 6):
  `--config configs/jit_h16_in256.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-H/16', image_size=256, cfg_scale=2.2, proj_drop=0.2, fsdp=True)
    return config_lib.apply_overrides(config, arg)
