"""Fidelity and quality measures for cached denoisers.

Two kinds of figure (see DESIGN.md, section 5):

* **Fidelity to the uncached model**: :func:`sqnr` and :func:`psnr` of the final
  sample of a cached run against the uncached run from the same seed (same
  initial noise; :func:`fxcache.models.generate` guarantees that).
* **Sample quality** on the models trained here: :func:`fid_digits`, a Fréchet
  distance between generated and real digits in the 64-d penultimate feature space
  of the embedded classifier, and :func:`class_accuracy` for the class-conditional
  DiT (does the classifier agree with the requested label?).

How many samples, and how much spread to expect
-----------------------------------------------
A Fréchet distance is biased upwards by small sample counts (the covariance of 64
features estimated from N samples), so only compare figures computed with the
**same number of generated samples against the same real set** (the default: all
1797 digits). From the measurements below:

* **Figures of record: 1024 generated samples** (DDIM 50 steps; for the DiT
  ``class_labels = arange(1024) % 10``). The seed-to-seed standard deviation of
  the FD is then about 4 for both embedded models, so a difference under ~8 between
  runs from different seeds is noise. One such generation takes about 1-3 minutes
  on one CPU thread.
* **256 samples only for quick checks**: the spread is 24 (unet, whose class mix
  varies from seed to seed) and 11 (dit).
* Compare a cached model with the uncached one **from the same seeds** (paired):
  both start from identical noise, so most of the seed-to-seed spread cancels;
  still report at least two seeds. SQNR/PSNR are paired by construction and have no
  sampling noise at all (the runs are deterministic).
* DiT class accuracy varies by about ±0.01 between seeds.
* "N random real digits vs all real" draws from the reference set itself, so it is
  an optimistic floor; the disjoint real halves (898 each, FD about 28) are the
  honest real-vs-real figure at that size.

Measured with ``python -m fxcache.evaluation.metrics --spread`` (1 CPU thread, DDIM 50 steps,
the committed models; 2 shared CPU cores):

.. SPREAD-BEGIN (written by ``python -m fxcache.evaluation.metrics --spread --write``)
N = 256 generated samples (``python -m fxcache.evaluation.metrics --spread --num-samples 256 --steps 50 --seeds 0 1 2 3``):

* real vs real, two disjoint halves (898 each), 5 random splits: 28.51, 33.90, 22.67, 23.61, 31.16 (mean 27.97)
* 256 random real digits vs all 1797 real (an optimistic floor: a subset of the reference): 26.74, 45.94, 41.55, 43.62, 39.50 (mean 39.47, std 7.51)
* unet, 256 samples (DDIM 50 steps) vs all real, seeds [0, 1, 2, 3]: 94.25, 123.26, 66.36, 83.46 (mean 91.83, std 23.89); seed 0 samples vs seed 1 samples: 117.97
* dit, 256 samples (DDIM 50 steps) vs all real, seeds [0, 1, 2, 3]: 120.34, 128.22, 113.78, 102.26 (mean 116.15, std 10.98); seed 0 samples vs seed 1 samples: 79.32; class accuracy 0.94, 0.93, 0.92, 0.94

N = 1024 generated samples (``python -m fxcache.evaluation.metrics --spread --num-samples 1024 --steps 50 --seeds 0 1 2``):

* real vs real, two disjoint halves (898 each), 5 random splits: 28.51, 33.90, 22.67, 23.61, 31.16 (mean 27.97)
* 1024 random real digits vs all 1797 real (an optimistic floor: a subset of the reference): 4.89, 6.76, 5.06, 4.62, 4.78 (mean 5.22, std 0.88)
* unet, 1024 samples (DDIM 50 steps) vs all real, seeds [0, 1, 2]: 41.11, 45.28, 37.80 (mean 41.40, std 3.75); seed 0 samples vs seed 1 samples: 30.81
* dit, 1024 samples (DDIM 50 steps) vs all real, seeds [0, 1, 2]: 94.82, 90.50, 87.05 (mean 90.79, std 3.89); seed 0 samples vs seed 1 samples: 20.68; class accuracy 0.93, 0.93, 0.92

.. SPREAD-END

All functions take and return plain tensors/floats; none of them trains anything.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "class_accuracy",
    "classifier_features",
    "fid_digits",
    "frechet_distance",
    "gaussian_stats",
    "psnr",
    "real_digit_features",
    "sqnr",
]


def _as_f64(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def sqnr(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: ``10 log10(‖ref‖² / ‖ref − test‖²)``.

    Computed in float64 over all elements. ``inf`` when ``test`` equals
    ``reference`` exactly (including both all-zero); ``-inf`` when the reference is
    all zeros but the test is not.
    """
    ref, tst = _as_f64(reference), _as_f64(test)
    if ref.shape != tst.shape:
        raise ValueError(f"sqnr: shapes differ: reference {tuple(ref.shape)} vs test {tuple(tst.shape)}")
    noise = (ref - tst).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range² / mean((ref − test)²))``.

    ``data_range`` is the span of valid values: 2.0 for images in [-1, 1]. ``inf``
    when the two are equal.
    """
    ref, tst = _as_f64(reference), _as_f64(test)
    if ref.shape != tst.shape:
        raise ValueError(f"psnr: shapes differ: reference {tuple(ref.shape)} vs test {tuple(tst.shape)}")
    mse = (ref - tst).pow(2).mean().item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of an (N, D) feature matrix, in float64."""
    f = _as_f64(features).numpy()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D); got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    features_a: torch.Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
    features_b: torch.Tensor | np.ndarray | tuple[np.ndarray, np.ndarray],
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``d² = ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½)``. Each argument is an (N, D)
    feature matrix or a precomputed ``(mean, cov)`` pair (see :func:`gaussian_stats`).

    Numerics: float64 throughout; ``tr (Σa Σb)^½`` is computed as
    ``Σ √λ(Σa^½ Σb Σa^½)``, the eigenvalues of a symmetric PSD matrix (negative
    round-off eigenvalues clipped to 0), which avoids the complex parts and
    singular-matrix trouble of ``scipy.linalg.sqrtm`` when N < D. The result is
    clipped at 0.
    """
    mu_a, cov_a = features_a if isinstance(features_a, tuple) else gaussian_stats(features_a)
    mu_b, cov_b = features_b if isinstance(features_b, tuple) else gaussian_stats(features_b)
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"feature dimensions differ: {mu_a.shape} vs {mu_b.shape}")
    sa = _psd_sqrt(cov_a)
    m = sa @ cov_b @ sa
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu_a - mu_b
    d = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(d, 0.0)


@lru_cache(maxsize=1)
def _default_classifier():
    from fxcache.models import load

    return load("classifier")


def _classifier(classifier):
    return _default_classifier() if classifier is None else classifier


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: torch.nn.Module | None = None, batch_size: int = 512) -> torch.Tensor:
    """Penultimate-layer features (N, 64) of images (N, 1, 16, 16) in [-1, 1].

    ``classifier`` defaults to the embedded one (``fxcache.models.load("classifier")``).
    Images are moved to float32 CPU and clamped to [-1, 1] first (DDIM samples can
    round slightly outside).
    """
    clf = _classifier(classifier)
    p = next(clf.parameters())
    x = torch.as_tensor(images).detach().to(device="cpu", dtype=torch.float32).clamp(-1.0, 1.0)
    out = [clf.features(x[i : i + batch_size].to(p.device, p.dtype)).float().cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, 64)


@lru_cache(maxsize=4)
def _real_stats(num_real: int | None) -> tuple[np.ndarray, np.ndarray]:
    return gaussian_stats(real_digit_features(num_real))


def real_digit_features(num_real: int | None = None, classifier: torch.nn.Module | None = None) -> torch.Tensor:
    """Classifier features of the real digits: all 1797, or ``num_real`` of them
    chosen by a fixed permutation (seed 0)."""
    from fxcache.evaluation.data import load_digits

    images, _ = load_digits("all")
    if num_real is not None:
        perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
        images = images[perm[:num_real]]
    return classifier_features(images, classifier)


def fid_digits(images: torch.Tensor, num_real: int | None = None, classifier: torch.nn.Module | None = None) -> float:
    """Fréchet distance between ``images`` (N, 1, 16, 16) and real digits in the
    classifier's feature space (lower is better; real-vs-real floor in the module
    docstring). ``num_real`` limits the real set (default: all 1797)."""
    feats = classifier_features(images, classifier)
    real = _real_stats(num_real) if classifier is None else gaussian_stats(real_digit_features(num_real, classifier))
    return frechet_distance(feats, real)


@torch.no_grad()
def class_accuracy(images: torch.Tensor, labels: torch.Tensor | Sequence[int], classifier: torch.nn.Module | None = None) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (e.g. the classes a
    class-conditional model was asked for)."""
    clf = _classifier(classifier)
    p = next(clf.parameters())
    x = torch.as_tensor(images).detach().to(device="cpu", dtype=torch.float32).clamp(-1.0, 1.0)
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y.numel() != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.numel()} labels")
    pred = torch.cat([clf(x[i : i + 512].to(p.device, p.dtype)).argmax(1).cpu() for i in range(0, x.shape[0], 512)])
    return float((pred == y).double().mean().item())


# ----------------------------------------------------------------------------- spread


def measure_spread(num_samples: int = 256, num_steps: int = 50, seeds: Sequence[int] = (0, 1, 2, 3), splits: int = 5) -> dict:
    """Run-to-run spread of the quality metrics; returns a dict of figures.

    * real/real: FD between two disjoint random halves of the real digits
      (``splits`` random splits), and FD of ``num_samples`` random real digits vs
      all real digits (the floor a perfect generator reaches at that sample count);
    * unet: FD of ``num_samples`` DDIM samples vs real, for each seed, and FD
      between the sample sets of the first two seeds;
    * dit: the same with ``class_labels = arange(n) % 10``, plus class accuracy.
    """
    import time

    from fxcache.evaluation.data import load_digits
    from fxcache.models import available, generate, load

    torch.set_num_threads(1)
    res: dict = {"num_samples": num_samples, "num_steps": num_steps, "seeds": list(seeds)}
    images, _ = load_digits("all")
    feats = classifier_features(images)
    halves, subsets = [], []
    for s in range(splits):
        perm = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(100 + s))
        h = feats.shape[0] // 2
        halves.append(frechet_distance(feats[perm[:h]], feats[perm[h : 2 * h]]))
        subsets.append(frechet_distance(feats[perm[:num_samples]], _real_stats(None)))
    res["real_halves"] = halves
    res["real_subset_vs_all"] = subsets
    for name in ("unet", "dit"):
        if name not in available():
            continue
        model = load(name)
        labels = torch.arange(num_samples) % 10 if name == "dit" else None
        gen_feats, fids, accs = [], [], []
        t0 = time.perf_counter()
        for seed in seeds:
            x = generate(model, num_steps=num_steps, num_samples=num_samples, seed=seed, class_labels=labels)
            f = classifier_features(x)
            gen_feats.append(f)
            fids.append(frechet_distance(f, _real_stats(None)))
            if labels is not None:
                accs.append(class_accuracy(x, labels))
        res[name] = {
            "fid_vs_real": fids,
            "fid_between_seeds": frechet_distance(gen_feats[0], gen_feats[1]) if len(gen_feats) > 1 else None,
            "seconds": time.perf_counter() - t0,
        }
        if accs:
            res[name]["class_accuracy"] = accs
    return res


def _format_spread(res: dict) -> str:
    def f(xs):
        return ", ".join(f"{x:.2f}" for x in xs)

    n = res["num_samples"]
    lines = [
        f"* real vs real, two disjoint halves (898 each), {len(res['real_halves'])} random splits: "
        f"{f(res['real_halves'])} (mean {np.mean(res['real_halves']):.2f})",
        f"* {n} random real digits vs all 1797 real (an optimistic floor: a subset of the reference): "
        f"{f(res['real_subset_vs_all'])} (mean {np.mean(res['real_subset_vs_all']):.2f}, "
        f"std {np.std(res['real_subset_vs_all'], ddof=1):.2f})",
    ]
    for name in ("unet", "dit"):
        if name not in res:
            continue
        r = res[name]
        fv = r["fid_vs_real"]
        s = (f"* {name}, {n} samples (DDIM {res['num_steps']} steps) vs all real, seeds {res['seeds']}: {f(fv)} "
             f"(mean {np.mean(fv):.2f}, std {np.std(fv, ddof=1) if len(fv) > 1 else 0.0:.2f})")
        if r.get("fid_between_seeds") is not None:
            s += f"; seed {res['seeds'][0]} samples vs seed {res['seeds'][1]} samples: {r['fid_between_seeds']:.2f}"
        if "class_accuracy" in r:
            s += f"; class accuracy {f(r['class_accuracy'])}"
        lines.append(s)
    return "\n".join(lines)


def _write_spread(text: str, num_samples: int, command: str) -> None:
    """Replace (or add) the section for ``num_samples`` in this module's docstring."""
    from pathlib import Path

    path = Path(__file__)
    src = path.read_text()
    begin = src.index("\n", src.index(".. SPREAD-BEGIN")) + 1
    end = src.index(".. SPREAD-END")
    sections: dict[int, str] = {}
    for chunk in src[begin:end].split("\nN = ")[0:]:
        chunk = chunk[4:] if chunk.startswith("N = ") else chunk
        head, _, body = chunk.partition(" generated samples")
        if head.strip().isdigit():
            sections[int(head)] = chunk.rstrip("\n")
    sections[num_samples] = f"{num_samples} generated samples (``{command}``):\n\n{text}"
    block = "\n\n".join(f"N = {sections[k]}" for k in sorted(sections))
    from ..artefacts.store import write_text_atomic

    write_text_atomic(path, src[:begin] + block + "\n\n" + src[end:])  # never half a module


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m fxcache.evaluation.metrics", description=__doc__.split("\n")[0])
    ap.add_argument("--spread", action="store_true", help="measure the run-to-run spread of the quality metrics")
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--write", action="store_true", help="write the result into this module's docstring")
    args = ap.parse_args(argv)
    if not args.spread:
        ap.print_help()
        return 0
    res = measure_spread(num_samples=args.num_samples, num_steps=args.steps, seeds=args.seeds)
    text = _format_spread(res)
    print(json.dumps(res, indent=1))
    print(text)
    if args.write:
        cmd = f"python -m fxcache.evaluation.metrics --spread --num-samples {args.num_samples} --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
        _write_spread(text, args.num_samples, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
