"""Files: bounded image reads and hashes (files.py), JPEG headers (jpeg.py)."""
