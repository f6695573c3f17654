"""What the command-line tools share, kept apart from the library a config
or a script imports (as mmdet keeps ``mmdet/utils`` apart from
``mmdet/engine``): runner set-up and one-line errors (runner_setup.py), the
experiment's result cache (result_cache.py), the detectors the benchmarks
build (benchmark_models.py). Nothing in ``mmcd.core``, ``mmcd.engine`` or
``mmcd.models`` imports it."""
