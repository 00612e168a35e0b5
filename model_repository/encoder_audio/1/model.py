"""encoder_audio: audio URLs → embeddings over NIXL (one JSON descriptor per clip).
Thin adapter: mmtriton.triton_encoder.EncoderModel for audio."""

from mmtriton.triton_encoder import EncoderModel


class TritonPythonModel(EncoderModel):
    KIND = "audio"
