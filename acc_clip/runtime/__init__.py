"""What a process runs on and how it lives: the device plan (device.py), model wrapping across
processes (parallel.py), stop signals (signals.py) and the run folder's file names (run_dir.py)."""
