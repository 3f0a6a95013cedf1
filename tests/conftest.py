"""Shared settings for the plugin's own tests."""

import torch

# The tiny model's ops are far too small to gain from intra-op threads; on a 2-core runner shared with other
# jobs, two torch threads oversubscribe the CPU and make every engine run ~10x slower. One thread also keeps
# in-process pytester runs (calibration and timed rounds alike) on the same footing.
torch.set_num_threads(1)
