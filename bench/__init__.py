"""vmpower benchmarks (``make bench``): each ``bench/bench_*.py`` module has ``run()``."""
