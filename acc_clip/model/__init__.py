"""The open_clip model and what is built around it: creation and towers (build.py)."""
