"""Data sources, mixtures, validation and chat rendering (``conf/data``)."""
