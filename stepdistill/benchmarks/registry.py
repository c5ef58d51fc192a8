"""`benchmark.name` -> Benchmark class."""
from __future__ import annotations

# the 2-D mixtures: exact scores, MLP students from scratch (no attention); compare re-samples them and scores them
# against the exact mixture
POINTS_BENCHMARKS = ("gmm", "gmm_unbalanced")


def build_benchmark(cfg):
    from .digits import DigitsBenchmark
    from .gmm import GMMBenchmark
    from .text_to_image import TextToImageBenchmark

    table = {"gmm": GMMBenchmark, "gmm_unbalanced": GMMBenchmark, "digits": DigitsBenchmark,
             "tiny_sd": TextToImageBenchmark, "tiny_sdxl": TextToImageBenchmark, "text_to_image": TextToImageBenchmark}
    if cfg.name not in table:
        raise ValueError(f"unknown benchmark {cfg.name!r}: use benchmark= one of {', '.join(sorted(table))}")
    return table[cfg.name](cfg)
