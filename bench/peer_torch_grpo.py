"""Peer for the GRPO-iteration benchmark: a DanceGRPO-style PyTorch loop (batch-1 rollouts).

The loop DanceGRPO runs per GPU (docs/algorithms.md §3.1, §3.4; written here for the comparison, not
copied): for each of the P·G samples of an iteration, one at a time, an N-step dance SDE rollout
under no_grad with bf16 autocast, keeping latents and log-probs; a reward on the final x̂0; group
advantages; then, sample by sample, the first int((N−1)·0.6) steps of a random permutation are
re-scored with gradient (fp32 master weights, bf16 autocast), each backward scaled by
1/(GA·T), and an AdamW step with grad-norm clipping every GA samples.

Model: diffusers FluxTransformer2DModel at flux-bench size (0.955B), 1024 image + 512 text
tokens. Reward: the same stand-in as bench/flux_jax.py (mean intensity of the first three latent
channels mapped to [0, 1]).

Usage: python bench/peer_torch_grpo.py [--prompts=1] [--group=12] [--steps=16] [--ga=4] [--iters=2]
Prints one JSON line: seconds per iteration, trajectories per second, peak memory.
"""

import json
import math
import sys
import time

import torch
from diffusers import FluxTransformer2DModel


def flags(argv):
  out = {}
  for a in argv[1:]:
    k, _, v = a.lstrip('-').partition('=')
    out[k] = v
  return out


def shift_sigmas(n, shift=3.0):
  t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
  return (shift * t / (1 + (shift - 1) * t)).float()


def dance_step(v, x, sigma, sigma_next, eta, x_next=None):
  """DanceGRPO's SDE step with its Gaussian log-prob (per-element mean), in fp32."""
  v, x = v.float(), x.float()
  dsigma = sigma_next - sigma
  x0 = x - sigma * v
  mean = x + dsigma * v
  score = -(x - x0 * (1 - sigma)) / sigma**2
  mean = mean + (-0.5 * eta**2 * score) * dsigma
  std = eta * math.sqrt(sigma - sigma_next)
  if x_next is None:
    x_next = mean + torch.randn_like(mean) * std
  logp = (-((x_next.detach() - mean) ** 2) / (2 * std**2) - math.log(std)
          - 0.5 * math.log(2 * math.pi))
  return x_next, logp.mean(dim=tuple(range(1, logp.ndim))), x0


def main():
  f = flags(sys.argv)
  prompts, group = int(f.get('prompts', 1)), int(f.get('group', 12))
  n, ga, iters = int(f.get('steps', 16)), int(f.get('ga', 4)), int(f.get('iters', 2))
  eta, clip = 0.3, 1e-4
  torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward crashed in this torch build
  dev = 'cuda'
  with torch.device(dev):
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=6, num_single_layers=12, attention_head_dim=128,
        num_attention_heads=12, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
  side = 32
  img_ids = torch.zeros(side, side, 3, device=dev)
  img_ids[..., 1] = torch.arange(side, device=dev)[:, None]
  img_ids[..., 2] = torch.arange(side, device=dev)[None, :]
  img_ids = img_ids.reshape(-1, 3)
  txt_ids = torch.zeros(512, 3, device=dev)
  txt = torch.randn(prompts, 512, 4096, device=dev)
  pooled = torch.randn(prompts, 768, device=dev)
  sigmas = shift_sigmas(n)
  trained = int((n - 1) * 0.6)

  def velocity(x, sigma, p):
    with torch.autocast('cuda', dtype=torch.bfloat16):
      return model(hidden_states=x, encoder_hidden_states=txt[p:p + 1],
                   pooled_projections=pooled[p:p + 1],
                   timestep=torch.full((1,), float(sigma), device=dev),
                   guidance=torch.full((1,), 3.5, device=dev), img_ids=img_ids, txt_ids=txt_ids,
                   return_dict=False)[0]

  def iteration():
    batch = prompts * group
    states, logps, rewards = [], [], []
    with torch.no_grad():
      for b in range(batch):                       # batch-1 rollouts
        p = b // group
        torch.manual_seed(p)                       # same initial noise within a group
        x = torch.randn(1, 1024, 64, device=dev)
        xs, lps = [], []
        for i in range(n):
          v = velocity(x, sigmas[i], p)
          x_next, logp, x0 = dance_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), eta)
          xs.append((x, x_next))
          lps.append(logp)
          x = x_next
        states.append(xs)
        logps.append(torch.stack(lps))
        rewards.append(((x0[..., :3] + 1) * 0.5).clamp(0, 1).mean())
    r = torch.stack(rewards).view(prompts, group)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-8)).clamp(-5, 5).view(-1)
    order = torch.randperm(batch)
    for count, b in enumerate(order.tolist(), start=1):   # batch-1 updates
      p = b // group
      for i in torch.randperm(n - 1)[:trained].tolist():
        x, x_next = states[b][i]
        v = velocity(x, sigmas[i], p)
        _, logp, _ = dance_step(v, x, float(sigmas[i]), float(sigmas[i + 1]), eta, x_next)
        ratio = torch.exp(logp - logps[b][i])
        loss = torch.maximum(-adv[b] * ratio, -adv[b] * ratio.clamp(1 - clip, 1 + clip)).mean()
        (loss / (ga * trained)).backward()
      if count % ga == 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()

  iteration()  # warm-up
  t = time.perf_counter()
  for _ in range(iters):
    iteration()
  dt = (time.perf_counter() - t) / iters
  print(json.dumps(dict(bench='peer_grpo', prompts=prompts, group=group, steps=n,
                        trained_steps=trained, ga=ga, iter_s=dt,
                        trajectories_per_s=prompts * group / dt, torch=torch.__version__,
                        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30)), flush=True)


if __name__ == '__main__':
  main()
