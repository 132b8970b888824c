"""Input pipelines: CSV rows (csv.py) and webdataset shards (wds.py) into `Batch`es."""
