"""Checks a neurofm run directory's TensorBoard event file with TensorBoard's own reader.

usage: check_events.py RUN_DIR
"""
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TRAIN = ["train/loss", "train/lr", "train/grad_norm", "train/cells_per_s", "train/tokens_per_s",
         "train/mfu", "train/data_wait_frac"]
VAL = ["val/loss", "val/perplexity", "val/masked_acc", "val/baseline_perplexity"]


def main(run_dir):
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    missing = [t for t in TRAIN + VAL if t not in tags["scalars"]]
    assert not missing, f"missing scalars {missing}; have {tags['scalars']}"
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == sorted(e.step for e in loss) and loss, "train/loss steps"
    assert all(math.isfinite(e.value) and e.value > 0 for e in loss), loss
    val = acc.Scalars("val/perplexity")[-1].value
    vloss = acc.Scalars("val/loss")[-1].value
    assert abs(math.exp(vloss) - val) < 1e-3 * val, (vloss, val)
    assert "config" in tags["tensors"], f"config text missing: {tags['tensors']}"
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert "[model]" in text and "d_model" in text, text
    print(f"ok: {len(tags['scalars'])} scalar tags, {len(loss)} train/loss points, "
          f"val perplexity {val:.3f}, config text {len(text)} chars")


if __name__ == "__main__":
    main(sys.argv[1])
