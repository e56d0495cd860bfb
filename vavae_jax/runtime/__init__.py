"""Pieces shared by both packages: mesh and sharding, checkpointing, logging."""
