"""One process of ``tests/test_fsdp.py``'s launch under ``deploy/accelerate/fsdp_full.yaml``: ``ddp_worker``'s runs,
with the UNet sharded by accelerate's FSDP2 on the CPU.

accelerate turns its FSDP config (ACCELERATE_USE_FSDP) into DistributedType.FSDP only for GPU-like process groups
(``AcceleratorState.__init__`` in accelerate/state.py lists MULTI_GPU, MULTI_NPU, ...; never MULTI_CPU), so CPU
processes would train DDP replicas (prefdiff refuses that: ``sharding.fsdp_refusal``). torch's fully_shard itself
runs over gloo on the CPU; this worker relabels the gloo group MULTI_GPU right after accelerate made it (the
device stays the CPU), so that accelerate's own FSDP2 path (fsdp2_prepare_model, no_sync, clip_grad_norm_) shards
the UNet. Nothing else is changed. It also writes <out>/rank-<r>/fsdp.json: what accelerate made of the config.
"""

import json
import os
import sys
from pathlib import Path

from accelerate import state
from accelerate.utils import DistributedType

import ddp_worker
from prefdiff.training import trainable

_init = state.PartialState.__init__


def gloo_as_gpu_group(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.MULTI_GPU


state.PartialState.__init__ = gloo_as_gpu_group
MODELS = []
_model_init = trainable.TrainableUNet.__init__


def kept(self, *args, **kwargs):
    _model_init(self, *args, **kwargs)
    MODELS.append(self)


trainable.TrainableUNet.__init__ = kept

if __name__ == "__main__":
    ddp_worker.main()
    spec = json.loads(Path(sys.argv[1]).read_text())
    model = MODELS[-1]
    plugin = model.accelerator.state.fsdp_plugin
    full = sum(v.numel() for v in model.weights().values())
    local = sum((p.to_local() if model.sharded else p).numel() for p in model.raw_unet.parameters())
    report = {"distributed_type": str(model.accelerator.distributed_type), "sharded": model.sharded,
              "fsdp_version": plugin.fsdp_version, "reshard_after_forward": plugin.reshard_after_forward,
              "wrap": sorted(plugin.transformer_cls_names_to_wrap), "local_numel": local, "full_numel": full,
              "reference_sharded": model.ref_unet is not None and any(
                  type(p).__name__ == "DTensor" for p in model.ref_unet.parameters())}
    (Path(spec["out"]) / f"rank-{model.accelerator.process_index}" / "fsdp.json").write_text(json.dumps(report))
