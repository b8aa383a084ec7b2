"""Sequence models of D2L chapter 8 as a reproducible pipeline: library code shared by the tasks."""
