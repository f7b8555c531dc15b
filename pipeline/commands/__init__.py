"""Commands on a finished run folder: ``predict`` (segment new images) and ``report`` (the
run's report.html), reached as ``python run_pipeline.py predict|report``."""
