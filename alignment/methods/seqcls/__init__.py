"""Sequence-classification methods (reward model, classifier): a pooled score head and one trainer."""
