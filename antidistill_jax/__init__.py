"""antidistill_jax: Antidistillation Sampling (Savani et al., 2025) in JAX / Flax NNX."""

__version__ = "0.1.0"
