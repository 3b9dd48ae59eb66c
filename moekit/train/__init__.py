"""Training: data and tokenizers, optimizer and schedules, the loop, checkpoints."""
