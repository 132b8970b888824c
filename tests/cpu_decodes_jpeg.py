"""`python tests/cpu_decodes_jpeg.py -m acc_clip.train ARGS`: the trainer with the CPU device
allowed to decode JPEGs for --decode-on-device. On a GPU that flag decodes with nvjpeg in the
training process; without a GPU here, this runs the same code path (batched decode_jpeg, crop and
resize on the device, bad images dropped there) with the CPU as the device."""

import runpy
import sys

import acc_clip.data.pixels as pixels

pixels.device_can_decode_jpeg = lambda device: True
if sys.argv[1:3] != ["-m", "acc_clip.train"]:
    sys.exit("usage: python tests/cpu_decodes_jpeg.py -m acc_clip.train ARGS")
sys.argv = ["acc_clip.train", *sys.argv[3:]]
runpy.run_module("acc_clip.train", run_name="__main__", alter_sys=True)
