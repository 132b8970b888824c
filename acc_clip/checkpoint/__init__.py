"""Checkpoints: the on-disk format and the one weights loader (format.py), saving and exact resume
(manager.py), `acc-clip export` (export.py), the copy to remote storage (remote_sync.py), and the
test-only hooks (debug.py)."""
