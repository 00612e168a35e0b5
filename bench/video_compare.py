"""Video: multimodal (ensemble) vs multimodal_bls vs multimodal_agg vs vLLM's own OpenAI server, one run, one machine.

1. paths: one 4 s 320x240 H.264 MP4 (30 fps, mmtriton.testing.video_bytes) as a data:video/mp4 URI, 24 tokens
   (min_tokens 24 and ignore_eos), greedy, streamed, at each concurrency. Triton paths over gRPC streaming on warmed
   persistent connections (audio_compare's TritonSenders / measure); vLLM's server on the same checkpoint through
   chat completions with a ``video_url`` part. Both sample the same 8 frames: ours by our default (2 fps), vLLM's
   by its Qwen2-VL loader (``Qwen2VLVideoBackend``: fps 2, ``num_frames`` ignored); checked before the run (frame
   indices of both loaders on these bytes) and by the prompt lengths both servers report. TTFT and e2e p50/p90,
   req/s, each as a ratio to vLLM's server in the same run. The same bytes every request: our media caches answer
   all but the first decode; vLLM decodes each time (its processor cache then skips the HF processor).
2. stages: per Triton path, ``--stage-requests`` requests one at a time, each a different video (no cache hit),
   and the server's ``mmtriton_stage_seconds`` / ``mmtriton_stage_count`` gauges (scraped before and after, as in
   bench/stage_breakdown.py): video_load (fetch + open + decode), encode, embedding_put / embedding_fetch
   (transfer), preprocess, first_token, decode.
3. loader: the same videos in this process, stage by stage: fetch (data: URI → bytes), open (container +
   metadata), decode frames (the rest of decode_video: packet index, seek, decode the sampled frames, RGB),
   preprocess (the checkpoint's Qwen2-VL video processor), encode (the vision tower).
4. decode: bench/video_decode.py, decode time as the video grows (2, 8, 32 s) with 8 frames sampled.

    .venv/bin/python bench/video_compare.py [--concurrency 1 8] [--requests 24] [--parts paths stages loader decode]
                                            [--url HOST:GRPC_PORT --metrics-url http://HOST:PORT/metrics]

Without --url it starts its own tritonserver (every pipeline model, the tiny Qwen2-VL) after vLLM's server has
stopped (2 cores). Tables printed; figures saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audio_compare import (  # noqa: E402
    VLLM_PATH,
    TritonSenders,
    bench_vllm_server,
    measure,
    print_path_table,
    triton_server,
)
from perf_analyzer_inputs import data_uri, sampling_parameters  # noqa: E402
from pipeline_compare import TRITON_PATHS  # noqa: E402
from stage_breakdown import GAUGE_SETTLE_S, scrape, stage_rows  # noqa: E402

from client import GrpcStreamClient, build_inputs  # noqa: E402
from mmtriton.media.transport import read_data_uri  # noqa: E402
from mmtriton.media.video import VideoLimits, decode_video  # noqa: E402
from mmtriton.settings import Settings  # noqa: E402
from mmtriton.testing import video_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

PROMPT = "Describe the video."
MAX_TOKENS = 24  # audio_compare's TritonSenders checks every request makes exactly this many
WIDTH, HEIGHT, SECONDS, FPS = 320, 240, 4.0, 30
# Our server's default sampling (MMT_VIDEO_FPS=2): 8 frames of a 4 s video, as vLLM's Qwen2-VL loader samples.
SAMPLING = {**sampling_parameters(MAX_TOKENS), "ignore_eos": True}
LIMITS = VideoLimits.from_settings(Settings())


def the_video(seed: int = 1) -> bytes:
    return video_bytes(WIDTH, HEIGHT, SECONDS, FPS, "mp4", seed=seed)


def vllm_indices(data: bytes) -> list[int]:
    """The frames vLLM's server samples from these bytes for Qwen2-VL (the loader its connector picks for
    Qwen2VLVideoProcessor, at its default fps)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, get_video_loader_backend_for_processor

    loader = VIDEO_LOADER_REGISTRY.load(get_video_loader_backend_for_processor("Qwen2VLVideoProcessor"))
    _frames, metadata = loader.load_bytes(data, num_frames=32)  # VideoMediaIO's default num_frames
    return list(metadata["frames_indices"])


def our_indices(data: bytes) -> list[int]:
    return list(decode_video(data, "video", LIMITS, fps=LIMITS.default_fps).indices)


class VideoSenders(TritonSenders):
    """audio_compare's per-thread warmed gRPC streams, sending the video instead of a clip."""

    def __init__(self, grpc_url: str, uri: str):
        super().__init__(grpc_url, uri)
        self.inputs = build_inputs(PROMPT, videos=[uri], sampling=SAMPLING)

    def answer(self, path: str) -> dict:
        responses = list(self.client(path).generate(path, self.inputs, timeout_s=180))
        return {"token_ids": [t for r in responses for t in r["token_ids"]],
                "text": "".join(r["text_output"] for r in responses),
                "prompt_tokens": int(responses[-1]["num_input_tokens"])}


def bench_paths(grpc_url: str, uri: str, levels: list[int], n: int) -> tuple[dict, dict]:
    senders = VideoSenders(grpc_url, uri)
    try:
        answers = {path: senders.answer(path) for path in TRITON_PATHS}
        out = {path: {c: measure(senders.sender(path), c, n, f"{path} c={c}") for c in levels}
               for path in TRITON_PATHS}
    finally:
        senders.close()
    return out, answers


def bench_stages(grpc_url: str, metrics_url: str, videos: dict[str, list[bytes]]) -> dict[str, dict]:
    """Per path, its videos one at a time on one warmed connection; the stage gauges' growth per request."""
    out = {}
    for path, datas in videos.items():
        with GrpcStreamClient(grpc_url) as client:
            warm = build_inputs(PROMPT, sampling={"max_tokens": 2})
            for _ in range(3):  # the connection's first streamed answers come in a burst (stage_breakdown.py)
                list(client.generate(path, warm, timeout_s=60))
            time.sleep(GAUGE_SETTLE_S)
            before = scrape(metrics_url)
            ttft, e2e = [], []
            for data in datas:
                inputs = build_inputs(PROMPT, videos=[data_uri(data, "video/mp4")], sampling=SAMPLING)
                start = time.perf_counter()
                first = None
                for _ in client.generate(path, inputs, timeout_s=180):
                    first = first or time.perf_counter()
                ttft.append(first - start)
                e2e.append(time.perf_counter() - start)
            time.sleep(GAUGE_SETTLE_S)
            rows = stage_rows(before, scrape(metrics_url), len(datas))
        out[path] = {"ttft_p50_ms": statistics.median(ttft) * 1e3, "e2e_p50_ms": statistics.median(e2e) * 1e3,
                     "stages": [{"model": m, "stage": s, "ms_per_request": ms, "per_request": k}
                                for m, s, ms, k in rows]}
    return out


def bench_loader(model: str, datas: list[bytes]) -> dict[str, float]:
    """Median ms per video of each loader stage, in this process (no server)."""
    import av

    from mmtriton.encoder import Qwen2VLImageEncoder

    encoder = Qwen2VLImageEncoder(model)
    stages: dict[str, list[float]] = {k: [] for k in ("fetch", "open", "decode frames", "preprocess", "encode")}
    uris = [data_uri(d, "video/mp4") for d in datas]
    encoder.encode_many([decode_video(datas[0], "warm", LIMITS, fps=LIMITS.default_fps)])  # first pass: warm-up
    for uri in uris:
        t0 = time.perf_counter()
        data = read_data_uri(uri, "video", "video", 1 << 30)
        t1 = time.perf_counter()
        with av.open(io.BytesIO(data), format="mov") as container:  # what decode_video opens first
            stream = container.streams.video[0]
            _ = (stream.frames, stream.average_rate, stream.duration, container.duration)
        t2 = time.perf_counter()
        video = decode_video(data, "video", LIMITS, fps=LIMITS.default_fps)
        t3 = time.perf_counter()
        pixels = encoder.video_processor(videos=[video.frames], do_sample_frames=False, return_tensors="pt")
        t4 = time.perf_counter()
        encoder.encode_many([video])  # runs the processor again, then the tower: the tower is the difference
        t5 = time.perf_counter()
        stages["fetch"].append(t1 - t0)
        stages["open"].append(t2 - t1)
        stages["decode frames"].append(max(0.0, (t3 - t2) - (t2 - t1)))  # decode_video opens the container too
        stages["preprocess"].append(t4 - t3)
        stages["encode"].append(max(0.0, (t5 - t4) - (t4 - t3)))
    out = {k: statistics.median(v) * 1e3 for k, v in stages.items()}
    out["frames"] = float(len(video.indices))
    out["video_tokens"] = float(pixels["video_grid_thw"].prod().item() // encoder.merge_size**2)
    return out


def bench_decode() -> str:
    """bench/video_decode.py as it is (its table), 8 frames sampled."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "video_decode.py"), "--num-frames", "8",
                          "--repeat", "3"], capture_output=True, text=True, timeout=600, check=True)
    return run.stdout


def print_paths(base: dict[int, dict], triton: dict[str, dict[int, dict]], levels: list[int]) -> None:
    print_path_table(f"1 video {SECONDS:g} s {WIDTH}x{HEIGHT} H.264 MP4 (data: URI, 8 frames sampled), {MAX_TOKENS} "
                     f"tokens streamed, greedy, tiny Qwen2-VL", base, triton, levels)


def print_stages(stages: dict[str, dict], n: int) -> None:
    print(f"\nper stage, server gauges (mmtriton_stage_seconds / _count, Triton's request/queue durations): "
          f"{n} different videos per path, one at a time; ms per request")
    for path, r in stages.items():
        print(f"{path}: TTFT p50 {r['ttft_p50_ms']:.1f} ms, e2e p50 {r['e2e_p50_ms']:.1f} ms")
        for s in r["stages"]:
            print(f"  {s['model']:16s} {s['stage']:16s} {s['ms_per_request']:8.2f} ms  ({s['per_request']:.1f} "
                  f"per request)")


def print_loader(r: dict[str, float]) -> None:
    print(f"\nloader stages in-process (median ms per video; {r['frames']:.0f} frames, {r['video_tokens']:.0f} "
          "video tokens):")
    print("  " + "  ".join(f"{k} {r[k]:.1f}" for k in ("fetch", "open", "decode frames", "preprocess", "encode")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=24, help="measured requests per path and concurrency")
    ap.add_argument("--stage-requests", type=int, default=6, help="different videos per path for the stage table")
    ap.add_argument("--url", default="", help="a running tritonserver's gRPC HOST:PORT (default: start one)")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help="with --url")
    ap.add_argument("--parts", nargs="+", choices=["paths", "stages", "loader", "decode"],
                    default=["paths", "stages", "loader", "decode"])
    args = ap.parse_args()
    (ROOT / "logs").mkdir(exist_ok=True)
    model = str(ensure_tiny_models(progress=True)["qwen2-vl"])
    data = the_video()
    uri = data_uri(data, "video/mp4")
    results: dict = {"args": vars(args), "model": model, "video": [WIDTH, HEIGHT, SECONDS, FPS, len(data)],
                     "max_tokens": MAX_TOKENS}
    out = ROOT / "bench" / "results" / f"video_compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a later part's failure keeps the earlier figures
        out.write_text(json.dumps(results, indent=1, default=str))

    ours, theirs = our_indices(data), vllm_indices(data)
    results["frame_indices"] = {"ours": ours, "vllm_server": theirs}
    print(f"sampled frames: ours {ours}, vLLM server's {theirs}" + ("" if ours == theirs else "  (DIFFERENT)"))
    n_stage = args.stage_requests
    distinct = [the_video(seed) for seed in range(100, 100 + len(TRITON_PATHS) * n_stage)] \
        if {"stages", "loader"} & set(args.parts) else []

    if "paths" in args.parts:
        results[VLLM_PATH], results["vllm_answer"] = bench_vllm_server(
            model, uri, args.concurrency, args.requests, kind="video", limits={"image": 8, "video": 8},
            prompt=PROMPT, sampling=SAMPLING)
        save()
    if "loader" in args.parts:
        results["loader"] = bench_loader(model, distinct[:n_stage])
        save()
        print_loader(results["loader"])
    if {"paths", "stages"} & set(args.parts):
        with triton_server(args, model, kind="video") as (grpc_url, metrics_url):
            if "paths" in args.parts:
                results["triton"], answers = bench_paths(grpc_url, uri, args.concurrency, args.requests)
                results["answers"] = answers
                vllm_answer = results["vllm_answer"]
                token_sets = {tuple(a["token_ids"]) for a in answers.values()}
                results["same_tokens_on_every_triton_path"] = len(token_sets) == 1
                results["same_as_vllm_server"] = {
                    p: {"text": a["text"] == vllm_answer["text"],
                        "prompt_tokens": a["prompt_tokens"] == vllm_answer["prompt_tokens"]}
                    for p, a in answers.items()}
                save()
                print_paths(results[VLLM_PATH], results["triton"], args.concurrency)
                print(f"prompt tokens: vLLM server {vllm_answer['prompt_tokens']}, ours "
                      f"{ {p: a['prompt_tokens'] for p, a in answers.items()} }; greedy tokens equal on the Triton "
                      f"paths: {results['same_tokens_on_every_triton_path']}; text equal to vLLM server's: "
                      f"{ {p: s['text'] for p, s in results['same_as_vllm_server'].items()} }", flush=True)
            if "stages" in args.parts:
                videos = {p: distinct[i * n_stage:(i + 1) * n_stage] for i, p in enumerate(TRITON_PATHS)}
                results["stages"] = bench_stages(grpc_url, metrics_url, videos)
                save()
                print_stages(results["stages"], n_stage)
    if "decode" in args.parts:
        results["decode_table"] = bench_decode()
        save()
        print("\ndecode time as the video grows (bench/video_decode.py --num-frames 8 --repeat 3):")
        print(results["decode_table"], end="")
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
