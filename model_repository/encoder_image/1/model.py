"""encoder_image: image and video URLs → embeddings over NIXL (one JSON descriptor per item).
Thin adapter: mmtriton.triton_encoder.EncoderModel for Qwen2-VL's vision tower (images and videos)."""

from mmtriton.triton_encoder import EncoderModel


class TritonPythonModel(EncoderModel):
    KIND = "image"
