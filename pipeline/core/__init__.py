"""What every stage stands on: the config schema and its loading, the stage cache and the run
lock, atomic file writes, processes and threads, the training loop, the scores."""
