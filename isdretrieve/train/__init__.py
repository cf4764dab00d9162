"""Training: the engine, typed recipes, the methods (ISD, MoCo-v2, BYOL, DINO, SePP, AdaSim) over pure
loss functions, their memories, optimiser and schedules, checkpoints and the k-NN monitor."""
