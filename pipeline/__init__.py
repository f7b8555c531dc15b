"""The library: core (config, cache, io, runtime, training loop, metrics), data (data sets,
checks, augmentation, the demo), models (backbones and networks), methods (CAMs, CRF, walks,
Self-Regulation, mixed supervision), refinement (refine's methods), commands (predict, report).
The stages that use it are in stages/; run_pipeline.py is the entry point."""
