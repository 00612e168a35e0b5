"""encoder_image: image URLs → embeddings over NIXL (one JSON descriptor per image).
Thin adapter: mmtriton.triton_encoder.EncoderModel for images."""

from mmtriton.triton_encoder import EncoderModel


class TritonPythonModel(EncoderModel):
    KIND = "image"
