"""Datasets: loaders for the formats users download, offline generators, and conversion to samples."""
