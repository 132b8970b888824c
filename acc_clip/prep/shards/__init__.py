"""webdataset shards from a CSV: conversion (convert.py, the format and its guarantees), tar
writing (tar.py), verification (verify.py), and the `acc-clip shards` command (command.py)."""
