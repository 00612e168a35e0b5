"""Soak: thousands of mixed requests across the three served paths, checking that nothing is lost, wrong or leaked.

    .venv/bin/python bench/soak.py [--requests 2000] [--concurrency 16] [--cancel-fraction 0.1] [--url H:P]

Starts its own tritonserver (every pipeline model, the tiny Qwen2-VL) unless ``--url`` names a running one, warms
up, then sends ``--requests`` requests at ``--concurrency`` spread over ``multimodal``, ``multimodal_bls`` and
``multimodal_agg``: text only, one image, two images (images from a pool of 500 distinct synthetic ones, so the
media cache and vLLM's caches do not hide work), greedy, 16-24 tokens; a ``--cancel-fraction`` of them are cancelled
by the client mid-stream (it closes its stream after the first 1-3 responses). Every request has a client timeout.

Checks, then prints a summary and exits 1 when one fails:
- wrong: every answer equals the reference tokens for its input (a cancelled one: their prefix). The references
  are computed once per distinct input on multimodal_agg, after the soak, so they do not warm the caches for it;
- lost: no final response within the client timeout; errors: the server answered with an error;
- RSS: per process of the launcher's tree (tritonserver, each stub, each vLLM process), sampled after the warm-up,
  half way and at the end: growth ≤ 5 % (a restarted process fails the check: it died under plain load);
- the encoder's embedding pool is empty at the end (``mmtriton_embedding_pool{model="encoder_image"}``).
"""

from __future__ import annotations

import argparse
import base64
import random
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import GrpcStreamClient, InferenceFailed, RequestInputs, cancel_decode  # noqa: E402
from mmtriton.server import TritonServer  # noqa: E402
from mmtriton.supervisor import STUB_BINARY  # noqa: E402
from mmtriton.testing import bench_server_config, metric_value, pattern_image, png_bytes  # noqa: E402

PATHS = ("multimodal", "multimodal_bls", "multimodal_agg")
REFERENCE_PATH = "multimodal_agg"
KINDS = ("text", "image", "two_images")
IMAGE_POOL = 500
TEXT_POOL = 100
MIN_TOKENS, MAX_TOKENS = 16, 24
RSS_LIMIT_PCT = 5.0
# Seeds of the warm-up images: outside the pool, so the warm-up leaves none of the soak's inputs in a cache.
WARMUP_SEED0 = 100_000
WARMUP_IMAGES = 48
PROMPTS = ("Describe the image.", "What colours do you see?", "Count the shapes.", "Is there any text here?",
           "Compare the two pictures.", "What is in the corner?")


@dataclass(frozen=True)
class Case:
    """One distinct input (prompt + images); the reference tokens are per case."""

    key: str
    prompt: str
    images: tuple[int, ...] = ()  # image seeds, in order


@dataclass(frozen=True)
class Job:
    index: int
    path: str
    kind: str
    case: Case
    max_tokens: int
    cancel_after: int | None = None  # close the stream after this many responses


@dataclass
class Outcome:
    job: Job
    status: str  # "ok" | "cancelled" | "lost" | "error"
    tokens: list[int] = field(default_factory=list)
    ttft_s: float | None = None
    e2e_s: float | None = None
    message: str = ""


class ImageUris:
    """data: URIs of the synthetic images by seed, made once (sizes vary, so do the token counts)."""

    def __init__(self) -> None:
        self._uris: dict[int, str] = {}
        self._lock = threading.Lock()

    def __call__(self, seed: int) -> str:
        with self._lock:
            if seed not in self._uris:
                size_rng = random.Random(seed)
                img = pattern_image(size_rng.randrange(56, 113), size_rng.randrange(56, 113), seed=seed)
                self._uris[seed] = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
            return self._uris[seed]


def make_jobs(n: int, cancel_fraction: float, rng: random.Random, image_seeds: list[int],
              text_ids: Iterable[int]) -> list[Job]:
    """``n`` jobs: paths in turn, kinds at random, images drawn from a shuffled cycle over ``image_seeds`` (every
    image is used before any repeats)."""
    text_ids = list(text_ids)
    cycle: list[int] = []

    def next_image() -> int:
        if not cycle:
            cycle.extend(rng.sample(image_seeds, len(image_seeds)))
        return cycle.pop()

    jobs = []
    for i in range(n):
        kind = rng.choice(KINDS)
        prompt = PROMPTS[rng.randrange(len(PROMPTS))]
        if kind == "text":
            t = rng.choice(text_ids)
            case = Case(f"text:{t}", f"Tell me about the number {t}.")
        elif kind == "image":
            seed = next_image()
            case = Case(f"image:{seed}:{prompt}", prompt, (seed,))
        else:
            a, b = next_image(), next_image()
            case = Case(f"two:{a},{b}:{prompt}", prompt, (a, b))
        cancel = rng.randint(1, 3) if rng.random() < cancel_fraction else None
        jobs.append(Job(i, PATHS[i % len(PATHS)], kind, case, rng.randint(MIN_TOKENS, MAX_TOKENS), cancel))
    return jobs


def request_inputs(job: Job, uris: ImageUris) -> RequestInputs:
    return RequestInputs(
        text_input=job.case.prompt,
        image_url=[uris(s) for s in job.case.images] or None,
        # min_tokens = max_tokens: every answer has its full length, so the load is what the job says.
        sampling_parameters={"max_tokens": job.max_tokens, "min_tokens": job.max_tokens, "temperature": 0},
        stream=True,
    )


class Worker:
    """One client thread's connection: reused between requests, replaced after a cancel or a failure (a
    cancelled or timed-out request's late responses must not reach the next request on the same stream)."""

    def __init__(self, url: str):
        self.url = url
        self.client: GrpcStreamClient | None = None

    def drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken stream is being dropped anyway
                pass

    def run(self, job: Job, uris: ImageUris, response_timeout_s: float, deadline_s: float) -> Outcome:
        out = Outcome(job, "ok")
        start = time.perf_counter()
        try:
            if self.client is None:
                self.client = GrpcStreamClient(self.url)
            request_id = uuid.uuid4().hex
            stream = self.client.generate(job.path, request_inputs(job, uris), timeout_s=response_timeout_s,
                                          request_id=request_id)
            for responses, response in enumerate(stream, start=1):
                out.ttft_s = out.ttft_s if out.ttft_s is not None else time.perf_counter() - start
                out.tokens += response["token_ids"]
                if job.cancel_after is not None and responses >= job.cancel_after:
                    out.status = "cancelled"
                    self.drop()  # closes the stream with cancel_requests=True: the server cancels the request
                    if job.path == "multimodal":  # the ensemble cannot pass it on to its running llm_decode
                        cancel_decode(self.url, request_id)
                    break
                if time.perf_counter() - start > deadline_s:
                    raise TimeoutError(f"no final response within {deadline_s:.0f} s")
        except TimeoutError as exc:
            out.status, out.message = "lost", str(exc)
            self.drop()
        except InferenceFailed as exc:
            out.status, out.message = "error", str(exc)[:300]
            self.drop()
        except Exception as exc:  # noqa: BLE001 - counted and reported
            out.status, out.message = "error", f"{type(exc).__name__}: {exc}"[:300]
            self.drop()
        out.e2e_s = time.perf_counter() - start
        return out


def run_jobs(url: str, jobs: list[Job], concurrency: int, uris: ImageUris, desc: str, response_timeout_s: float,
             deadline_s: float, at_fraction: tuple[float, Callable[[], None]] | None = None) -> list[Outcome]:
    """``jobs`` over ``concurrency`` client threads, with a tqdm bar; ``at_fraction`` = (f, fn): call fn once
    when that fraction of the jobs is done (the mid-soak RSS sample)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    pending = iter(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="req", dynamic_ncols=True)
    counts: Counter[str] = Counter()
    fired = threading.Event()

    def loop() -> None:
        worker = Worker(url)
        try:
            while True:
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                out = worker.run(job, uris, response_timeout_s, deadline_s)
                with lock:
                    outcomes.append(out)
                    counts[out.status] += 1
                    bar.update(1)
                    bar.set_postfix({k: counts[k] for k in ("ok", "cancelled", "lost", "error") if counts[k]},
                                    refresh=False)
                    due = at_fraction is not None and not fired.is_set() and len(outcomes) >= at_fraction[0] * len(jobs)
                    if due:
                        fired.set()
                if due:
                    at_fraction[1]()
        finally:
            worker.drop()

    threads = [threading.Thread(target=loop, name=f"{desc}-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    return sorted(outcomes, key=lambda o: o.job.index)


# ---- RSS of the server's process tree ----

@dataclass(frozen=True)
class ProcSample:
    pid: int
    create_time: float
    rss: int
    judged: bool  # tritonserver, stubs and vLLM processes; helpers (shells, resource trackers) are only listed


def _stub_model(argv: list[str]) -> str | None:
    # argv of a stub: stub <repository>/<model>/<version>/model.py ... (mmtriton.supervisor)
    if len(argv) > 1 and argv[0].endswith(STUB_BINARY):
        return Path(argv[1]).parents[1].name
    return None


def sample_tree(root_pid: int) -> dict[str, ProcSample]:
    """RSS of tritonserver and every descendant, labelled ``tritonserver``, ``<model> stub``, ``<model> <name>``
    (a stub's descendants: vLLM's engine and worker processes by their process name)."""
    root = psutil.Process(root_pid)
    samples: dict[str, ProcSample] = {"tritonserver": ProcSample(root.pid, root.create_time(),
                                                                 root.memory_info().rss, True)}
    for stub in root.children():
        try:
            model = _stub_model(stub.cmdline())
            if model is None:
                continue
            samples[f"{model} stub"] = ProcSample(stub.pid, stub.create_time(), stub.memory_info().rss, True)
            seen: Counter[str] = Counter()
            for child in sorted(stub.children(recursive=True), key=lambda p: p.pid):
                try:
                    name = child.name()
                    seen[name] += 1
                    label = f"{model} {name}" + (f"#{seen[name]}" if seen[name] > 1 else "")
                    samples[label] = ProcSample(child.pid, child.create_time(), child.memory_info().rss,
                                                name.startswith("VLLM"))
                except psutil.NoSuchProcess:
                    continue
        except psutil.NoSuchProcess:
            continue
    return samples


def listening_pid(port: int) -> int | None:
    """The process listening on ``port`` (for ``--url``: the tritonserver we did not start)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.AccessDenied:
        pass
    return None


# ---- metrics ----

def read_metrics(metrics_url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        return r.read().decode()


def engine_counters(text: str) -> dict[str, dict[str, float]]:
    """``mmtriton_engine`` cancelled / restarts per model that owns an engine."""
    out: dict[str, dict[str, float]] = {}
    for model in ("multimodal_agg", "llm_prefill", "llm_decode"):
        out[model] = {item: metric_value(text, "mmtriton_engine", default=0.0, item=item, model=model)
                      for item in ("cancelled", "restarts")}
    return out


def pool_state(metrics_url: str, settle_s: float) -> dict[str, float]:
    """The encoder_image embedding pool's gauges once ``bytes_in_use`` reads 0, or after ``settle_s`` (a region
    waits for the reader's ack; the gauges refresh every 0.5 s)."""
    deadline = time.monotonic() + settle_s
    while True:
        text = read_metrics(metrics_url)
        state = {item: metric_value(text, "mmtriton_embedding_pool", default=-1.0, item=item, model="encoder_image")
                 for item in ("bytes_in_use", "regions_in_use", "expired")}
        # -1: not exported (an encoder without a pool); nothing to wait for.
        if state["bytes_in_use"] <= 0 or time.monotonic() >= deadline:
            return state
        time.sleep(0.5)


# ---- checks and summary ----

def verify(outcomes: list[Outcome], references: dict[str, list[int]]) -> dict[int, str]:
    """Job index → "wrong: ..." / "unverified: ..." for each answer that does not match its reference."""
    problems: dict[int, str] = {}
    for o in outcomes:
        if o.status not in ("ok", "cancelled"):
            continue
        ref = references.get(o.job.case.key)
        if ref is None:
            problems[o.job.index] = "unverified: no reference"
            continue
        want = ref[:o.job.max_tokens] if o.status == "ok" else ref[:len(o.tokens)]
        if o.tokens != want or (o.status == "cancelled" and len(o.tokens) > o.job.max_tokens):
            problems[o.job.index] = f"wrong: {o.job.path} {o.job.case.key} got {o.tokens[:8]}… want {want[:8]}…"
    return problems


def compute_references(url: str, outcomes: list[Outcome], concurrency: int, uris: ImageUris,
                       response_timeout_s: float, deadline_s: float) -> tuple[dict[str, list[int]], list[str]]:
    """``MAX_TOKENS`` greedy tokens on multimodal_agg for every distinct input the soak sent (a shorter answer
    must be their prefix: min_tokens only masks the stop tokens below it). A failed reference is tried once more."""
    cases = {o.job.case.key: o.job.case for o in outcomes}
    references: dict[str, list[int]] = {}
    failures: list[str] = []
    todo = [Job(i, REFERENCE_PATH, "ref", c, MAX_TOKENS) for i, c in enumerate(cases.values())]
    for attempt in (1, 2):
        results = run_jobs(url, todo, concurrency, uris, f"references ({attempt})", response_timeout_s, deadline_s)
        for r in results:
            if r.status == "ok" and len(r.tokens) == MAX_TOKENS:
                references[r.job.case.key] = r.tokens
        todo = [r.job for r in results if r.job.case.key not in references]
        if not todo:
            break
        failures = [f"{r.job.case.key}: {r.status} {r.message}" for r in results if r.job.case.key not in references]
    return references, failures if todo else []


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f}" if values else "-"


def p99_ms(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000:.0f}"


def print_requests(outcomes: list[Outcome], problems: dict[int, str], wall_s: float) -> None:
    print(f"\nRequests ({len(outcomes)} in {wall_s:.0f} s, {len(outcomes) / wall_s:.1f} req/s; latencies of the "
          "completed answers)")
    header = (f"{'path':<16}{'kind':<12}{'sent':>6}{'ok':>6}{'cancel':>8}{'wrong':>7}{'lost':>6}{'errors':>8}"
              f"{'TTFT p50':>10}{'e2e p50':>9}{'e2e p99':>9}")
    print(header)
    print("-" * len(header))
    groups: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[(o.job.path, o.job.kind)].append(o)
        groups[(o.job.path, "all")].append(o)
        groups[("all", "all")].append(o)
    for path in (*PATHS, "all"):
        for kind in (*KINDS, "all") if path != "all" else ("all",):
            group = groups.get((path, kind), [])
            if not group:
                continue
            status = Counter(o.status for o in group)
            done = [o for o in group if o.status == "ok"]
            wrong = sum(1 for o in group if o.job.index in problems)
            print(f"{path:<16}{kind:<12}{len(group):>6}{status['ok']:>6}{status['cancelled']:>8}{wrong:>7}"
                  f"{status['lost']:>6}{status['error']:>8}"
                  f"{median_ms([o.ttft_s for o in done if o.ttft_s is not None]):>10}"
                  f"{median_ms([o.e2e_s for o in done]):>9}{p99_ms([o.e2e_s for o in done]):>9}")


def rss_verdicts(samples: list[tuple[str, dict[str, ProcSample]]]) -> list[tuple[str, list[str], str, bool]]:
    """Per process: label, RSS (MiB) at each sample, growth first → last, and whether it fails the check."""
    first, last = samples[0][1], samples[-1][1]
    rows = []
    for label, s0 in first.items():
        cells = []
        for _name, sample in samples:
            s = sample.get(label)
            cells.append(f"{s.rss / 2**20:.0f}" if s else "gone")
        end = last.get(label)
        if end is None or (end.pid, end.create_time) != (s0.pid, s0.create_time):
            rows.append((label, cells, "restarted" if end else "gone", s0.judged))
            continue
        growth = 100.0 * (end.rss - s0.rss) / s0.rss
        rows.append((label, cells, f"{growth:+.1f} %", s0.judged and growth > RSS_LIMIT_PCT))
    for label in last.keys() - first.keys():
        rows.append((label, ["-"] * (len(samples) - 1) + [f"{last[label].rss / 2**20:.0f}"], "new",
                     last[label].judged))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cancel-fraction", type=float, default=0.1)
    ap.add_argument("--url", help="gRPC host:port of a running tritonserver (default: start one)")
    ap.add_argument("--metrics-url", help="its metrics endpoint (default with --url: http://<host>:8002/metrics)")
    ap.add_argument("--warmup", type=int, default=240, help="warm-up requests (all paths and kinds, own images)")
    ap.add_argument("--timeout", type=float, default=60.0, help="client timeout per response, seconds")
    ap.add_argument("--deadline", type=float, default=180.0, help="client timeout per request, seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    uris = ImageUris()
    pool_seeds = list(range(1, IMAGE_POOL + 1))
    warm_seeds = list(range(WARMUP_SEED0, WARMUP_SEED0 + WARMUP_IMAGES))
    # Warm-up texts are outside the soak's too.
    warmup = make_jobs(args.warmup, args.cancel_fraction, rng, warm_seeds, range(TEXT_POOL, TEXT_POOL + 20))
    jobs = make_jobs(args.requests, args.cancel_fraction, rng, pool_seeds, range(TEXT_POOL))
    for seed in tqdm([*pool_seeds, *warm_seeds], desc="images", unit="img", dynamic_ncols=True):
        uris(seed)

    server: TritonServer | None = None
    if args.url:
        url = args.url
        host, port = url.rsplit(":", 1)
        metrics_url = args.metrics_url or f"http://{host}:8002/metrics"
        root_pid = listening_pid(int(port))
    else:
        from mmtriton.tiny_models import ensure_tiny_models

        config = bench_server_config(ensure_tiny_models()["qwen2-vl"], "soak-tritonserver.log")
        server = TritonServer(config)
        server.start()
        url, metrics_url = config.grpc_url, f"http://{config.host}:{config.metrics_port}/metrics"
        root_pid = server.process.pid
    try:
        if server is not None:
            print(f"tritonserver starting (log: {server.config.log_file}) …", flush=True)
            print(f"ready in {server.wait_ready(900, progress=True):.0f} s", flush=True)
        return soak(args, url, metrics_url, root_pid, server, warmup, jobs, uris)
    finally:
        if server is not None:
            server.stop()


def soak(args: argparse.Namespace, url: str, metrics_url: str, root_pid: int | None, server: TritonServer | None,
         warmup: list[Job], jobs: list[Job], uris: ImageUris) -> int:
    warm = run_jobs(url, warmup, args.concurrency, uris, "warm-up", args.timeout, args.deadline)
    warm_status = Counter(o.status for o in warm)
    print(f"warm-up: {dict(warm_status)}", flush=True)
    time.sleep(2)  # let the last cancels and acks land before the baseline sample
    samples: list[tuple[str, dict[str, ProcSample]]] = []

    def sample(name: str) -> None:
        if root_pid is not None:
            samples.append((name, sample_tree(root_pid)))

    sample("after warm-up")
    counters_before = engine_counters(read_metrics(metrics_url))
    t0 = time.perf_counter()
    outcomes = run_jobs(url, jobs, args.concurrency, uris, "soak", args.timeout, args.deadline,
                        at_fraction=(0.5, lambda: sample("half way")))
    wall = time.perf_counter() - t0
    pool = pool_state(metrics_url, settle_s=args.timeout + 15)  # an un-acked region expires after its ack timeout
    time.sleep(1)
    sample("end")
    counters_after = engine_counters(read_metrics(metrics_url))
    restarts = server.supervisor.stats() if server is not None and server.supervisor is not None else {}

    references, ref_failures = compute_references(url, outcomes, args.concurrency, uris, args.timeout, args.deadline)
    problems = verify(outcomes, references)

    status = Counter(o.status for o in outcomes)
    print_requests(outcomes, problems, wall)
    print(f"\nreferences: {len(references)} distinct inputs on {REFERENCE_PATH}"
          + (f", {len(ref_failures)} failed: {ref_failures[:2]}" if ref_failures else ""))
    for k, message in list(problems.items())[:5]:
        print(f"  job {k}: {message}")
    for o in [o for o in outcomes if o.status in ("lost", "error")][:5]:
        print(f"  job {o.job.index} {o.job.path} {o.job.kind} {o.status}: {o.message}")

    rss_failed = False
    if samples:
        print(f"\nRSS (MiB) of the server's process tree; growth = end vs after warm-up, limit {RSS_LIMIT_PCT:.0f} % "
              "(judged: tritonserver, stubs, VLLM processes)")
        header = f"{'process':<34}" + "".join(f"{name:>15}" for name, _ in samples) + f"{'growth':>12}  verdict"
        print(header)
        print("-" * len(header))
        for label, cells, growth, failed in rss_verdicts(samples):
            judged = samples[0][1].get(label, samples[-1][1].get(label))
            verdict = "FAIL" if failed else ("ok" if judged and judged.judged else "(listed)")
            rss_failed |= failed
            print(f"{label:<34}" + "".join(f"{c:>15}" for c in cells) + f"{growth:>12}  {verdict}")
    else:
        print("\nRSS: not measured (no process listens on the --url port here)")

    cancels = {m: counters_after[m]["cancelled"] - counters_before[m]["cancelled"] for m in counters_after}
    engine_restarts = {m: counters_after[m]["restarts"] - counters_before[m]["restarts"] for m in counters_after}
    print(f"\nclient cancels: {status['cancelled']}; engine cancels counted: "
          + ", ".join(f"{m} {v:.0f}" for m, v in cancels.items()))
    print("engine restarts during the soak: " + ", ".join(f"{m} {v:.0f}" for m, v in engine_restarts.items())
          + (f"; stub restarts (supervisor): {restarts}" if restarts else "; stub restarts (supervisor): none"))
    print(f"embedding pool (encoder_image) at the end: bytes_in_use {pool['bytes_in_use']:.0f}, regions_in_use "
          f"{pool['regions_in_use']:.0f}, expired {pool['expired']:.0f}")

    wrong = len(problems)
    failures = {
        "lost": status["lost"], "errors": status["error"], "wrong": wrong,
        "RSS growth": int(rss_failed), "pool not empty": int(pool["bytes_in_use"] > 0),
        "references failed": len(ref_failures),
    }
    failed = {k: v for k, v in failures.items() if v}
    print(f"\nverdict: {'FAIL ' + str(failed) if failed else 'PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
