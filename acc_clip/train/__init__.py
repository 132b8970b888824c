"""Training: the loop (loop.py), one optimizer step (step.py), what a run reports (metrics.py).
`python -m acc_clip.train ...` runs the `train` command (__main__.py)."""
