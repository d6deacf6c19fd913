"""JiT-L/32 on ImageNet 512 px (461.5M params; 256 tokens).

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-L/32' (L dimensions, patch 32, bottleneck 128): official model_jit.py,
  REFERENCE section 2.
- noise_scale 2.0 (= 512 / 256): official README.
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, heun 50
  steps): config_lib.paper_imagenet, official main_jit.py defaults and README, REFERENCE 3-4.
- cfg_scale 2.5 on [0.1, 1]: official README evaluation table (REFERENCE 4).
- proj_drop 0.0: unconfirmed (the paper's Table 9 reportedly has 0 for B and L).
- 600 epochs: FID-50K 2.53 (paper Table 6); 200 epochs gives 3.06:
  `--config configs/jit_l32_in512.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-L/32', image_size=512, cfg_scale=2.5, proj_drop=0.0)
    return config_lib.apply_overrides(config, arg)
