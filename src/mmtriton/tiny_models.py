"""Deterministic tiny random-weight checkpoints, built offline in seconds (no model hub here).

Two models share one byte-level BPE tokenizer with the Qwen special tokens and one chat template:
- ``qwen2-vl``: Qwen2VLForConditionalGeneration (image + video), an image is 4–16 tokens;
- ``qwen2-audio``: Qwen2AudioForConditionalGeneration.
A third, ``qwen2.5-omni`` (a Qwen2.5-Omni thinker: image + audio + video in one prompt), has its own tokenizer,
trained the same way on Omni's special tokens (``<|IMAGE|>``, ``<|VIDEO|>``, ``<|vision_bos|>`` …).
Weights are drawn from a seeded generator with std 0.15 so greedy output varies (wiring mistakes then change
tokens). Every build writes byte-identical files. Run ``python -m mmtriton.tiny_models`` to build them.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mmtriton.settings import cache_dir

SEED = 1234
WEIGHT_STD = 0.15

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_eos|>",
]
VOCAB_SIZE = 1024

# Qwen-style template: text, image(_url), video(_url) and audio parts; one placeholder per media item
# (the processor or vLLM expands it to the item's token count).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] in ('audio', 'audio_url', 'input_audio') %}<|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Describe the image in one sentence. What is in this picture?",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A red square, a blue circle and a green triangle on a white background.",
    "Listen to the audio clip and tell me what you hear: a tone, speech or music.",
    "Triton Inference Server serves models over HTTP and gRPC with dynamic batching.",
    "vLLM runs prefill and decode; the KV cache moves between engines over NIXL.",
    "Hello, world! How are you today? I am fine, thank you. 0123456789",
    "Video frames are sampled at two frames per second and merged into patches.",
] * 4

_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,  # CPU attention supports 32
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


def build_tokenizer(special_tokens: list[str] = SPECIAL_TOKENS, chat_template: str = CHAT_TEMPLATE,
                    named_tokens: dict[str, str] | None = None):
    """A byte-level BPE over ``_CORPUS`` with ``special_tokens`` first (ids 0..n-1). ``named_tokens`` become
    tokenizer attributes (``image_token`` …) that Qwen2.5-Omni's processor reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={},
        additional_special_tokens=special_tokens[1:],
        chat_template=chat_template,
        model_max_length=4096,
        **(named_tokens or {}),
    )


def _redraw(model, seed: int) -> None:
    """Re-draw every matrix (embeddings, projections) with std 0.15 from a seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * WEIGHT_STD)


def _ids(tokenizer, special_tokens: list[str] = SPECIAL_TOKENS) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in special_tokens}


def _text_config(ids: dict[str, int], **extra) -> dict:
    return dict(
        **_TEXT,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def build_qwen2_vl(out: Path, tokenizer) -> None:
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    ids = _ids(tokenizer)
    config = Qwen2VLConfig(
        text_config=_text_config(
            ids,
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
        ),
        vision_config=dict(
            depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    _redraw(model, SEED)
    # One 28x28 merged patch = one token: 56x56..112x112 pixels → 4..16 tokens per image.
    pixels = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**pixels)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


def build_qwen2_audio(out: Path, tokenizer) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    ids = _ids(tokenizer)
    config = Qwen2AudioConfig(
        audio_config=dict(
            d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=128,
            max_source_positions=1500,
        ),
        text_config=_text_config(ids, model_type="qwen2", rope_theta=10000.0),
        audio_token_index=ids["<|AUDIO|>"],
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = Qwen2AudioForConditionalGeneration(config).to(torch.float32).eval()
    _redraw(model, SEED + 1)
    feature_extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000)
    processor = Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        audio_token="<|AUDIO|>", audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
    )
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # transformers 5 writes the LM as language_model.model.model.*; vLLM wants language_model.model.*
    # (HF reads both). Rewrite the weights file with the names vLLM expects.
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    renamed = {k.replace("language_model.model.model.", "language_model.model."): v for k, v in tensors.items()}
    save_file(dict(sorted(renamed.items())), weights, metadata={"format": "pt"})


# Qwen2.5-Omni's own names (its processor reads them as tokenizer attributes; vLLM's thinker processor then
# expands <|IMAGE|> / <|VIDEO|> / <|AUDIO|> to the item's token count). Own list, own tokenizer: adding these to
# SPECIAL_TOKENS would renumber the shared vocabulary and change the other two models' bytes.
OMNI_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|IMAGE|>",
    "<|VIDEO|>",
    "<|audio_bos|>",
    "<|AUDIO|>",
    "<|audio_eos|>",
]
OMNI_NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
OMNI_CHAT_TEMPLATE = (
    CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|vision_bos|><|IMAGE|><|vision_eos|>")
    .replace("<|vision_start|><|video_pad|><|vision_end|>", "<|vision_bos|><|VIDEO|><|vision_eos|>")
)


def build_qwen2_5_omni(out: Path, _shared_tokenizer) -> None:
    """A Qwen2.5-Omni thinker only (no talker / token2wav): ``Qwen2_5OmniForConditionalGeneration`` with
    ``enable_audio_output=False``, weights ``thinker.*`` as vLLM's qwen2_5_omni_thinker.py maps them."""
    import torch
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer = build_tokenizer(OMNI_SPECIAL_TOKENS, OMNI_CHAT_TEMPLATE, OMNI_NAMED_TOKENS)
    ids = _ids(tokenizer, OMNI_SPECIAL_TOKENS)
    thinker = dict(
        text_config=_text_config(
            ids,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        ),
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=_TEXT["hidden_size"],
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
            fullatt_block_indexes=[1],
        ),
        audio_config=dict(
            d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=128,
            max_source_positions=1500, n_window=100, output_dim=_TEXT["hidden_size"],
        ),
        audio_token_index=ids["<|AUDIO|>"],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"],  # M-RoPE finds each image / video by it
        vision_end_token_id=ids["<|vision_eos|>"],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    config = Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False, torch_dtype="float32")
    torch.manual_seed(SEED)
    model = Qwen2_5OmniForConditionalGeneration(config).to(torch.float32).eval()
    _redraw(model, SEED + 2)
    # Images as Qwen2-VL: 4..16 tokens. Videos keep the class default size (128..768 merged patches per frame
    # pair): Qwen2_5OmniProcessor imposes exactly that on every call unless the caller passes min/max_pixels, so
    # a smaller saved size would only mislead a loader that resizes frames "within the processor's limits".
    # cap_pixels_per_frame=False: today's behaviour, pinned (transformers 5.22 changes the default).
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=False),
        feature_extractor=WhisperFeatureExtractor(feature_size=128, sampling_rate=16000),
        tokenizer=tokenizer,
        chat_template=OMNI_CHAT_TEMPLATE,
    )
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)


BUILDERS = {"qwen2-vl": build_qwen2_vl, "qwen2-audio": build_qwen2_audio, "qwen2.5-omni": build_qwen2_5_omni}


def tree_digest(path: Path) -> str:
    """sha256 over every file's relative name and bytes: equal digests mean byte-identical builds."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def build_all(root: Path) -> dict[str, Path]:
    """Build every tiny model under ``root`` (overwriting)."""
    import torch

    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    out: dict[str, Path] = {}
    for name, builder in BUILDERS.items():
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        builder(target, tokenizer)
        out[name] = target
    return out


def build_stamp() -> str:
    """Changes whenever what a build writes could change: this file or the transformers version."""
    import transformers

    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"{source} transformers-{transformers.__version__}"


def ensure_tiny_models(root: Path | None = None, progress: bool = False) -> dict[str, Path]:
    """Build the tiny models once; later calls return the cached paths at once."""
    root = root or cache_dir() / "tiny"
    stamp = root / "BUILD"
    paths = {name: root / name for name in BUILDERS}
    want = build_stamp()

    def built() -> bool:
        return stamp.exists() and stamp.read_text().strip() == want and all(p.exists() for p in paths.values())

    if built():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    # Several model stubs may start at once: one builds, the others wait and reuse.
    with open(root.parent / ".tiny-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built():
            _build_into(root, paths, want, progress)
    return paths


def _build_into(root: Path, paths: dict[str, Path], want: str, progress: bool) -> None:
    stamp = root / "BUILD"
    if progress:
        print(f"Building tiny models in {root} …", flush=True)
    t0 = time.monotonic()
    # Build beside the target and swap in, so a killed build never leaves a half-written cache.
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        build_all(Path(tmp))
        for name in BUILDERS:
            if paths[name].exists():
                shutil.rmtree(paths[name])
            shutil.move(str(Path(tmp) / name), paths[name])
    stamp.write_text(want + "\n")
    if progress:
        print(f"Built tiny models in {time.monotonic() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmtriton.tiny_models", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="build here (default: the cache, if missing)")
    parser.add_argument("--quiet", action="store_true", help="print only what was built")
    args = parser.parse_args(argv)
    if args.out:
        paths = build_all(args.out)
    else:
        paths = ensure_tiny_models(progress=True)
        if args.quiet:
            print(f"[setup] tiny models: {', '.join(str(p) for p in paths.values())}")
            return 0
    print(json.dumps({name: {"path": str(p), "sha256": tree_digest(p)} for name, p in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
