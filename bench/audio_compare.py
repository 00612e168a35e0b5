"""Audio: multimodal (ensemble) vs multimodal_bls vs multimodal_agg vs vLLM's own OpenAI server, one run, one machine.

1. Paths. One 2 s clip (a tone, 16 kHz WAV, as a data: URI), 24 tokens (``min_tokens`` 24 and ``ignore_eos``,
   so every path makes exactly 24; a request that does not is an error), greedy, streamed, at each concurrency.
   Triton paths over gRPC streaming on persistent connections warmed first (pipeline_compare.run_load); vLLM's
   server on the same checkpoint through chat completions with an ``audio_url`` part (vLLM 0.32 also takes
   ``input_audio``, which it turns into the same data: URI). TTFT and end-to-end p50/p90, req/s, errors, and
   each as a ratio to vLLM's server measured in the same run. vLLM's server and tritonserver run one after the
   other, not together (2 cores).
2. encoder_audio alone: ``--encoder-requests`` clips sent one at a time, then the same number of (different,
   so that none is a media-cache hit) clips from ``--encoder-concurrency`` threads at once, so Triton's dynamic
   batcher can put several in one forward pass of the tower; clips/s both ways and the
   ``mmtriton_encoder_batching`` gauges. Nobody reads those embeddings: they sit in the pool until the ack
   timeout (MMT_EMBEDDING_ACK_TIMEOUT_S, 60 s) expires them; a 2 s clip is ~25 KB of the 256 MiB pool.
3. Peak RSS growth while decoding the longest allowed clip (MMT_MAX_AUDIO_SECONDS), via bench/audio_decode_rss.py.

    .venv/bin/python bench/audio_compare.py [--concurrency 1 8] [--requests 30]
                                            [--url HOST:GRPC_PORT --metrics-url http://HOST:PORT/metrics]
                                            [--parts paths encoder rss]

Without --url it starts its own tritonserver (every pipeline model, the tiny Qwen2-Audio). The table is printed
and the figures saved as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from audio_decode_rss import encode, run_child, signal  # noqa: E402
from pipeline_compare import TRITON_PATHS, WARMUP, run_load  # noqa: E402
from stage_breakdown import GAUGE_SETTLE_S  # noqa: E402
from vllm_server import TINY_MODEL_ARGS, VllmOpenAIServerProcess  # noqa: E402

from client import GrpcStreamClient, InferenceFailed, build_inputs  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.settings import Settings  # noqa: E402
from mmtriton.testing import bench_server_config, free_port, metric_value, tone, wav_bytes  # noqa: E402
from mmtriton.tiny_models import ensure_tiny_models  # noqa: E402

PROMPT = "What do you hear?"
MAX_TOKENS = 24
SAMPLING = {"max_tokens": MAX_TOKENS, "min_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
RATE = 16000  # Qwen2-Audio's feature extractor rate: no resampling on either side
CLIP_SECONDS = 2.0
VLLM_PATH = "vLLM server"

Sample = tuple[float, float]  # (ttft_s, e2e_s)
Send = Callable[[], Sample]


def data_uri(wav: bytes) -> str:
    return "data:audio/wav;base64," + base64.b64encode(wav).decode()


def noisy_clip(seed: int) -> str:
    """A 2 s tone with a little seeded noise: a different data: URI per seed (no media-cache hits)."""
    noise = 0.01 * np.random.default_rng(seed).standard_normal(int(CLIP_SECONDS * RATE))
    return data_uri(wav_bytes(tone(CLIP_SECONDS, RATE) + noise.astype(np.float32), RATE))


class Measured:
    """A ``send()`` for run_load that also keeps every measured (ttft, e2e), for percentiles (run_load gives
    medians only), and ticks a progress bar. run_load's threads are new per call and each makes WARMUP
    warm-up calls first, so a thread's calls after its WARMUP-th are the measured ones."""

    def __init__(self, send: Send, bar: tqdm):
        self.send = send
        self.bar = bar
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._calls = threading.local()

    def __call__(self) -> Sample:
        n = getattr(self._calls, "n", 0)
        self._calls.n = n + 1
        try:
            sample = self.send()
        finally:
            self.bar.update(1)
        if n >= WARMUP:
            with self._lock:
                self.samples.append(sample)
        return sample


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def measure(send: Send, concurrency: int, requests: int, desc: str) -> dict[str, float]:
    per_thread = max(1, requests // concurrency)  # what run_load sends
    with tqdm(total=concurrency * (WARMUP + per_thread), desc=desc, unit="req", leave=False) as bar:
        measured = Measured(send, bar)
        figures = run_load(measured, concurrency, requests)
    ttft = [s[0] for s in measured.samples]
    e2e = [s[1] for s in measured.samples]
    return {"ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
            "e2e_p50_ms": percentile(e2e, 50), "e2e_p90_ms": percentile(e2e, 90),
            "rps": figures["rps"], "ok": len(measured.samples), "errors": figures["errors"]}


def chat_body(model: str, uri: str, stream: bool, kind: str = "audio", prompt: str = PROMPT,
              sampling: dict | None = None) -> bytes:
    """The OpenAI chat request with one ``kind`` ("audio", "video", …) part at ``uri`` and the prompt."""
    part = {"type": f"{kind}_url", f"{kind}_url": {"url": uri}}
    body = {"model": model, **(SAMPLING if sampling is None else sampling), "stream": stream,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": prompt}]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}  # the last chunk counts the tokens
    return json.dumps(body).encode()


def post(url: str, body: bytes):
    return urllib.request.urlopen(urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}),
                                  timeout=300)


def vllm_sender(base_url: str, body: bytes) -> Send:
    """One streamed chat request (``body``: chat_body(..., stream=True)). TTFT at the first chunk: vLLM sends it
    (the role, empty content) with the first engine output, i.e. the first token; the first chunk with text can
    come tokens later (a token that ends inside a UTF-8 character streams as "", common with the random-weight
    model's byte tokens)."""

    def send() -> Sample:
        start = time.perf_counter()
        first = None
        tokens = 0
        with post(f"{base_url}/chat/completions", body) as r:
            for line in r:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if tokens != MAX_TOKENS:
            raise RuntimeError(f"vLLM server made {tokens} tokens, not {MAX_TOKENS}")
        return (first or time.perf_counter()) - start, time.perf_counter() - start

    return send


class TritonSenders:
    """``send()`` per Triton path: each client thread keeps one warmed gRPC stream per path."""

    def __init__(self, grpc_url: str, uri: str):
        self.grpc_url = grpc_url
        self.inputs = build_inputs(PROMPT, sampling=SAMPLING)
        self.inputs.audio_url = [uri]
        self._local = threading.local()
        self._clients: list[GrpcStreamClient] = []
        self._lock = threading.Lock()

    def client(self, path: str) -> GrpcStreamClient:
        mine = self._local.__dict__.setdefault("clients", {})
        if path not in mine:
            mine[path] = GrpcStreamClient(self.grpc_url)
            with self._lock:
                self._clients.append(mine[path])
        return mine[path]

    def tokens(self, path: str) -> tuple[list[int], str]:
        responses = list(self.client(path).generate(path, self.inputs, timeout_s=120))
        return [t for r in responses for t in r["token_ids"]], "".join(r["text_output"] for r in responses)

    def sender(self, path: str) -> Send:
        def send() -> Sample:
            start = time.perf_counter()
            first = None
            tokens = 0
            for r in self.client(path).generate(path, self.inputs, timeout_s=120):
                first = first or time.perf_counter()
                tokens += len(r["token_ids"])
            if tokens != MAX_TOKENS:
                raise RuntimeError(f"{path} made {tokens} tokens, not {MAX_TOKENS}")
            return first - start, time.perf_counter() - start

        return send

    def close(self) -> None:
        for c in self._clients:
            c.close()


def bench_vllm_server(model: str, uri: str, levels: list[int], n: int, kind: str = "audio",
                      limits: dict[str, int] | None = None, **body) -> tuple[dict[int, dict], dict]:
    """vLLM's server at each concurrency, and its greedy answer (``text``, ``prompt_tokens``: to compare with
    ours). ``body``: chat_body's prompt / sampling."""
    # Served under its path (no --served-model-name): the model id the requests name.
    extra = [*TINY_MODEL_ARGS, "--max-num-seqs", "16", "--limit-mm-per-prompt", json.dumps(limits or {kind: 8})]
    print("starting vLLM's OpenAI server ...", flush=True)
    with VllmOpenAIServerProcess(model, free_port(), extra_args=extra,
                                 log_file=ROOT / "logs" / f"bench-vllm-server-{kind}.log") as server:
        with post(f"{server.base_url}/chat/completions", chat_body(model, uri, False, kind, **body)) as r:
            reply = json.loads(r.read())
        answer = {"text": reply["choices"][0]["message"]["content"], "prompt_tokens": reply["usage"]["prompt_tokens"]}
        send = vllm_sender(server.base_url, chat_body(model, uri, True, kind, **body))
        return {c: measure(send, c, n, f"{VLLM_PATH} c={c}") for c in levels}, answer


@contextmanager
def triton_server(args, model: str, kind: str = "audio") -> Iterator[tuple[str, str]]:
    """(gRPC url, metrics url): the one given, or a tritonserver of our own on ``model``."""
    if args.url:
        yield args.url, args.metrics_url
        return
    config = bench_server_config(model, f"bench-tritonserver-{kind}.log")
    print("starting tritonserver ...", flush=True)
    with TritonServer(config) as server:
        server.wait_ready(900, progress=True)
        yield config.grpc_url, f"http://{config.host}:{config.metrics_port}/metrics"


def bench_paths(grpc_url: str, uri: str, levels: list[int], n: int) -> tuple[dict[str, dict[int, dict]], dict]:
    senders = TritonSenders(grpc_url, uri)
    try:
        answers = {path: senders.tokens(path) for path in TRITON_PATHS}
        out = {path: {c: measure(senders.sender(path), c, n, f"{path} c={c}") for c in levels}
               for path in TRITON_PATHS}
    finally:
        senders.close()
    return out, answers


def batching_gauges(metrics_url: str) -> dict[str, float]:
    """encoder_audio's mmtriton_encoder_batching gauges (passes, requests served, most requests in one pass)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return {item: metric_value(text, "mmtriton_encoder_batching", 0.0, model="encoder_audio", item=item)
            for item in ("batches", "requests", "max_requests")}


def encode_once(client, uri: str) -> None:
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("audio_url", [1, 1], "BYTES")  # [batch, clips]
    tensor.set_data_from_numpy(np.array([[uri.encode()]], dtype=np.object_))
    result = client.infer("encoder_audio", [tensor], outputs=[grpcclient.InferRequestedOutput("embeddings")],
                          client_timeout=120)
    descriptors = result.as_numpy("embeddings")
    if descriptors is None or descriptors.shape != (1, 1):
        raise InferenceFailed(f"encoder_audio answered {None if descriptors is None else descriptors.shape}")


def bench_encoder(grpc_url: str, metrics_url: str, n: int, concurrency: int) -> dict[str, float]:
    import tritonclient.grpc as grpcclient

    clients = [grpcclient.InferenceServerClient(grpc_url) for _ in range(concurrency)]
    try:
        for seed in range(2 * n, 2 * n + concurrency):  # warm-up: connections, the tower's first pass
            encode_once(clients[0], noisy_clip(seed))
        sequential = [noisy_clip(seed) for seed in range(n)]
        concurrent = [noisy_clip(seed) for seed in range(n, 2 * n)]

        start = time.perf_counter()
        for uri in tqdm(sequential, desc="encoder_audio one at a time", unit="clip", leave=False):
            encode_once(clients[0], uri)
        sequential_s = time.perf_counter() - start

        time.sleep(GAUGE_SETTLE_S)
        before = batching_gauges(metrics_url)
        failures: list[str] = []
        ready = threading.Barrier(concurrency)
        with tqdm(total=n, desc=f"encoder_audio {concurrency} at once", unit="clip", leave=False) as bar:

            def worker(i: int) -> None:
                ready.wait()
                for uri in concurrent[i::concurrency]:
                    try:
                        encode_once(clients[i], uri)
                    except Exception as exc:  # noqa: BLE001 - counted and reported
                        failures.append(str(exc)[:200])
                    bar.update(1)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            concurrent_s = time.perf_counter() - start
        time.sleep(GAUGE_SETTLE_S)
        after = batching_gauges(metrics_url)
    finally:
        for c in clients:
            c.close()
    if failures:
        print(f"  encoder_audio: {len(failures)} of {n} concurrent requests failed, first: {failures[0]}")
    passes = after["batches"] - before["batches"]
    served = after["requests"] - before["requests"]
    return {"clips": n, "concurrency": concurrency, "sequential_clips_per_s": n / sequential_s,
            "concurrent_clips_per_s": (n - len(failures)) / concurrent_s, "errors": len(failures),
            "passes": passes, "requests_per_pass": served / passes if passes else float("nan"),
            "max_requests_gauge": after["max_requests"]}


def bench_decode_rss(max_seconds: float) -> dict[str, float | str]:
    """audio_decode_rss's child on a WAV of the longest allowed clip (what the paths above are sent)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.wav"
        path.write_bytes(encode("wav", signal(max_seconds, RATE, 1, 0), RATE))
        Path(f"{path}.warm").write_bytes(encode("wav", signal(1.0, RATE, 1, 1), RATE))
        print(f"decoding a {max_seconds:g} s WAV in a child process ...", flush=True)
        fit = run_child(path, RATE, max_seconds)
        return {"seconds_of_audio": max_seconds, "wav_bytes": path.stat().st_size,
                "decoded_mib": fit["out"] / 2**20, "peak_rss_growth_mib": fit["growth_mib"],
                "decode_s": fit["seconds"], "result": fit["result"]}


def print_paths(base: dict[int, dict], triton: dict[str, dict[int, dict]], levels: list[int]) -> None:
    print_path_table(f"1 clip of {CLIP_SECONDS:g} s (16 kHz WAV data: URI), {MAX_TOKENS} tokens streamed, greedy, "
                     f"tiny Qwen2-Audio", base, triton, levels)


def print_path_table(heading: str, base: dict[int, dict], triton: dict[str, dict[int, dict]],
                     levels: list[int]) -> None:
    """Each path per concurrency, with its ratio to vLLM's server measured in the same run (``base``)."""
    print(f"\n{heading}; x = path / vLLM server (same run)")
    print(f"{'path':<15}{'conc':>5}{'TTFT p50':>10}{'p90':>8}{'e2e p50':>9}{'p90':>8}{'req/s':>7}"
          f"{'TTFT x':>8}{'e2e x':>7}{'req/s x':>8}{'ok':>5}{'err':>5}")
    for c in levels:
        b = base[c]
        for path, r in [(VLLM_PATH, b), *((p, per_level[c]) for p, per_level in triton.items())]:
            print(f"{path:<15}{c:>5}{r['ttft_p50_ms']:>10.1f}{r['ttft_p90_ms']:>8.1f}{r['e2e_p50_ms']:>9.1f}"
                  f"{r['e2e_p90_ms']:>8.1f}{r['rps']:>7.2f}{r['ttft_p50_ms'] / b['ttft_p50_ms']:>8.2f}"
                  f"{r['e2e_p50_ms'] / b['e2e_p50_ms']:>7.2f}{r['rps'] / b['rps']:>8.2f}{r['ok']:>5}{r['errors']:>5}")


def print_encoder(e: dict[str, float]) -> None:
    print(f"\nencoder_audio alone, {e['clips']} clips of {CLIP_SECONDS:g} s: one at a time "
          f"{e['sequential_clips_per_s']:.1f} clips/s; {e['concurrency']} at once {e['concurrent_clips_per_s']:.1f} "
          f"clips/s ({e['concurrent_clips_per_s'] / e['sequential_clips_per_s']:.2f}x), {e['errors']} errors")
    print(f"  mmtriton_encoder_batching during the concurrent run: {e['passes']:.0f} forward passes, "
          f"{e['requests_per_pass']:.2f} requests per pass; max_requests (since start) {e['max_requests_gauge']:.0f}")


def print_rss(r: dict) -> None:
    print(f"\ndecode of the longest allowed clip ({r['seconds_of_audio']:g} s WAV, {r['wav_bytes'] / 2**20:.1f} MiB): "
          f"peak RSS +{r['peak_rss_growth_mib']:.1f} MiB for {r['decoded_mib']:.1f} MiB of float32 out, "
          f"{r['decode_s']:.2f} s ({r['result']})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--requests", type=int, default=30, help="measured requests per path and concurrency")
    ap.add_argument("--url", default="", help="a running tritonserver's gRPC HOST:PORT (default: start one)")
    ap.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics", help="with --url")
    ap.add_argument("--encoder-requests", type=int, default=32)
    ap.add_argument("--encoder-concurrency", type=int, default=8, help="encoder_audio's max_batch_size is 8")
    ap.add_argument("--parts", nargs="+", choices=["paths", "encoder", "rss"], default=["paths", "encoder", "rss"])
    args = ap.parse_args()
    (ROOT / "logs").mkdir(exist_ok=True)
    model = str(ensure_tiny_models(progress=True)["qwen2-audio"])
    uri = data_uri(wav_bytes(tone(CLIP_SECONDS, RATE), RATE))
    results: dict = {"args": vars(args), "model": model, "clip_seconds": CLIP_SECONDS, "max_tokens": MAX_TOKENS}

    out = ROOT / "bench" / "results" / f"audio_compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a later part's failure keeps the earlier figures
        out.write_text(json.dumps(results, indent=1, default=str))

    if "paths" in args.parts:
        results[VLLM_PATH], vllm_answer = bench_vllm_server(model, uri, args.concurrency, args.requests)
        vllm_text = vllm_answer["text"]
    if {"paths", "encoder"} & set(args.parts):
        with triton_server(args, model) as (grpc_url, metrics_url):
            if "paths" in args.parts:
                results["triton"], answers = bench_paths(grpc_url, uri, args.concurrency, args.requests)
                results["same_tokens_on_every_triton_path"] = len({tuple(t) for t, _ in answers.values()}) == 1
                results["same_text_as_vllm_server"] = {p: text == vllm_text for p, (_, text) in answers.items()}
                results["greedy"] = {"vllm_server_text": vllm_text, "triton_token_ids": answers["multimodal_agg"][0]}
                save()
                print_paths(results[VLLM_PATH], results["triton"], args.concurrency)
                print(f"greedy tokens equal on the Triton paths: {results['same_tokens_on_every_triton_path']}; "
                      f"text equal to vLLM server's: {results['same_text_as_vllm_server']}", flush=True)
            if "encoder" in args.parts:
                results["encoder_audio"] = bench_encoder(grpc_url, metrics_url, args.encoder_requests,
                                                         args.encoder_concurrency)
                save()
                print_encoder(results["encoder_audio"])
    if "rss" in args.parts:
        results["decode_rss"] = bench_decode_rss(Settings.load().max_audio_seconds)
        save()
        print_rss(results["decode_rss"])
    print(f"\nsaved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
