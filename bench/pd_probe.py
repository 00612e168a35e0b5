"""Probe prefill → decode through vLLM's NixlConnector on CPU, with image embeddings, and print the evidence.

Two vLLM engines (KV producer, KV consumer) in this process's children. For a prompt of several 128-token KV
blocks with an image given as embeddings, prints: decode tokens vs the same request run whole on one engine,
how many KV blocks were handed over, a tamper check (wrong remote block ids → other tokens, so decode really
used the transferred KV), and the idle CPU of each engine's processes.

    .venv/bin/python bench/pd_probe.py [--progress-thread] [--connector NixlConnector]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from mmtriton.testing import pattern_image  # noqa: E402


def idle_cpu(seconds: float = 3.0) -> dict[int, float]:
    import psutil

    time.sleep(3)  # past vLLM's 1 s busy-loop after the last message
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        p.cpu_percent(None)
    time.sleep(seconds)
    return {p.pid: p.cpu_percent(None) for p in procs if p.is_running()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--progress-thread", action="store_true", help="keep NIXL's progress thread (vLLM default)")
    ap.add_argument("--connector", default="QuietNixlConnector")
    ap.add_argument("--bind", nargs=2, default=None, metavar=("PREFILL", "DECODE"),
                    help="VLLM_CPU_OMP_THREADS_BIND per engine, e.g. 0 1 (default: vLLM's auto)")
    args = ap.parse_args()
    os.environ["MMT_NIXL_PROGRESS_THREAD"] = "1" if args.progress_thread else "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = "127.0.0.1"
    os.environ.setdefault("UCX_NET_DEVICES", "lo")

    import torch
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from mmtriton.encoder import Qwen2VLImageEncoder
    from mmtriton.tiny_models import ensure_tiny_models

    model = str(ensure_tiny_models()["qwen2-vl"])
    module = "mmtriton.kv_connector" if args.connector == "QuietNixlConnector" else None

    def engine(role: str, port: int) -> LLM:
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(port)
        if args.bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.bind[0 if role == "kv_producer" else 1]
        kv = KVTransferConfig(kv_connector=args.connector, kv_connector_module_path=module, kv_role=role,
                              kv_buffer_device="cpu")
        return LLM(model, dtype="float32", enforce_eager=True, max_model_len=4096, enable_mm_embeds=True,
                   limit_mm_per_prompt={"image": 4, "video": 0}, kv_transfer_config=kv, seed=0)

    encoded = Qwen2VLImageEncoder(model).encode_many([pattern_image(100, 80, seed=1)])
    mm = {"image": {"image_embeds": encoded[0].embeddings,
                    "image_grid_thw": torch.tensor([list(encoded[0].grid_thw)])}}
    long_text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 40)
    prompt_text = (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{long_text} Describe the image."
                   "<|im_end|>\n<|im_start|>assistant\n")

    t0 = time.monotonic()
    prefill = engine("kv_producer", 5611)
    decode = engine("kv_consumer", 5612)
    print(f"two engines up in {time.monotonic() - t0:.0f} s", flush=True)

    whole = prefill.generate({"prompt": prompt_text, "multi_modal_data": mm},
                             SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)[0]
    want = list(whole.outputs[0].token_ids)

    def run_pd(tamper: bool = False) -> tuple[list[int], dict]:
        p = prefill.generate({"prompt": prompt_text, "multi_modal_data": mm}, SamplingParams(
            max_tokens=1, temperature=0, extra_args={"kv_transfer_params": {"do_remote_decode": True}}),
            use_tqdm=False)[0]
        params = copy.deepcopy(p.kv_transfer_params)
        if tamper:
            params["remote_block_ids"] = [list(reversed(ids)) if isinstance(ids, list) else ids
                                          for ids in params["remote_block_ids"]]
        # Decode gets zeros of the right shape: the KV comes from prefill (see ENVIRONMENT.md on M-RoPE).
        zeros = {"image": {"image_embeds": torch.zeros_like(encoded[0].embeddings),
                           "image_grid_thw": mm["image"]["image_grid_thw"]}}
        d = decode.generate({"prompt": prompt_text, "multi_modal_data": zeros}, SamplingParams(
            max_tokens=24, temperature=0, extra_args={"kv_transfer_params": params}), use_tqdm=False)[0]
        return list(d.outputs[0].token_ids), p.kv_transfer_params

    got, params = run_pd()
    t0 = time.perf_counter()
    whole_again = prefill.generate({"prompt": prompt_text, "multi_modal_data": mm},
                                   SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
    t_whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_pd()
    t_pd = time.perf_counter() - t0
    print(f"24 tokens: whole request on one engine {t_whole * 1000:.0f} ms; prefill → decode {t_pd * 1000:.0f} ms")
    del whole_again
    n_prompt = len(whole.prompt_token_ids)
    print(f"prompt tokens {n_prompt} → {n_prompt // 128} full 128-token blocks")
    print(f"kv_transfer_params keys: {sorted(params)}; remote_block_ids: {params.get('remote_block_ids')}")
    print(f"decode tokens == whole request on one engine: {got == want}")
    print(f"  whole : {want[:12]}\n  decode: {got[:12]}")
    tampered, _ = run_pd(tamper=True)
    print(f"tampered block ids change the tokens (so decode used the transferred KV): {tampered != want}")
    cpu = idle_cpu()
    thread = "on" if args.progress_thread else "off"
    print(f"idle CPU % per engine process, 3 s measured after 3 s idle (progress thread {thread}):")
    for pid, pct in cpu.items():
        print(f"  pid {pid}: {pct:.0f}%")
    print(f"  total: {sum(cpu.values()):.0f}%")
    return 0 if got == want else 1


if __name__ == "__main__":
    sys.exit(main())
