"""jobs: the scheduler's example plugin."""
