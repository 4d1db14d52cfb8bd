#!/usr/bin/env bash
# The GPU checks in one command: every `gpu`/`gds` test and the GPU benchmarks, in about 8 minutes at
# most on one H100/H200. Writes into OUT_DIR gpu-check.log, gpu-tests.xml (JUnit), the benchmarks'
# gpu-inference-loop.json and gpu-backends.json, and summary.txt; prints one line:
#
#   gpu_check: <device>, tests <passed>/<failed>/<skipped>, native engine <yes|no>,
#   kvikio path <gds|kvikio-posix|none>, benchmarks <ok|failed|skipped>, <date>
#
# and exits 1 if a test failed (or the tests could not run), else 0.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Run from a checkout, on any CUDA host. kvikio's wheels are taken from .whl/ where present
# (../shared/gpu/fetch-wheels.sh puts them there) and installed into a temporary folder on PYTHONPATH;
# without them kvikio is reported absent and its tests skip. The package is built in place without
# build isolation or network (setup.py build_ext --inplace, else the C compiler directly), its native
# engine included where a compiler is found; nothing is installed into the Python environment.
#
# Settings (environment): PYTHON (python3); GPU_CHECK_SCRATCH, a folder on the disk to test and
# benchmark (default: a new folder under TMPDIR or /tmp, removed at the end); GPU_CHECK_BUDGET, seconds
# in all (480); LARGE_GIB, the inference loop's run meant to exceed the page cache (2; see
# benchmarks/README.md).
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-480}
large_gib=${LARGE_GIB:-2}
started=$(date +%s)
log="$out/gpu-check.log"
: >"$log"
export PYTHONUNBUFFERED=1

if [[ -n ${GPU_CHECK_SCRATCH:-} ]]; then
  scratch=$GPU_CHECK_SCRATCH
  mkdir -p "$scratch"
  own_scratch=no
else
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/tensorsink-gpu-check.XXXXXX")
  own_scratch=yes
fi

device="unknown device"
passed=0
failed=0
skipped=0
native=no
kvikio_path=none
benchmarks=skipped
tests_ran=no
finished=no

summary() {
  echo "gpu_check: $device, tests $passed/$failed/$skipped, native engine $native, kvikio path $kvikio_path, benchmarks $benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
}

at_exit() {
  local status=$?
  if [[ $finished != yes ]]; then
    say "gpu_check stopped early (status $status)"
    summary | tee -a "$log" >"$out/summary.txt"
  fi
  if [[ $own_scratch == yes ]]; then
    rm -rf "$scratch"
  fi
}
trap at_exit EXIT

say() {
  printf '%s\n' "$*" >>"$log"
}

step() {
  say ""
  say "== $* ($(date -u +%H:%M:%S), $(remaining) s of ${budget} left)"
}

remaining() {
  echo $((budget - ($(date +%s) - started)))
}

# limit CAP: the seconds a step may run: CAP, or what is left of the budget less a reserve for the rest.
limit() {
  local cap=$1 reserve=${2:-15} left
  left=$(($(remaining) - reserve))
  if ((left < cap)); then
    cap=$left
  fi
  if ((cap < 1)); then
    cap=1
  fi
  echo "$cap"
}

# run CAP COMMAND...: COMMAND under a time limit, its output in the log; its status.
run() {
  local cap
  cap=$(limit "$1")
  shift
  say "\$ $* (at most ${cap} s)"
  local status=0
  timeout -k 10 "$cap" "$@" >>"$log" 2>&1 || status=$?
  if ((status == 124 || status == 137)); then
    say "(stopped after ${cap} s)"
  fi
  return "$status"
}

step "checkout"
say "repository: $repo"
say "commit: $(git -C "$repo" describe --always --dirty 2>/dev/null || echo 'not a git checkout')"
say "output: $out; scratch: $scratch"

step "kvikio wheels"
site="$scratch/site"
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
  if run 90 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}"; then
    say "installed ${#wheels[@]} wheels from .whl/ into $site"
  else
    say "installing the wheels of .whl/ failed: kvikio may be absent"
  fi
else
  say "no .whl/ folder: kvikio only if the environment has it (../shared/gpu/fetch-wheels.sh fetches it)"
fi
export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
say "PYTHONPATH=$PYTHONPATH"

step "build (no build isolation, no network)"
if run 120 "$python" setup.py -q build_ext --inplace --build-temp "$scratch/build"; then
  say "setup.py build_ext --inplace finished"
else
  say "setup.py build_ext failed; compiling the native engine with the C compiler directly"
  suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  compiler=${CC:-cc}
  if ! command -v "$compiler" >/dev/null; then
    compiler=gcc
  fi
  if run 120 "$compiler" -O2 -pthread -std=gnu11 -shared -fPIC -I"$include" \
    src/tensorsink/engine/_native.c -o "$scratch/_native$suffix" -pthread; then
    mv "$scratch/_native$suffix" "src/tensorsink/engine/_native$suffix"
  else
    say "no native engine could be built: the Python engine runs"
  fi
fi
if run 60 "$python" -c 'from tensorsink.engine import available_engines; import sys; sys.exit("native" not in available_engines())'; then
  native=yes
fi
say "native engine built: $native"

step "environment"
if command -v nvidia-smi >/dev/null; then
  run 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  device=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  device=${device:-unknown device}
else
  say "no nvidia-smi"
fi
cuda=no
facts="$scratch/facts.txt"
if run 90 "$python" - "$scratch/probe" "$facts" <<'EOF'; then
import importlib.util, os, sys
import torch
directory, facts = sys.argv[1], sys.argv[2]
os.makedirs(directory, exist_ok=True)
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
cuda = torch.cuda.is_available()
print("CUDA device:", torch.cuda.get_device_name() if cuda else "none")
if importlib.util.find_spec("kvikio") is None:
    print("kvikio: absent")
else:
    import kvikio
    print("kvikio", kvikio.__version__)
print("/proc/driver/nvidia-fs:", "present" if os.path.exists("/proc/driver/nvidia-fs") else "absent")
label = None
if cuda:
    from tensorsink.backends import probe
    verdict = probe.verdict_for(directory, 60)
    label = verdict.label
    print("probe:", label, "|", verdict.reason, "|", verdict.report)
with open(facts, "w") as out:
    name = torch.cuda.get_device_name() if cuda else "no CUDA device"
    out.write("%s\n%s\n%s\n" % ("yes" if cuda else "no", label or "none", name))
EOF
  {
    read -r cuda
    read -r kvikio_path
    read -r torch_device
  } <"$facts"
  if [[ $device == "unknown device" ]]; then
    device=$torch_device
  fi
fi
say "filesystem of the scratch folder: $(stat -f -c %T "$scratch" 2>/dev/null || echo unknown)"
df -h "$scratch" >>"$log" 2>&1 || true

step "tests (-m \"gpu or gds\")"
mapfile -t test_files < <(grep -rlE 'pytest\.mark\.(gpu|gds)' tests --include='test_*.py' | sort)
say "files: ${test_files[*]}"
xml="$out/gpu-tests.xml"
rm -f "$xml"
tests_status=0
run 300 "$python" -m pytest -q -rfEs -p no:cacheprovider --timeout 150 -m "gpu or gds" \
  --basetemp "$scratch/pytest" --junitxml "$xml" "${test_files[@]}" || tests_status=$?
say "pytest exit status: $tests_status"
if [[ -s $xml ]]; then
  counts=$("$python" - "$xml" <<'EOF' 2>>"$log" || true
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
total = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(total - bad - skipped, bad, skipped)
for case in root.iter("testcase"):  # the figures the tests recorded
    found = [(p.get("name"), p.get("value")) for p in case.iter("property")]
    if found:
        print("  %s: %s" % (case.get("name"), ", ".join("%s=%s" % f for f in found)), file=sys.stderr)
EOF
  )
  if [[ -n $counts ]]; then
    read -r passed failed skipped <<<"$counts"
    tests_ran=yes
  fi
fi
if [[ $tests_ran != yes ]]; then
  say "no JUnit results: the tests did not run to the end"
fi

step "benchmarks"
if [[ $cuda != yes ]]; then
  say "no CUDA device: the GPU benchmarks are skipped"
else
  benchmarks=ok
  if (($(remaining) < 60)); then
    say "too little time left for the inference loop"
    benchmarks=failed
  elif ! run 170 "$python" benchmarks/gpu_inference_loop.py --out "$scratch/loop" --steps 40 --warmup 5 \
    --rounds 3 --large-gib "$large_gib" --json "$out/gpu-inference-loop.json"; then
    benchmarks=failed
  fi
  if (($(remaining) < 30)); then
    say "too little time left for the backends benchmark"
    benchmarks=failed
  elif ! run 110 "$python" benchmarks/gpu_backends.py --out "$scratch/backends" --outputs 16 --mib 32 \
    --rounds 3 --json "$out/gpu-backends.json"; then
    benchmarks=failed
  fi
fi

step "summary"
say "took $(($(date +%s) - started)) s"
finished=yes
summary | tee -a "$log" >"$out/summary.txt"
cat "$out/summary.txt"
if [[ $tests_ran != yes ]] || ((failed > 0)) || ((tests_status != 0 && tests_status != 5)); then
  exit 1
fi
