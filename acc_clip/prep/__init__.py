"""Preparing data: webdataset shards (shards/), COCO captions to CSV (coco_csv.py), the demo dataset (demo_data.py)."""
