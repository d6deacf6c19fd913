"""JiT-B/16 on ImageNet 256 px: the paper's base model (131M params, 25 Gflops).

Numbers and sources (REFERENCE.md = /work/shared/REFERENCE.md of the port):
- Architecture: preset 'JiT-B/16' (depth 12, width 768, 12 heads, bottleneck 128, class tokens from
  block 4): official model_jit.py, REFERENCE section 2.
- Recipe (batch 1024, lr 2e-4, 5 warmup epochs, EMA 0.9999/0.9996, P_mean -0.8, P_std 0.8, noise_scale
  1.0, heun 50 steps): config_lib.paper_imagenet, official main_jit.py defaults and README, REFERENCE 3-4.
- cfg_scale 3.0 on [0.1, 1]: official README evaluation table (REFERENCE 4). The README training command
  uses 2.9 for online eval; the maintainer advises sweeping CFG and EMA (issue #42).
- proj_drop 0.0: official README.
- 600 epochs: final model, FID-50K 3.66 / IS 275.1 (paper Table 7); 200 epochs gives 4.37 (Table 6):
  `--config configs/jit_b16_in256.py:epochs=200`.
"""

from __future__ import annotations

from ml_collections import config_dict

from jit_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
    config = config_lib.paper_imagenet('JiT-B/16', image_size=256, cfg_scale=3.0, proj_drop=0.0)
    return config_lib.apply_overrides(config, arg)
