"""Media loading: URL → bytes (fetch), bytes → image / audio (decoders). Knows nothing of Triton or vLLM."""
