"""Training victims: `loop` (the loop `train` and `train-ini` share: SGD + StepLR, model selection on val,
checkpoints, resume), `victim` (victim/1 artifacts and deployed victim.pt files read back), `torchrun` (this
process's rank in a multi-GPU job) and `jit` (every TorchScript call)."""
