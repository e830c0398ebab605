"""Combining checkpoints tensor by tensor: the arithmetic needs no model class, so it streams."""
