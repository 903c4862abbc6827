"""Generation: local batched generation now; OpenAI-compatible batch clients and servers later."""
