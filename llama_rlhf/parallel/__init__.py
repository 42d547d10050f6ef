"""Parallel building blocks: rank grid, communication primitives, sharded layers, vocab-parallel losses, ring attention."""
