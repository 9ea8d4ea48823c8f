"""The README's method examples, runnable: .venv/bin/python docs/methods_example.py
(eager backend and 20 steps; a few minutes on a 2-core CPU)."""
import torch

import fxcache
from fxcache.evaluation.metrics import sqnr
from fxcache.models import generate, load

unet, dit = load("unet"), load("dit")
labels = torch.arange(8) % 10

# DeepCache: full step every 3 steps; partial steps run only what the up path above skip branch 1 needs
deep = fxcache.compile(unet, fxcache.DeepCache(interval=3, branch=1), backend=None)
print("DeepCache", deep.schedule, "SQNR dB", sqnr(generate(unet, 20, 8), generate(deep, 20, 8)),
      "ideal", round(deep.plan.ideal_speedup, 2))

# FORA: attention and MLP outputs of every DiT block reused for 2 of every 3 steps, current gates applied
fora = fxcache.compile(dit, fxcache.FORA(interval=3), backend=None)
print("FORA", "SQNR dB", sqnr(generate(dit, 20, 8, class_labels=labels), generate(fora, 20, 8, class_labels=labels)),
      "ideal", round(fora.plan.ideal_speedup, 2))

# Block caching: profile the change of each unit, refresh when the accumulated change exceeds δ,
# then train scale-shift adapters that correct the cached values
run = lambda m, seed: generate(m, num_steps=20, num_samples=4, seed=seed)
prof = fxcache.profile(unet, run, seeds=(0, 1), progress=False)
sched = fxcache.BlockCache(threshold=0.5, profile=prof, units="attention")
adapters = fxcache.train_scale_shift(unet, sched, run, iters=20, progress=False)
block = fxcache.compile(unet, sched, backend=None, scale_shift=adapters)
print("BlockCache", "SQNR dB", sqnr(generate(unet, 20, 8), generate(block, 20, 8)),
      "ideal", round(block.plan.ideal_speedup, 2))

# Timestep-aware block masking: learn which DiT blocks to recompute at each step
run_dit = lambda m, seed: generate(m, num_steps=20, num_samples=4, seed=seed, class_labels=torch.arange(4))
mask = fxcache.learn_mask(dit, run_dit, fxcache.LearnedMask(lambda_sparsity=3e-3, lambda_bimodal=1e-3, iters=30), progress=False)
learned = fxcache.compile(dit, mask, backend=None)
print("LearnedMask", "SQNR dB", sqnr(generate(dit, 20, 8, class_labels=labels), generate(learned, 20, 8, class_labels=labels)),
      "ideal", round(learned.plan.ideal_speedup, 2))
