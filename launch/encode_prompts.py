"""Pre-encode a prompt set offline with a pipeline's text encoders (FLUX or SD3 recipe).

  python -m launch.encode_prompts --family=flux --pipeline=/models/FLUX.1-dev \
      --prompts=prompts.jsonl --out=/data/flux_prompts [--batch=8] [--t5_len=512] \
      [--dtype=bfloat16] [--mask_text] [--cache_dir=/work/converted]

Reads .jsonl/.csv prompt files (data/prompts.py), writes `<out>/prompts*.safetensors` (per
prompt: txt, pooled, mask) and `<out>/prompts.jsonl`; `weights.text_pipeline.EncodedPrompts`
reads them back. `--negative_prompt=TEXT` also writes `<out>/negative` (one prompt), which
classifier-free guidance reads (`config.guidance`). Tokenizers come from the pipeline's own
tokenizer folders (no download).
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import flags

from launch import cli
from rewarddance_jax import logs
from rewarddance_jax.data import prompts as prompts_lib
from rewarddance_jax.parallel import mesh as mesh_lib
from rewarddance_jax.parallel.sharding import DEFAULT_RULES
from rewarddance_jax.weights import text_pipeline

DTYPES = {'float32': np.float32, 'bfloat16': 'bfloat16', 'float16': np.float16}

_FAMILY = flags.DEFINE_enum('family', 'flux', sorted(text_pipeline.LAYOUTS), 'Pipeline family.')
_PIPELINE = flags.DEFINE_string('pipeline', None, 'diffusers pipeline directory.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'Prompt file (.jsonl or .csv).')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Prompts per encoder call.')
_T5_LEN = flags.DEFINE_integer('t5_len', None, 'T5 tokens (default: 512 flux, 256 sd3).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', sorted(DTYPES), 'Stored dtype of txt / pooled.')
_MASK = flags.DEFINE_boolean('mask_text', False, 'Mask T5 padding (FLUX/SD3 pipelines do not).')
_CACHE = flags.DEFINE_string('cache_dir', None, 'Converted-weights cache for the encoders.')
_NEGATIVE = flags.DEFINE_string(
    'negative_prompt', None, 'Also encode this negative prompt ("" for the empty one) to '
    '<out>/negative, the unconditional side of classifier-free guidance.')


def main(argv):
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments {argv[1:]}')
  logs.quiet_libraries()
  mesh = mesh_lib.create_mesh(ml_collections.ConfigDict({'ici': (1, -1, 1)}))
  dtype = DTYPES[_DTYPE.value]
  if dtype == 'bfloat16':
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    dtype = ml_dtypes.bfloat16
  encoder = text_pipeline.PipelineTextEncoder(
      _FAMILY.value, _PIPELINE.value, mesh, DEFAULT_RULES, t5_len=_T5_LEN.value,
      mask_text=_MASK.value, cache_dir=_CACHE.value, progress=True)
  records = prompts_lib.load_prompt_file(_PROMPTS.value)
  summary = text_pipeline.encode_records(encoder, records, _OUT.value, batch_size=_BATCH.value,
                                         dtype=dtype)
  if _NEGATIVE.value is not None:
    text_pipeline.write_encoded(encoder, [_NEGATIVE.value], os.path.join(_OUT.value, 'negative'),
                                batch_size=_BATCH.value, dtype=dtype)
    summary['negative_prompt'] = _NEGATIVE.value
  print(json.dumps(summary))


if __name__ == '__main__':
  flags.mark_flags_as_required(['pipeline', 'prompts', 'out'])
  cli.run(main)
