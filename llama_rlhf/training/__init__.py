"""Optimizer, gradient synchronisation, schedules, and the SFT and GRPO loops."""
