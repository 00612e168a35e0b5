"""Media loading on two axes: URL → bytes by scheme (transport.py), bytes → value by modality (image.py, audio.py:
MediaDecoder), joined by loader.MediaLoader (cache, single-flight) under one MediaPolicy. Knows nothing of Triton
or vLLM."""
