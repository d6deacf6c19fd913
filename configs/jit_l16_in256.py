"""JiT-L/16 on ImageNet 256 px (459M params, 88 Gflops).

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-L/16' (depth 24, width 1024, 16 heads, bottleneck 128, class tokens from
  block 8): official model_jit.py, REFERENCE section 2.
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, noise_scale
  1.0, heun 50 steps): config_lib.paper_imagenet, official main_jit.py defaults and README, REFERENCE 3-4.
- cfg_scale 2.4 on [0.1, 1]: official README evaluation table (REFERENCE 4).
- proj_drop 0.0: unconfirmed (not in the README; the paper's Table 9 reportedly has 0 for B and L).
- 600 epochs: final model, FID-50K 2.36 / IS 298.5 (paper Table 7); 200 epochs gives 2.79 (Table 6):
  `--config configs/jit_l16_in256.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-L/16', image_size=256, cfg_scale=2.4, proj_drop=0.0)
    return config_lib.apply_overrides(config, arg)
