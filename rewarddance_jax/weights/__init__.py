"""Import/export of public safetensors layouts (diffusers, transformers) through explicit key maps.

  keymap.py          Rule / Transform / check_plan: one declarative map per family, one error
  safetensors_io.py  header index, file-by-file streaming reads, sharded writes + index json
  loader.py          load into target shardings (stacked layers included), export back
  spec.py            ModelSpec: config + module factory + key map of one model directory
  cache.py           converted-weights cache (Orbax), keyed on model id, files and layout
  flux.py, sd3.py    FluxTransformer2DModel ⇄ Generator; SD3Transformer2DModel ⇄ SD3Generator
  vae.py, text.py    AutoencoderKL; T5EncoderModel and CLIPTextModel[WithProjection]
  text_pipeline.py   a pipeline's text encoders + tokenizers → conditioning; offline pre-encoding
  convert.py         import / cache / export in one call (python -m launch.convert)
"""
