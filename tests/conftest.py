"""Shared settings for the plugin's own tests."""

import torch
import transformers.models.llama.modeling_llama  # noqa: F401

# The plugin imports torch and transformers lazily, inside the first kv fixture. pytester's in-process runs unload
# every module imported during the run, and torch's extensions cannot be imported twice, so the heavy modules are
# loaded here, before any pytester run.

# The tiny model's ops are far too small to gain from intra-op threads; on a 2-core runner shared with other
# jobs, two torch threads oversubscribe the CPU and make every engine run ~10x slower. One thread also keeps
# in-process pytester runs (calibration and timed rounds alike) on the same footing.
torch.set_num_threads(1)
