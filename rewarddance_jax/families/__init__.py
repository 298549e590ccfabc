"""Generator families (digits, flux, sd3): one interface through which every trainer, sampler
and the layout scanner build, condition, guide and decode a generator (families/base.py)."""

from rewarddance_jax.families.registry import FAMILIES, GeneratorFamily, from_config, get

__all__ = ['FAMILIES', 'GeneratorFamily', 'from_config', 'get']
