"""Model and tokenizer loading (``conf/model``)."""
