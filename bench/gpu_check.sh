#!/usr/bin/env bash
# The GPU path in one call, on a machine with a CUDA device: about 5 minutes, at most 8.
#
#   bash bench/gpu_check.sh            # PY=python to use, CLIP=video to bench (walking_1080p)
#
# 1. the CUDA tests (pytest -m cuda: fp16 restorations against fp32, MTCNN on CUDA, an embedded
#    job, ONNX Runtime's CUDA provider where installed);
# 2. bench.throughput on cuda: the pipeline with each engine (torch fp16; onnxruntime and openvino
#    fall back to torch, saying so in "engines", where they cannot run on the GPU), the naive
#    per-face loop (torch fp32), pipeline/transcode and pipeline/naive;
# 3. NVENC (h264_nvenc through PyAV) where the FFmpeg build has it: raw encode fps, and the
#    pipeline again encoding with it.
# Prints one JSON object on stdout; logs and the raw outputs stay in $OUT (printed in the JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CLIP=${CLIP:-../shared/data/videos/walking_1080p.mp4}
OUT=${OUT:-$(mktemp -d -t facemend-gpu-check.XXXXXX)}
mkdir -p "$OUT"
T0=$(date +%s)

# 1. CUDA tests, with a budget of their own
# (only the files that hold CUDA tests: the others may import what a GPU image lacks, Celery)
timeout 180 "$PY" -m pytest -m cuda $(grep -l "mark.cuda" tests/test_*.py) -q -p no:cacheprovider -rs \
    --junitxml="$OUT/cuda_tests.xml" >"$OUT/cuda_tests.log" 2>&1
echo $? >"$OUT/cuda_tests.rc"

# 3a. NVENC present? raw encode speed of 1080p frames through PyAV
timeout 60 "$PY" - >"$OUT/nvenc.json" 2>"$OUT/nvenc.log" <<'PY'
import json, time
import av, numpy as np
try:
    av.codec.Codec("h264_nvenc", "w")
except Exception as e:  # noqa: BLE001
    print(json.dumps({"present": False, "why": str(e)})); raise SystemExit
frames = [av.VideoFrame.from_ndarray(np.random.default_rng(i).integers(0, 256, (1080, 1920, 3), np.uint8), format="rgb24")
          for i in range(4)]
try:
    with av.open("/dev/null", "w", format="mp4") as c:
        s = c.add_stream("h264_nvenc", rate=30)
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        t = time.perf_counter()
        for i in range(240):
            for p in s.encode(frames[i % 4].reformat(format="yuv420p")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
        print(json.dumps({"present": True, "encode_fps_1080p": round(240 / (time.perf_counter() - t), 1)}))
except Exception as e:  # noqa: BLE001 - the codec is listed but no GPU encoder answers
    print(json.dumps({"present": False, "why": f"{type(e).__name__}: {e}"}))
PY

# 2. the bench on cuda: every engine in one run (ratios within one process), with the naive loop
timeout 240 "$PY" -m bench.throughput --input "$CLIP" --device cuda --engine torch,onnxruntime,openvino \
    --skip crop --json >"$OUT/bench_cuda.json" 2>"$OUT/bench_cuda.log"
echo $? >"$OUT/bench_cuda.rc"

# 3b. the pipeline encoding with NVENC (no naive loop)
if grep -q '"present": true' "$OUT/nvenc.json" 2>/dev/null; then
    timeout 90 "$PY" -m bench.throughput --input "$CLIP" --device cuda --codec h264_nvenc --preset p4 \
        --skip naive,restore,networks,crop --json >"$OUT/bench_nvenc.json" 2>"$OUT/bench_nvenc.log"
    echo $? >"$OUT/bench_nvenc.rc"
fi

T1=$(date +%s)
"$PY" - "$OUT" "$((T1 - T0))" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, seconds = Path(sys.argv[1]), int(sys.argv[2])

def read(name):
    p = out / name
    try:
        text = p.read_text().strip()
        return json.loads(text.splitlines()[-1]) if text else None
    except (OSError, ValueError, IndexError):
        return None

def rc(name):
    try:
        return int((out / name).read_text())
    except (OSError, ValueError):
        return None

tests = {"rc": rc("cuda_tests.rc")}
try:
    suite = ET.parse(out / "cuda_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    tests |= {"passed": n - f - e - s, "failed": f + e, "skipped": s}
except (OSError, ET.ParseError, IndexError):
    tests["error"] = "no test report (see cuda_tests.log)"
summary = {"seconds": seconds, "out": str(out), "cuda_tests": tests, "nvenc": read("nvenc.json")}
for name in ("bench_cuda", "bench_nvenc"):
    b = read(f"{name}.json")
    if b is None:
        summary[name] = {"rc": rc(f"{name}.rc"), "error": f"no JSON (see {name}.log)"} if rc(f"{name}.rc") is not None else None
        continue
    summary[name] = {k: b.get(k) for k in ("device_name", "frames", "size", "engines", "fps", "ratios",
                                           "stages", "peak_rss_mb", "networks_ms_per_face")}
print(json.dumps(summary))
PY
