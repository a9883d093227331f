"""Training Medusa heads: self-distillation data, Medusa-1 and Medusa-2 through accelerate, checkpoints, evaluation."""
