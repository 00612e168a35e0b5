#!/usr/bin/env bash
# bench/aiperf.sh — benchmark an OpenAI-compatible chat endpoint with NVIDIA AIPerf: synthetic text prompts, each
# with synthetic image(s) sent inline as data: URLs, streamed (SSE), at a fixed concurrency for a fixed number of
# requests. Prints AIPerf's summary tables and a one-line result; every artifact (summary CSV/JSON, per-request
# JSONL, inputs.json, AIPerf's log) goes under bench/results/aiperf/<run>/ (git-ignored).
#
# AIPerf lives in its own virtual environment, ${MMT_CACHE_DIR:-~/.cache/mmtriton}/aiperf-venv (Python 3.11,
# aiperf pinned below), never in the project's .venv. The first run creates it: ~1.2 GB, about 1.5 min with a warm
# pip cache and ~3 min without. Later runs reuse it; a run of 20 requests then takes ~15 s (AIPerf itself needs
# ~10 s to start its services and load the tokenizer).
#
# Token counting needs a tokenizer *directory*: by default the tiny Qwen2-VL's (built by the project, needs .venv);
# pass --tokenizer DIR for a real checkpoint. AIPerf's `--tokenizer builtin` downloads a tiktoken file, and a hub
# name downloads from the hub: neither works without network access.
#
#   bench/aiperf.sh                                     # http://127.0.0.1:9000, model multimodal_agg
#   bench/aiperf.sh --url http://127.0.0.1:18000 --model multimodal_bls --concurrency 2 --requests 50
#   bench/aiperf.sh --setup-only                        # just create the venv
#   bench/aiperf.sh ... -- --extra-inputs ignore_eos:true   # anything after -- goes to `aiperf profile` as is
set -euo pipefail

AIPERF_VERSION=0.13.0
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_DIR=${MMT_CACHE_DIR:-$HOME/.cache/mmtriton}
VENV=$CACHE_DIR/aiperf-venv
PYTHON=${MMT_AIPERF_PYTHON:-python3.11}

url=http://127.0.0.1:9000
model=multimodal_agg
concurrency=1
requests=20
tokenizer=
isl=64
osl=24
image_size=128x128
images=1
image_format=png
warmup=1
seed=0
artifact_dir=
raw=0
server_tokens=0
allow_errors=0
verbose=0
setup_only=0
extra=()

usage() {
    cat <<EOF
usage: bench/aiperf.sh [options] [-- extra aiperf profile arguments]

Benchmark an OpenAI-compatible /v1/chat/completions endpoint with AIPerf $AIPERF_VERSION (streamed, with images).

  --url URL            server base URL, without /v1 (default $url)
  --model NAME         model id the server lists at /v1/models (default $model)
  --concurrency N      concurrent requests (default $concurrency)
  --requests N         requests to measure (default $requests)
  --tokenizer DIR      tokenizer directory for token counts (default: the tiny Qwen2-VL under
                       \${MMT_CACHE_DIR:-~/.cache/mmtriton}/tiny, built with .venv if missing)
  --isl N              synthetic prompt length in tokens (default $isl)
  --osl N              max_completion_tokens per request (default $osl)
  --image-size WxH     synthetic image size in pixels (default $image_size)
  --images N           images per request; 0 = text only (default $images)
  --image-format F     png | jpeg | random (default $image_format)
  --warmup N           warm-up requests, not measured (default $warmup)
  --seed N             AIPerf's random seed, for the same prompts and images each run (default $seed)
  --artifact-dir DIR   where AIPerf writes (default bench/results/aiperf/<model>-c<N>-n<N>-<time>)
  --raw                also export every request and response body (profile_export_raw.jsonl)
  --server-tokens      count tokens from the server's usage (stream_options.include_usage) instead of the
                       tokenizer; right for the tiny model, whose tokenizer does not round-trip its own output
  --allow-errors       exit 0 even if some requests failed (default: exit 3)
  --verbose            show AIPerf's own log on the terminal while it runs
  --setup-only         create/check the venv and exit
  -h, --help           this help

Environment: MMT_CACHE_DIR (venv and tiny models), MMT_AIPERF_PYTHON (interpreter for the venv, default python3.11).
Exit status: AIPerf's own (non-zero when it could not run or every request failed), 3 when some requests failed.
EOF
}

die() { echo "aiperf.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --url) url=$2; shift 2 ;;
        --model) model=$2; shift 2 ;;
        --concurrency) concurrency=$2; shift 2 ;;
        --requests|--request-count) requests=$2; shift 2 ;;
        --tokenizer) tokenizer=$2; shift 2 ;;
        --isl) isl=$2; shift 2 ;;
        --osl) osl=$2; shift 2 ;;
        --image-size) image_size=$2; shift 2 ;;
        --images) images=$2; shift 2 ;;
        --image-format) image_format=$2; shift 2 ;;
        --warmup) warmup=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --artifact-dir) artifact_dir=$2; shift 2 ;;
        --raw) raw=1; shift ;;
        --server-tokens) server_tokens=1; shift ;;
        --allow-errors) allow_errors=1; shift ;;
        --verbose) verbose=1; shift ;;
        --setup-only) setup_only=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ $image_size =~ ^([0-9]+)x([0-9]+)$ ]] || die "--image-size must be WxH, e.g. 128x128"
image_w=${BASH_REMATCH[1]}
image_h=${BASH_REMATCH[2]}
for n in "$concurrency" "$requests" "$isl" "$osl" "$images" "$warmup" "$seed"; do
    [[ $n =~ ^[0-9]+$ ]] || die "expected a whole number, got '$n'"
done
url=${url%/}
url=${url%/v1}

# ---- the venv: created once, reused while its marker names this version --------------------------------------
setup_venv() {
    local marker=$VENV/.mmt-aiperf-$AIPERF_VERSION log=$CACHE_DIR/aiperf-install.log
    [[ -f $marker && -x $VENV/bin/aiperf ]] && return 0
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/aiperf-venv.lock"
    flock 9  # two first runs at once: the second waits for the first's venv
    if [[ -f $marker && -x $VENV/bin/aiperf ]]; then exec 9>&-; return 0; fi
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set MMT_AIPERF_PYTHON to a Python >= 3.10)"
    echo "aiperf.sh: creating $VENV with aiperf==$AIPERF_VERSION (first run only: ~1.2 GB, 1.5-3 min)..." >&2
    local t0=$SECONDS
    rm -rf "$VENV"
    if ! { "$PYTHON" -m venv "$VENV" && "$VENV/bin/pip" install --quiet "aiperf==$AIPERF_VERSION"; } >"$log" 2>&1; then
        grep -v 'is ignored: it is neither a file nor a directory' "$log" | tail -20 >&2
        rm -rf "$VENV"
        die "installing aiperf failed (full log: $log)"
    fi
    touch "$marker"
    exec 9>&-
    echo "aiperf.sh: venv ready in $((SECONDS - t0)) s" >&2
}
setup_venv
if [[ $setup_only == 1 ]]; then
    "$VENV/bin/python" -c "import importlib.metadata as m; print('aiperf', m.version('aiperf'), 'in $VENV')"
    exit 0
fi

# ---- the tokenizer directory ----------------------------------------------------------------------------------
if [[ -z $tokenizer ]]; then
    tokenizer=$CACHE_DIR/tiny/qwen2-vl
    if [[ ! -f $tokenizer/tokenizer.json ]]; then
        [[ -x $ROOT/.venv/bin/python ]] || die "no tiny model yet and no .venv: run bin/setup, or pass --tokenizer DIR"
        tokenizer=$("$ROOT/.venv/bin/python" -c \
            "from mmtriton.tiny_models import ensure_tiny_models; print(ensure_tiny_models()['qwen2-vl'])")
    fi
fi
[[ -d $tokenizer ]] || die "--tokenizer must be a local directory (no model hub here): $tokenizer"
tokenizer=$(cd "$tokenizer" && pwd)

# ---- a quick look at the server first: a clear message beats AIPerf's 20 failed requests ------------------------
models_json=$(curl -sS --max-time 10 "$url/v1/models" 2>&1) || die "cannot reach $url/v1/models: $models_json"
if ! grep -q "\"id\": *\"$model\"" <<<"$models_json"; then
    echo "aiperf.sh: warning: $url/v1/models does not list '$model': $models_json" >&2
fi

if [[ -z $artifact_dir ]]; then
    artifact_dir=$ROOT/bench/results/aiperf/${model##*/}-c$concurrency-n$requests-$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$artifact_dir"
artifact_dir=$(cd "$artifact_dir" && pwd)

args=(
    profile
    --model "$model" --url "$url" --endpoint-type chat --streaming
    --tokenizer "$tokenizer"
    --concurrency "$concurrency" --request-count "$requests"
    --isl "$isl" --osl "$osl"
    --random-seed "$seed"
    --artifact-dir "$artifact_dir"
    # No server metrics: AIPerf would scrape <url>/metrics, which the OpenAI server lacks, and it cannot read
    # Triton's metrics port (Triton 2.51 answers AIPerf's HEAD probe with a body, which aiohttp rejects).
    --ui none --no-server-metrics --no-gpu-telemetry
)
if [[ $images -gt 0 ]]; then
    args+=(--image-batch-size "$images" --image-width-mean "$image_w" --image-height-mean "$image_h"
           --image-format "$image_format")
else
    args+=(--image-batch-size 0)
fi
[[ $warmup -gt 0 ]] && args+=(--warmup-request-count "$warmup")
[[ $raw == 1 ]] && args+=(--export-level raw)
[[ $server_tokens == 1 ]] && args+=(--use-server-token-count)
args+=("${extra[@]}")

# AIPerf with HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set refuses a local tokenizer directory ("Repo id must be in
# the form ..."), so they are cleared for it; it reaches no hub for a local directory anyway.
env_run=(env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1)
log=$artifact_dir/aiperf_stdout.log
echo "aiperf.sh: $model at $url: $requests requests, concurrency $concurrency, ISL $isl, OSL $osl," \
     "$images x ${image_w}x${image_h} $image_format image(s)" >&2
echo "aiperf.sh: artifacts in $artifact_dir" >&2
t0=$SECONDS
set +e
if [[ $verbose == 1 ]]; then
    "${env_run[@]}" "$VENV/bin/aiperf" "${args[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
else
    "${env_run[@]}" "$VENV/bin/aiperf" "${args[@]}" >"$log" 2>&1
    rc=$?
fi
set -e
summary=$artifact_dir/profile_export_aiperf.json
if [[ $rc != 0 || ! -f $summary ]]; then
    [[ $verbose == 1 ]] || grep -v '^\s*$' "$log" | tail -40 >&2
    echo "aiperf.sh: aiperf failed (exit $rc) after $((SECONDS - t0)) s; full output: $log" >&2
    exit $(( rc == 0 ? 1 : rc ))
fi
[[ $verbose == 1 ]] || cat "$artifact_dir/profile_export_console.txt" 2>/dev/null || true

# One line to read (and for scripts to grep), from the summary JSON; errors decide the exit status.
"$VENV/bin/python" - "$summary" "$allow_errors" "$((SECONDS - t0))" <<'EOF'
import json, sys

d = json.load(open(sys.argv[1]))
allow_errors, seconds = sys.argv[2] == "1", sys.argv[3]


def avg(name, default=0.0):
    return (d.get(name) or {}).get("avg", default)


ok, errors = int(avg("request_count")), int(avg("error_request_count"))
print(
    f"aiperf.sh: result: {ok} ok, {errors} errors | TTFT avg {avg('time_to_first_token'):.1f} ms "
    f"p99 {(d.get('time_to_first_token') or {}).get('p99', 0):.1f} | latency avg {avg('request_latency'):.1f} ms | "
    f"ITL avg {avg('inter_token_latency'):.2f} ms | {avg('request_throughput'):.2f} req/s | "
    f"{avg('output_token_throughput'):.1f} output tok/s | wall {seconds} s"
)
for e in d.get("error_summary") or []:
    print(f"aiperf.sh: {e.get('count')} x {json.dumps(e.get('error_details'))[:300]}")
sys.exit(3 if errors and not allow_errors else 0)
EOF
