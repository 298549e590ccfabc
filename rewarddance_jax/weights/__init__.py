"""Import/export of public safetensors layouts (diffusers, transformers) through explicit key maps.

  keymap.py          Rule / Transform / check_plan: one declarative map per family, one error
  safetensors_io.py  header index, file-by-file streaming reads, sharded writes + index json
  loader.py          load into target shardings (stacked layers included), export back
  flux.py            FluxTransformer2DModel ⇄ Generator
"""
