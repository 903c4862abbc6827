"""Data tools run through launch.py like methods: generation, rejection sampling, RM scoring, dedup."""
