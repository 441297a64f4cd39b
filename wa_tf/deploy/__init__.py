"""Deployment: SavedModel, integer layer files and LiteRT models."""
