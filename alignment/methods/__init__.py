"""Training methods, one module each; method families that share a trainer have a folder."""
