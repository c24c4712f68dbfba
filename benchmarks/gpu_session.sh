#!/usr/bin/env bash
# One GPU benchmark session in one call, on a machine with no internet (the H200 device machine).
#
#   bash benchmarks/gpu_session.sh --prepare   # here, once: fills the ignored .whl/ and .tools/
#   bash benchmarks/gpu_session.sh             # there, from the repo root, with .whl and .tools carried
#
# --prepare (needs the package index for `pip download`, ../shared/data/aclImdb_v1.tar.gz,
# /usr/bin/wrk and strip) writes:
#   .whl/wheels.tar.xz   the service's Python dependencies that the GPU image lacks: cp312 manylinux
#                        wheels, same versions as this checkout's environment, slimmed (see the
#                        packing step) and stored uncompressed inside one .tar.xz. The whole
#                        working tree that travels must stay under 64 MiB: as published these
#                        wheels are 60 MiB, packed ~10 MiB.
#   .tools/wrk           wrk (Debian 12's build) behind a wrapper that puts its libluajit
#                        (.tools/lib/) on LD_LIBRARY_PATH for wrk alone; libssl.so.3 and
#                        libcrypto.so.3 must come from the GPU machine's system.
#   .tools/imdb_test_2000.tar.xz   the 2,000 test reviews benchmarks.run samples by default
#                        (load_reviews, seed 0), in the official archive's layout: --data reads it.
#
# Without --prepare (on the GPU machine): installs the wheels into /tmp/site; checks the imports;
# starts the service once with SENTIMENT_DEVICE=auto and prints what GET /v1/model reports (device,
# model workers); runs benchmarks.run --device auto, whose offline ceiling then runs on CUDA too
# (default and "batching off", 1/8/32/64 clients, 10 s each); prints a summary.
# Writes under $OUT (runs/gpu-bench when OUT is unset): session.log, model_info.json,
# bench/results.json, bench/throughput.png. About 4 minutes on an H200.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHL=.whl
TOOLS=.tools
SAMPLE=$TOOLS/imdb_test_2000.tar.xz
N_REVIEWS=2000
SEED=0
# What the GPU image lacks (its package list: /work/.library/device/KINDS.md). Already there: anyio,
# h11, httpx, click, typer, shellingham, uvloop, numpy 2.x, jinja2, packaging, setuptools, requests,
# tqdm, wrapt, annotated-doc, prometheus-client, matplotlib, pyyaml. typing-extensions is there too,
# but of an unknown version and pydantic needs >= 4.14.1, so it travels. fastapi 0.165 imports
# opentelemetry-api at import time. httptools: uvicorn's auto HTTP parser where it is installed, as
# in the CPU measurements (without it uvicorn falls back to h11, slower per request).
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 pydantic-settings==2.14.1
  python-dotenv==1.2.2 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0
  opentelemetry-api==1.45.2 uvicorn==0.55.0 httptools==0.9.0 swagger-ui-bundle==1.1.0
  spacy==3.8.18 spacy-legacy==3.0.12 spacy-loggers==1.0.5 thinc==8.3.14 blis==1.3.4 cymem==2.0.16
  preshed==3.0.15 murmurhash==1.0.16 srsly==2.5.6 wasabi==1.1.3 catalogue==2.0.10 confection==1.3.4
  weasel==1.0.1 cloudpathlib==0.26.0 smart-open==9.0.4
)

prepare() {
  local archive=${IMDB_ARCHIVE:-../shared/data/aclImdb_v1.tar.gz}
  local cache=${WHEEL_CACHE:-/tmp/gpu-session-wheels}  # the wheels as published, outside the repo
  mkdir -p "$cache" "$WHL" "$TOOLS/lib"

  echo "== wheels (cp312, manylinux x86_64) -> $cache -> $WHL/wheels.tar.xz"
  local platforms=()
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$cache" "${WHEELS[@]}" 2>&1 | grep -v 'is ignored: it is neither' || true
  rm -f "$WHL"/*.whl
  python3 - "$cache" "$WHL/wheels.tar.xz" "${WHEELS[@]}" <<'PY'
"""Slim the pinned wheels and pack them, stored uncompressed, into one .tar.xz (xz gets about twice
what the wheels' own deflate gets). Slimming: shared objects stripped of their debug info (spaCy's
113 MB of .so files become 12 MB); packages' own test suites dropped; Swagger UI's source maps
dropped. Each wheel's RECORD is rewritten to match its new contents. (blis/py must stay: thinc's
NumpyOps() refuses to start without it, and spaCy builds one at import.)"""
import base64, hashlib, io, lzma, re, subprocess, sys, tarfile, tempfile, zipfile
from pathlib import Path

cache, out, pins = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wheels = []
for pin in pins:
    name, version = pin.split("==")
    found = [w for w in cache.glob("*.whl") if [norm(x) for x in w.name.split("-")[:2]] == [norm(name), norm(version)]]
    if len(found) != 1:
        sys.exit(f"{pin}: {len(found)} wheels in {cache} ({', '.join(w.name for w in found)})")
    wheels.append(found[0])

DROP = re.compile(r"^[^/]+/tests?/"  # spacy/tests, thinc/tests, srsly/tests, ...
                  r"|^swagger_ui_bundle/.*\.map$")


def digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


total_in = total_raw = 0
part = Path(str(out) + ".part")
with tempfile.TemporaryDirectory() as tmp, tarfile.open(part, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:
    for w in wheels:
        with zipfile.ZipFile(w) as src:
            record = next(n for n in src.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
            entries = []
            for info in src.infolist():
                name = info.filename
                if name == record or name.endswith("/") or DROP.search(name):
                    continue
                data = src.read(info)
                if name.endswith(".so") or ".so." in name.rsplit("/", 1)[-1]:
                    so = Path(tmp, "lib.so")
                    so.write_bytes(data)
                    subprocess.run(["strip", "--strip-unneeded", str(so)], check=True)
                    data = so.read_bytes()
                entries.append((info, data))
        rows = [f"{info.filename},{digest(data)},{len(data)}" for info, data in entries] + [f"{record},,"]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
            for info, data in entries:
                z = zipfile.ZipInfo(info.filename, info.date_time)
                z.external_attr = info.external_attr
                dst.writestr(z, data)
            dst.writestr(zipfile.ZipInfo(record, entries[0][0].date_time), "\n".join(rows) + "\n")
        member = tarfile.TarInfo(w.name)
        member.size, member.mode = buf.tell(), 0o644
        buf.seek(0)
        tar.addfile(member, buf)
        total_in += w.stat().st_size
        total_raw += member.size
        print(f"  {w.name.split('-')[0]:<20} {w.stat().st_size / 2**20:5.1f} MiB -> {member.size / 2**20:5.1f} MiB stored")
part.replace(out)
print(f"  {len(wheels)} wheels: {total_in / 2**20:.1f} MiB published, {total_raw / 2**20:.1f} MiB slimmed, "
      f"{out.stat().st_size / 2**20:.1f} MiB in {out}")
PY

  echo "== wrk -> $TOOLS"
  cp -L /usr/bin/wrk "$TOOLS/lib/wrk"
  cp -L "$(ldd /usr/bin/wrk | awk '/libluajit/ {print $3}')" "$TOOLS/lib/libluajit-5.1.so.2"
  cat >"$TOOLS/wrk" <<'SH'
#!/bin/sh
# wrk (Debian 12's build) with its libluajit beside it; libssl.so.3 / libcrypto.so.3 come from the system.
d=$(dirname "$(readlink -f "$0")")/lib
LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/wrk" "$@"
SH
  chmod +x "$TOOLS/wrk" "$TOOLS/lib/wrk"

  echo "== $N_REVIEWS IMDB test reviews (seed $SEED) -> $SAMPLE"
  python3 - "$archive" "$SAMPLE" "$N_REVIEWS" "$SEED" <<'PY'
"""The reviews benchmarks.run samples (load_reviews), as a small archive in the official layout."""
import io, os, random, sys, tarfile

from benchmarks.run import load_reviews
from sentiment.imdb import read_imdb

archive, out, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
reviews = read_imdb(archive, ("test",))["test"]
random.Random(seed).shuffle(reviews)  # load_reviews' own sampling, keeping each review's key and rating
sample = reviews[:n]
if [r.text for r in sample] != load_reviews(archive, n, seed):
    sys.exit("this sampling no longer matches benchmarks.run.load_reviews: update gpu_session.sh")
with tarfile.open(out + ".part", "w:xz", preset=9) as tar:  # read_imdb opens any tar ("r:*")
    for r in sample:
        split, polarity, rid = r.key.split("/")
        data = r.text.encode("utf-8")
        info = tarfile.TarInfo(f"aclImdb/{split}/{polarity}/{rid}_{r.rating}.txt")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
os.replace(out + ".part", out)
# Read back the way the benchmark will: the same 2,000 texts (read_imdb sorts by key before
# load_reviews shuffles, so the order in which wrk and the offline ceiling meet them differs).
back = load_reviews(out, n, seed)
assert sorted(back) == sorted(r.text for r in sample), "the sample does not read back"
print(f"  {len(back)} reviews, {os.path.getsize(out) / 2**20:.2f} MiB")
PY
  du -sh "$WHL" "$TOOLS"
}

if [[ ${1:-} == --prepare ]]; then
  prepare
  exit 0
fi

# ---------------------------------------------------------------------------- on the GPU machine
OUT_DIR=${OUT:-runs/gpu-bench}
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/session.log") 2>&1
T0=$SECONDS
step() { echo; echo "== [$((SECONDS - T0))s] $*"; }

for f in "$WHL/wheels.tar.xz" "$TOOLS/wrk" "$SAMPLE"; do
  [[ -e $f ]] || { echo "missing $f: run 'bash benchmarks/gpu_session.sh --prepare' here and carry .whl and .tools" >&2; exit 2; }
done

step "install the wheels of $WHL/wheels.tar.xz -> /tmp/site"
rm -rf /tmp/wheels
python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
  "$WHL/wheels.tar.xz" /tmp/wheels
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wheels/*.whl
echo "$(ls /tmp/wheels | wc -l) wheels installed"
export PYTHONPATH=/tmp/site:$PWD
export PATH=$PWD/$TOOLS:$PATH
export SENTIMENT_DEVICE=auto  # inherited by every server benchmarks.run starts (it passes os.environ on)

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
echo "cpus: $(nproc)  python: $(python3 -V 2>&1)  wrk: $(wrk -v 2>&1 | head -1 || true)"
wrk -v >/dev/null 2>&1 || [[ $? -eq 1 ]] || { echo "wrk does not run here:"; ldd "$TOOLS/lib/wrk"; exit 2; }
python3 -c "import fastapi, spacy, app.main, pydantic, uvicorn, torch
from sentiment.artifacts import resolve_device
print(f'fastapi {fastapi.__version__}  pydantic {pydantic.VERSION}  spacy {spacy.__version__}  uvicorn {uvicorn.__version__}')
print(f'torch {torch.__version__}  cuda available: {torch.cuda.is_available()}  SENTIMENT_DEVICE=auto -> {resolve_device(\"auto\")}')
spacy.blank('en')('hello world')"

step "service with SENTIMENT_DEVICE=auto: GET /v1/model, one POST /v1/predict"
python3 - "$OUT_DIR/model_info.json" <<'PY'
import json, sys, time
from pathlib import Path

import httpx

from app.process import ServiceProcess

t0 = time.perf_counter()
with ServiceProcess(Path("model_artifacts"), {"SENTIMENT_DEVICE": "auto"}) as server:
    ready = time.perf_counter() - t0
    info = httpx.get(server.base_url + "/v1/model", timeout=30).json()
    t1 = time.perf_counter()
    r = httpx.post(server.base_url + "/v1/predict", json={"texts": ["A wonderful, moving film."]}, timeout=30)
    predict_ms = 1000 * (time.perf_counter() - t1)
Path(sys.argv[1]).write_text(json.dumps(info, indent=2))
print(f"ready in {ready:.1f}s; GET /v1/model: device={info.get('device')} workers={info.get('workers')} "
      f"precision={info.get('precision')} version={info.get('version')}")
print(f"POST /v1/predict {r.status_code} in {predict_ms:.1f} ms: {r.text[:200]}")
if not str(info.get("device", "")).startswith("cuda"):
    print("WARNING: the service is NOT on CUDA")
PY

step "benchmarks.run"
timeout -k 15 330 python3 -m benchmarks.run --data "$SAMPLE" --reviews "$N_REVIEWS" --seed "$SEED" \
  --configs default "batching off" --concurrency 1 8 32 64 --seconds 10 --warmup-seconds 3 \
  --device auto --out "$OUT_DIR/bench"

step "summary"
python3 - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path

d = Path(sys.argv[1])
res = json.loads((d / "bench/results.json").read_text())
info = json.loads((d / "model_info.json").read_text())
off = res["offline_ceiling"]  # on CUDA (benchmarks.run --device auto), one process
ceiling = off["reviews_per_s"]
m = res["machine"]
print(f"service: device {info.get('device')}, {info.get('workers')} model workers, {info.get('precision')}; "
      f"torch {m['torch']}, {m['cpus']} CPUs ({m['processor']})")
print(f"offline ceiling on {m['device']} ({m['gpu']}): {off['reviews_per_s']:.0f} reviews/s ({off['processes']} process(es); "
      f"tokenise {off['tokenize_ms_per_review']:.2f} + forward {off['forward_ms_per_review']:.2f} ms/review)")
print(f"| config | clients | reviews/s | x ceiling ({ceiling:.0f}) | p50 ms | p99 ms | p99/p50 | mean batch | errors |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, rows in res["service"].items():
    for r in rows:
        print(f"| {name} | {r['concurrency']} | {r['reviews_per_s']:.1f} | {r['reviews_per_s'] / ceiling:.2f} | "
              f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | "
              f"{r['mean_batch_size']:.1f} | {r['non_2xx'] + r['socket_errors']} |")
PY
step "done"
