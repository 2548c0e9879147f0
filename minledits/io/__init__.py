"""Reading and writing: load (models from the Hub, a folder or one checkpoint file), convert (original-format
checkpoints), tiny (a random model for offline tries), store (inversion files), image (pictures to tensors and
back), files (atomic writes)."""
