"""Checkpoint readers (HF, Meta), strict sharded loading, saving and export."""
