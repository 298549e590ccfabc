"""rewarddance_jax: reward modelling and RL alignment of rectified-flow generators in JAX/Flax NNX."""

__version__ = "0.1.0"
