"""A cheap stand-in for JiT with the same call signature, for diffusion and sampler tests."""

import jax
import jax.numpy as jnp
from flax import nnx


class ToyNet(nnx.Module):
    """out = tanh(z @ mix + emb[y] + t * t_w): depends on z, t and y like the real network.

    `calls`, when given, receives each call's (batch size, max t) from inside compiled code, so tests can
    count the network rows a sampler runs; `dropout_key` adds key-dependent noise (a stand-in for dropout).
    """

    def __init__(self, channels: int = 3, num_classes: int = 5, *, seed: int = 0, out_dtype=jnp.float32,
                 calls: list | None = None):
        k_mix, k_emb, k_t = jax.random.split(jax.random.key(seed), 3)
        self.num_classes = num_classes
        self.out_dtype = out_dtype
        self.calls = calls
        self.mix = nnx.Param(0.5 * jax.random.normal(k_mix, (channels, channels)))
        self.emb = nnx.Param(jax.random.normal(k_emb, (num_classes + 1, channels)))
        self.t_w = nnx.Param(jax.random.normal(k_t, (channels,)))

    def __call__(self, z, t, y, *, dropout_key=None):
        if self.calls is not None:
            jax.debug.callback(lambda n, t_max: self.calls.append((int(n), float(t_max))), y.shape[0], t.max())
        h = (jnp.einsum('bhwc,cd->bhwd', z, self.mix[...]) + self.emb[...][y][:, None, None, :]
             + t[:, None, None, None] * self.t_w[...])
        if dropout_key is not None:
            h = h + 0.1 * jax.random.normal(dropout_key, h.shape)
        return jnp.tanh(h).astype(self.out_dtype)
