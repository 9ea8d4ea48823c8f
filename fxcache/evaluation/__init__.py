"""The evaluation harness: how fxcache's results are measured, kept apart from the
compiler and runtime (nothing in ``fxcache`` outside this package imports it).

``fxcache.evaluation.metrics``     fidelity (SQNR/PSNR against the uncached run) and sample
                                   quality (Fréchet distance and class accuracy in the feature
                                   space of the embedded digit classifier);
                                   ``python -m fxcache.evaluation.metrics --spread`` measures
                                   their run-to-run spread.
``fxcache.evaluation.data``        the 16x16 digits the embedded models are trained and judged on.
``fxcache.evaluation.speed``       the three speed figures of DESIGN.md section 5, from one
                                   process (:func:`~fxcache.evaluation.speed.measure_speedup`).
``fxcache.evaluation.render``      image grids and the side-by-side PNG of ``fxcache demo``.
``fxcache.evaluation.provenance``  the commit stamp of written results (``bench/tables.py``).

The submodules are imported on use (``from fxcache.evaluation.metrics import sqnr``); this
package imports none of them, so importing it costs nothing.
"""

__all__ = ["data", "metrics", "provenance", "render", "speed"]
