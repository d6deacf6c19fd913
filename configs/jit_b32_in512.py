"""JiT-B/32 on ImageNet 512 px (133M params, 26 Gflops; still 256 tokens).

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-B/32' (B dimensions, patch 32: 3072-d patches through a 128-d bottleneck):
  official model_jit.py, REFERENCE section 2.
- noise_scale 2.0 (= 512 / 256): official README.
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, heun 50
  steps): config_lib.paper_imagenet, official main_jit.py defaults and README, REFERENCE 3-4.
- cfg_scale 3.0 on [0.1, 1]: official README evaluation table (REFERENCE 4); its training command uses
  2.9 for online eval.
- proj_drop 0.0: official README (B).
- 600 epochs: FID-50K 4.02 / IS 271.0 (paper Table 8 via issue #41); 200 epochs gives 4.64 (Table 6):
  `--config configs/jit_b32_in512.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-B/32', image_size=512, cfg_scale=3.0, proj_drop=0.0)
    return config_lib.apply_overrides(config, arg)
