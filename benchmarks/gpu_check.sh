#!/usr/bin/env bash
# The GPU checks in one command: a smoke step, every `gpu`/`gds` test file and the GPU benchmarks, in
# GPU_CHECK_BUDGET seconds (480) on one H100/H200. Writes into OUT_DIR at most seven files:
#
#   facts.txt                 the machine (written first, before anything that can fail): date, host,
#                             versions, device, the scratch folder's filesystem, memory and disk sizes
#   gpu-check.log             every step's commands and output, pytest's -v lines and durations
#   smoke.json                benchmarks/gpu_smoke.py: versions, the SM clock idle and warm, pinning
#                             costs, two checks of states earlier runs tripped over
#   gpu-tests.xml             one JUnit file: a suite per test file, each run by its own pytest
#                             (results up to a hang taken from the log when one had to be killed)
#   gpu-inference-loop.json   benchmarks/gpu_inference_loop.py (rewritten as it goes)
#   gpu-backends.json         benchmarks/gpu_backends.py (rewritten as it goes)
#   summary.txt               one line per step, and the line it prints:
#
#   gpu_check: <device>, tests <passed>/<failed>/<skipped>, native engine <yes|no>,
#   kvikio path <gds|kvikio-posix|none>, smoke <counts>, benchmarks <ok|failed|partial|skipped>, <date>
#
# Each step runs under `timeout` (SIGTERM, then SIGKILL 10 s later) with a share of the budget, and
# its outcome goes into the summary: one that fails or is stopped never skips the others. A step
# that finds too little time left is skipped with a note. Without CUDA it says so, runs what needs no
# device (facts, build, smoke's versions, the test files' collection) and exits 0; with CUDA it exits
# 1 if a test failed or a test file could not run to its end, else 0.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Run from a checkout, on any CUDA host. kvikio's wheels are taken from .whl/ where present
# (../shared/gpu/fetch-wheels.sh puts them there) and installed into the scratch folder on PYTHONPATH;
# without them kvikio is reported absent and its tests skip. The package is built in place without
# build isolation or network (setup.py build_ext --inplace, else the C compiler directly), its native
# engine included where a compiler is found; nothing is installed into the Python environment.
#
# Settings (environment): PYTHON (python3); GPU_CHECK_SCRATCH, a folder on the disk to test and
# benchmark (default: a new folder under TMPDIR or /tmp, removed at the end; the log warns when it is
# tmpfs, where fsync does nothing); GPU_CHECK_BUDGET, seconds in all (480); LARGE_GIB, the inference
# loop's run meant to exceed the page cache (default 2, or 0 where memory exceeds the scratch disk's
# free space, as on the lent machine: it could not exceed the page cache there).
set -uo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo" || exit 2
python=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET:-480}
started=$(date +%s)
log="$out/gpu-check.log"
facts="$out/facts.txt"
: >"$log"
: >"$facts"
export PYTHONUNBUFFERED=1

device="unknown device"
cuda=no
native=no
kvikio_path=none
smoke="not run"
benchmarks=skipped
passed=0
failed=0
skipped=0
tests_ran=no
tests_bad=no
finished=no
outcomes=()

say() {
  printf '%s\n' "$*" >>"$log"
}

# fact LINE: a line of facts.txt, also in the log.
fact() {
  printf '%s\n' "$*" >>"$facts"
  say "fact: $*"
}

# outcome STEP TEXT: the step's outcome, for the summary.
outcome() {
  outcomes+=("$1: $2")
  say "-> $1: $2"
}

remaining() {
  echo $((budget - ($(date +%s) - started)))
}

step() {
  say ""
  say "== $* ($(date -u +%H:%M:%S), $(remaining) s of ${budget} left)"
}

# limit CAP [RESERVE]: the seconds a step may run: CAP, or what is left of the budget less RESERVE
# (15) for the steps after it; 0 when nothing is left.
limit() {
  local cap=$1 reserve=${2:-15} left
  left=$(($(remaining) - reserve))
  if ((left < cap)); then
    cap=$left
  fi
  if ((cap < 0)); then
    cap=0
  fi
  echo "$cap"
}

# capped SECONDS COMMAND...: COMMAND under `timeout` (TERM, then KILL 10 s later), its output in the
# log; its status (124 or 137: stopped).
capped() {
  local cap=$1
  shift
  if ((cap < 1)); then
    cap=1 # `timeout 0` would mean no limit at all
  fi
  say "\$ $(printf '%q ' "$@")(at most ${cap} s)"
  local status=0
  timeout -k 10 "$cap" "$@" >>"$log" 2>&1 || status=$?
  if ((status == 124 || status == 137)); then
    say "(stopped after ${cap} s)"
  fi
  return "$status"
}

# stopped_or STATUS TEXT: "stopped after the limit" for timeout's statuses, else TEXT.
stopped_or() {
  if (($1 == 124 || $1 == 137)); then
    echo "stopped at its time limit (status $1)"
  else
    echo "$2"
  fi
}

write_summary() {
  local line
  line="gpu_check: $device, tests $passed/$failed/$skipped, native engine $native, kvikio path $kvikio_path, smoke $smoke, benchmarks $benchmarks, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  {
    printf '%s\n' "$line"
    printf '%s\n' "took $(($(date +%s) - started)) s of a budget of ${budget} s"
    printf '  %s\n' "${outcomes[@]}"
  } >"$out/summary.txt"
  say ""
  cat "$out/summary.txt" >>"$log"
  printf '%s\n' "$line"
}

# shellcheck disable=SC2329 # invoked by the trap
at_exit() {
  local status=$?
  if [[ $finished != yes ]]; then
    say "gpu_check stopped early (status $status)"
    outcome "gpu_check" "stopped early (status $status): the steps after the last one above did not run"
    write_summary
  fi
  rm -f "$out"/*.tmp # a JSON being rewritten when its writer was stopped
  if [[ ${own_scratch:-no} == yes ]]; then
    rm -rf "$scratch"
  fi
}
trap at_exit EXIT
trap 'exit 143' TERM INT

# -- facts: the shell's first, so that they exist whatever fails later --------------------------------
step "facts"
if [[ -n ${GPU_CHECK_SCRATCH:-} ]] && mkdir -p "$GPU_CHECK_SCRATCH"; then
  scratch=$(cd "$GPU_CHECK_SCRATCH" && pwd)
  own_scratch=no
else
  if [[ -n ${GPU_CHECK_SCRATCH:-} ]]; then
    say "GPU_CHECK_SCRATCH=$GPU_CHECK_SCRATCH cannot be made: a temporary folder instead"
  fi
  scratch=$(mktemp -d "${TMPDIR:-/tmp}/tensorsink-gpu-check.XXXXXX")
  own_scratch=yes
fi
fact "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
fact "host: $(uname -n), Linux $(uname -r), $(uname -m), $(nproc 2>/dev/null || echo '?') cores"
fact "repository: $repo at $(git -C "$repo" describe --always --dirty 2>/dev/null || echo 'no git')"
fact "output: $out"
fstype=$(stat -f -c %T "$scratch" 2>/dev/null || echo unknown)
dftype=$(df -T "$scratch" 2>/dev/null | awk 'NR == 2 { print $2 }')
fact "scratch: $scratch, filesystem ${fstype} (df: ${dftype:-unknown})"
free_kib=$(df -Pk "$scratch" 2>/dev/null | awk 'NR == 2 { print $4 }')
size_kib=$(df -Pk "$scratch" 2>/dev/null | awk 'NR == 2 { print $2 }')
memory_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo 2>/dev/null)
fact "scratch disk: $((${size_kib:-0} / 1048576)) GiB, $((${free_kib:-0} / 1048576)) GiB free"
fact "memory: $((${memory_kib:-0} / 1048576)) GiB"
fact "/dev/shm: $(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { printf "%d GiB, %d GiB free", $2 / 1048576, $4 / 1048576 }')"
tmpfs_scratch=no
case "$fstype $dftype" in
  *tmpfs* | *ramfs*)
    tmpfs_scratch=yes
    fact "WARNING: the scratch folder is in memory ($fstype): fsync does nothing there and the disk figures are memory figures; set GPU_CHECK_SCRATCH to a folder on the disk"
    ;;
esac
if [[ -n ${LARGE_GIB:-} ]]; then
  large_gib=$LARGE_GIB
elif ((${memory_kib:-0} > ${free_kib:-0})); then
  large_gib=0
  fact "LARGE_GIB=0: memory exceeds the scratch disk's free space, so no run there can exceed the page cache"
else
  large_gib=2
fi
fact "LARGE_GIB: $large_gib"
if command -v nvidia-smi >/dev/null; then
  smi=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,pstate,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>&1 | head -n 4)
  fact "nvidia-smi: ${smi:-no answer}"
  name=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
  device=${name:-unknown device}
else
  fact "nvidia-smi: not found"
fi
fact "/proc/driver/nvidia-fs: $([[ -e /proc/driver/nvidia-fs ]] && echo present || echo absent)"
if [[ $tmpfs_scratch == yes ]]; then
  outcome "facts" "written; WARNING: scratch on $fstype"
else
  outcome "facts" "written (scratch on ${dftype:-$fstype})"
fi

# -- kvikio's wheels ---------------------------------------------------------------------------------
step "kvikio wheels"
site="$scratch/site"
shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
  cap=$(limit 90)
  if capped "$cap" "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "${wheels[@]}"; then
    outcome "kvikio wheels" "${#wheels[@]} installed from .whl/ into $site"
  else
    outcome "kvikio wheels" "installing them failed (status $?): kvikio may be absent"
  fi
else
  outcome "kvikio wheels" "no .whl/ folder: kvikio only if the environment has it"
fi
export PYTHONPATH="$site:$repo/src${PYTHONPATH:+:$PYTHONPATH}"
say "PYTHONPATH=$PYTHONPATH"

# -- versions: each import on its own, written as found (kvikio last: it may not load) ---------------
step "versions"
cap=$(limit 90)
status=0
capped "$cap" "$python" - "$facts" <<'EOF' || status=$?
import importlib, sys

facts = sys.argv[1]


def fact(line):
    with open(facts, "a") as file:
        file.write(line + "\n")
    print("fact:", line, flush=True)


def last_line(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[-1] if text else "")


fact("python: %s at %s" % (sys.version.split()[0], sys.executable))
for module in ("numpy", "torch", "safetensors", "pytest", "pytest_timeout", "hypothesis", "cupy", "kvikio"):
    try:
        imported = importlib.import_module(module)
        fact("%s: %s" % (module, getattr(imported, "__version__", "imported")))
    except BaseException as exc:
        fact("%s: does not import (%s)" % (module, last_line(exc)))
    if module == "torch" and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            fact("torch CUDA: %s" % torch.version.cuda)
            available = torch.cuda.is_available()
            fact("cuda available: %s" % ("yes" if available else "no"))
            if available:
                fact("device: %s" % torch.cuda.get_device_name())
                fact("device capability: %s" % (torch.cuda.get_device_capability(),))
        except BaseException as exc:
            fact("cuda available: no (%s)" % last_line(exc))
EOF
if grep -q '^cuda available: yes' "$facts"; then
  cuda=yes
  if [[ $device == "unknown device" ]]; then
    device=$(sed -n 's/^device: //p' "$facts" | head -n 1)
  fi
else
  device="no CUDA device"
fi
if grep -q '^pytest_timeout: ' "$facts" && ! grep -q '^pytest_timeout: does not import' "$facts"; then
  pytest_timeout=yes
else
  pytest_timeout=no
fi
if ((status == 0)); then
  outcome "versions" "written to facts.txt; CUDA $cuda"
else
  outcome "versions" "$(stopped_or "$status" "the script ended with status $status"): facts.txt has what it found before"
fi
if [[ $cuda != yes ]]; then
  say "no CUDA device: the GPU tests skip and the benchmarks do not run"
fi

# -- build ----------------------------------------------------------------------------------------
step "build (no build isolation, no network)"
# The three extensions of setup.py, each built in the scratch folder, then renamed into src/: a new file,
# never one written over in place (a process that has an extension loaded would crash). Not rebuilt
# where this interpreter's builds of all three are newer than every C source.
native_check='from tensorsink.engine import available_engines; import sys; sys.exit("native" not in available_engines())'
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>>"$log")
c_dir=src/tensorsink/engine/_native
# Each extension as its module path, a colon, and its C files (as setup.py lists them).
extensions=(
  "tensorsink/_crc:src/tensorsink/_crc.c $c_dir/crc.c"
  "tensorsink/engine/_native:$(echo "$c_dir"/*.c)"
  "tensorsink/bench/_bare:src/tensorsink/bench/_bare.c $c_dir/files.c"
)
newest=$(ls -t src/tensorsink/_crc.c src/tensorsink/bench/_bare.c "$c_dir"/*.[ch] 2>>"$log" | head -n 1)
stale=""
for extension in "${extensions[@]}"; do
  if ! [[ src/${extension%%:*}$suffix -nt $newest ]]; then
    stale="$stale ${extension%%:*}"
  fi
done
cap=$(limit 120)
if [[ -n $suffix && -n $newest && -z $stale ]]; then
  if capped 60 "$python" -c "$native_check"; then
    native=yes
  fi
  outcome "build" "native engine $native (built already, newer than its sources: not rebuilt)"
elif [[ -z $suffix ]]; then
  outcome "build" "skipped: $python gives no extension suffix"
elif ((cap < 10)); then
  outcome "build" "skipped: the budget is spent"
else
  capped "$cap" "$python" setup.py -q build_ext --build-temp "$scratch/build" --build-lib "$scratch/lib"
  include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>>"$log")
  compiler=${CC:-cc}
  if ! command -v "$compiler" >/dev/null; then
    compiler=gcc
  fi
  for extension in "${extensions[@]}"; do
    name=${extension%%:*}
    read -ra sources <<<"${extension#*:}"
    target="src/$name$suffix"
    built=$(find "$scratch/lib" -path "*/$name$suffix" 2>>"$log" | head -n 1)
    if [[ -z $built ]]; then
      say "setup.py build_ext built no $name; compiling it with the C compiler directly"
      if capped "$(limit 120)" "$compiler" -O2 -pthread -std=gnu11 -shared -fPIC -I"$include" \
        "${sources[@]}" -o "$scratch/${name##*/}$suffix" -pthread; then
        built="$scratch/${name##*/}$suffix"
      fi
    fi
    if [[ -n $built ]] && cp "$built" "$target.new.$$" && mv -f "$target.new.$$" "$target"; then
      say "built: $target"
    else
      rm -f "$target.new.$$"
      say "$name could not be built: its Python fallback runs"
    fi
  done
  if capped 60 "$python" -c "$native_check"; then
    native=yes
  fi
  outcome "build" "native engine $native"
fi

# -- smoke ----------------------------------------------------------------------------------------
step "smoke (benchmarks/gpu_smoke.py)"
cap=$(limit 75)
if ((cap < 15)); then
  outcome "smoke" "skipped: the budget is spent"
  smoke="skipped"
else
  status=0
  capped "$cap" "$python" benchmarks/gpu_smoke.py --json "$out/smoke.json" || status=$?
  counts=$("$python" - "$out/smoke.json" <<'EOF' 2>>"$log"
import json, sys

try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print("no smoke.json (%s)" % exc)
    raise SystemExit
checks = data.get("checks", {})
order = ("pass", "fail", "error", "info", "skipped")
statuses = [check.get("status") for check in checks.values()]
text = ", ".join("%d %s" % (statuses.count(s), s) for s in order if s in statuses)
bad = [name for name, check in checks.items() if check.get("status") in ("fail", "error")]
print(text + (" (%s)" % ", ".join(bad) if bad else "") + ("" if data.get("cuda") else "; no CUDA"))
EOF
  )
  smoke=${counts:-unknown}
  smoke=${smoke//,/;}
  if ((status == 0)); then
    outcome "smoke" "$counts"
  else
    outcome "smoke" "$(stopped_or "$status" "ended with status $status"); smoke.json: $counts"
  fi
fi

# -- probe ----------------------------------------------------------------------------------------
step "probe (the kvikio path for the scratch folder)"
cap=$(limit 75)
if [[ $cuda != yes ]]; then
  outcome "probe" "skipped: no CUDA device"
elif ((cap < 15)); then
  outcome "probe" "skipped: the budget is spent"
else
  mkdir -p "$scratch/probe"
  status=0
  capped "$cap" "$python" - "$scratch/probe" "$scratch/probe.label" <<'EOF' || status=$?
import sys

from tensorsink.backends import probe

verdict = probe.verdict_for(sys.argv[1], 60)
print("probe:", verdict.label, "|", verdict.reason, "|", verdict.report)
with open(sys.argv[2], "w") as out:
    out.write("%s\n" % (verdict.label or "none"))
EOF
  if ((status == 0)) && [[ -s $scratch/probe.label ]]; then
    kvikio_path=$(head -n 1 "$scratch/probe.label")
    outcome "probe" "kvikio path $kvikio_path"
  else
    outcome "probe" "$(stopped_or "$status" "failed (status $status)"): kvikio path unknown"
    kvikio_path=unknown
  fi
fi

# -- tests: a pytest per file, each with its own limit and JUnit file --------------------------------
step "tests (-m \"gpu or gds\", one pytest a file)"
mapfile -t found < <(grep -rlE 'pytest\.mark\.(gpu|gds)|mark\.(gpu|gds)\b' tests --include='test_*.py' | sort)
test_files=()
for first in tests/test_cuda.py tests/test_gds.py; do # the long ones first, while time is plenty
  for file in "${found[@]}"; do
    [[ $file == "$first" ]] && test_files+=("$file")
  done
done
for file in "${found[@]}"; do
  [[ $file != tests/test_cuda.py && $file != tests/test_gds.py ]] && test_files+=("$file")
done
say "files: ${test_files[*]}"
junit="$scratch/junit"
rm -rf "$junit"
mkdir -p "$junit"
: >"$junit/runs.tsv"
if [[ $cuda == yes ]]; then
  bench_reserve=$((budget * 30 / 100)) # the benchmarks' share
else
  bench_reserve=0
fi
timeout_options=()
if [[ $pytest_timeout != yes ]]; then
  # without pytest-timeout, pyproject's `timeout` option is unknown: --strict-config would refuse it
  timeout_options=(-o "addopts=-ra --strict-markers" -W "ignore::pytest.PytestConfigWarning")
  say "pytest-timeout does not import: no per-test limit, only each file's"
fi
index=0
for file in "${test_files[@]}"; do
  index=$((index + 1))
  after=$((${#test_files[@]} - index))
  name=${file//\//_}
  name=${name%.py}
  cap=$(limit 240 $((bench_reserve + 15 + 25 * after))) # each file after this one keeps 25 s
  if ((cap < 20)); then
    printf '%s\t-\t-\t-\t0\t%s\n' "$file" "not run: the time budget was spent" >>"$junit/runs.tsv"
    say "$file: not run, the time budget was spent"
    continue
  fi
  per_test=$((cap - 15 < 150 ? cap - 15 : 150))
  dump=$((per_test - 10 > 45 ? 45 : (per_test > 20 ? per_test - 10 : 10)))
  options=(-v --durations=30 -rfEs -p no:cacheprovider -m "gpu or gds" -o "faulthandler_timeout=$dump"
    -o "junit_suite_name=$file" --basetemp "$scratch/pytest/$name" --junitxml "$junit/$name.xml")
  if [[ $pytest_timeout == yes ]]; then
    options+=(--timeout "$per_test")
  fi
  began=$(date +%s)
  offset=$(stat -c %s "$log")
  status=0
  capped "$cap" "$python" -m pytest "${options[@]}" "${timeout_options[@]}" "$file" || status=$?
  note=""
  if ((status == 2 || status == 3 || status == 4)) && tail -c +$((offset + 1)) "$log" |
    grep -qE 'ERROR collecting|ImportError while' && tail -c +$((offset + 1)) "$log" |
    grep -qE '(Deprecation|Future)Warning'; then
    # a third-party deprecation at import that pyproject's filters do not catch: run the file anyway
    cap=$(limit 240 $((bench_reserve + 15 + 25 * after)))
    if ((cap >= 20)); then
      say "a DeprecationWarning or FutureWarning stopped the collection: once more with them ignored"
      rm -f "$junit/$name.xml"
      offset=$(stat -c %s "$log")
      status=0
      capped "$cap" "$python" -m pytest "${options[@]}" "${timeout_options[@]}" \
        -W "ignore::DeprecationWarning" -W "ignore::FutureWarning" "$file" || status=$?
      note="collected only with DeprecationWarning and FutureWarning ignored (see the log)"
    fi
  fi
  tail -c +$((offset + 1)) "$log" >"$junit/$name.log"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$file" "$junit/$name.xml" "$junit/$name.log" "$status" \
    $(($(date +%s) - began)) "${note:--}" >>"$junit/runs.tsv"
  say "pytest exit status for $file: $status"
done

# One JUnit file from them, and the counts. A file whose pytest was killed (a hang in C, which no
# SIGALRM interrupts) left no JUnit file: its results up to the hang come from the -v lines of the log.
step "test results"
counts=$("$python" - "$junit/runs.tsv" "$out/gpu-tests.xml" <<'EOF' 2>>"$log"
import re
import sys
import xml.etree.ElementTree as ET

runs, target = sys.argv[1], sys.argv[2]
root = ET.Element("testsuites", name="gpu_check")
LINE = re.compile(r"^(\S+\.py::\S+)(?: (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b)?")
WORSE = {None: 0, "PASSED": 1, "XFAIL": 1, "SKIPPED": 1, "XPASS": 2, "FAILED": 3, "ERROR": 3}
lines = []


def property_(suite, name, value):
    properties = suite.find("properties")
    if properties is None:
        properties = ET.Element("properties")
        suite.insert(0, properties)
    ET.SubElement(properties, "property", name=name, value=str(value))


def case(suite, nodeid, outcome, text):
    path, _, name = nodeid.partition("::")
    element = ET.SubElement(suite, "testcase", classname=path[:-3].replace("/", "."), name=name, time="0")
    if outcome in ("FAILED", "XPASS"):
        ET.SubElement(element, "failure", message=text)
    elif outcome in ("ERROR", None):
        ET.SubElement(element, "error", message=text)
    elif outcome in ("SKIPPED", "XFAIL"):
        ET.SubElement(element, "skipped", message=text)


def from_log(file, log, status, seconds):
    """The results the -v lines show; the test that was running when pytest was stopped, an error."""
    suite = ET.Element("testsuite", name=file)
    outcomes, order, collected = {}, [], None
    try:
        text = open(log, errors="replace").read().splitlines()
    except OSError:
        text = []
    for line in text:
        counted = re.search(r"\bcollected (\d+) items?(?: / (\d+) deselected)?", line)
        if counted:
            collected = int(counted.group(1)) - int(counted.group(2) or 0)
        found = LINE.match(line)
        if found and found.group(1).startswith(file + "::"):
            nodeid, outcome = found.groups()
            if nodeid not in outcomes:
                order.append(nodeid)
                outcomes[nodeid] = outcome
            elif WORSE[outcome] > WORSE[outcomes[nodeid]]:
                outcomes[nodeid] = outcome
    stopped = "pytest was stopped after %s s (status %s)" % (seconds, status)
    for nodeid in order:
        outcome = outcomes[nodeid]
        if outcome is None:
            case(suite, nodeid, None, "no result: %s while this test ran (a hang? see the log's "
                 "faulthandler dump)" % stopped)
        else:
            case(suite, nodeid, outcome, "%s (from the log: %s before it wrote its JUnit file)"
                 % (outcome, stopped))
    if not order:
        case(suite, file + "::(collection)", None, "no test ran: %s; see the log" % stopped)
    elif collected is not None and collected > len(order):
        left = collected - len(order)
        case(suite, file + "::(not reached)", "SKIPPED", "%d more tests never started: %s" % (left, stopped))
    property_(suite, "results_from", "the -v lines of the log")
    return suite


for row in open(runs):
    fields = (row.rstrip("\n").split("\t") + ["-"] * 6)[:6]
    file, xml, log, status, seconds, note = ["" if field == "-" else field for field in fields]
    suites = []
    if not xml:
        suite = ET.Element("testsuite", name=file)
        case(suite, file + "::(not run)", "SKIPPED", note)
        suites = [suite]
    else:
        try:
            parsed = ET.parse(xml).getroot()
            suites = [parsed] if parsed.tag == "testsuite" else parsed.findall("testsuite")
        except (OSError, ET.ParseError):
            suites = [from_log(file, log, status, seconds)]
    for suite in suites:
        suite.set("name", file)
        property_(suite, "pytest_exit_status", status)
        property_(suite, "wall_seconds", seconds)
        if note:
            property_(suite, "note", note)
        cases = suite.findall("testcase")
        tally = {
            "tests": len(cases),
            "failures": sum(c.find("failure") is not None for c in cases),
            "errors": sum(c.find("error") is not None for c in cases),
            "skipped": sum(c.find("skipped") is not None for c in cases),
        }
        for key, value in tally.items():
            suite.set(key, str(value))
        root.append(suite)
        ok = tally["tests"] - tally["failures"] - tally["errors"] - tally["skipped"]
        if not xml:
            lines.append("tests %s: %s" % (file, note))
            continue
        if suite.find("properties/property[@name='results_from']") is not None:
            how = "from the log: pytest stopped, status %s, after %s s" % (status, seconds)
        else:
            how = "pytest status %s, %s s" % (status, seconds)
        lines.append("tests %s: %d passed, %d failed, %d errors, %d skipped (%s)%s" % (
            file, ok, tally["failures"], tally["errors"], tally["skipped"], how, "; " + note if note else ""))
        for item in suite.iter("testcase"):  # the figures the tests recorded
            found = [(p.get("name"), p.get("value")) for p in item.iter("property")]
            if found:
                print("  %s: %s" % (item.get("name"), ", ".join("%s=%s" % f for f in found)), file=sys.stderr)
        found = [(p.get("name"), p.get("value")) for p in suite.findall("properties/property")]
        print("  suite %s: %s" % (file, ", ".join("%s=%s" % f for f in found)), file=sys.stderr)
ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
suites = root.findall("testsuite")
total = sum(int(s.get("tests")) for s in suites)
bad = sum(int(s.get("failures")) + int(s.get("errors")) for s in suites)
skipped = sum(int(s.get("skipped")) for s in suites)
print(total - bad - skipped, bad, skipped)
for line in lines:
    print(line)
EOF
)
if [[ -n $counts ]]; then
  read -r passed failed skipped <<<"$(head -n 1 <<<"$counts")"
  tests_ran=yes
  while IFS= read -r line; do
    outcome "${line%%: *}" "${line#*: }"
  done < <(tail -n +2 <<<"$counts")
else
  outcome "tests" "the results could not be combined: gpu-tests.tar.gz holds each file's JUnit and log"
  tar -czf "$out/gpu-tests.tar.gz" -C "$scratch" junit 2>>"$log" || true
fi
while IFS=$'\t' read -r file xml _ status _ _; do
  if [[ $xml == - ]] || ((status != 0 && status != 5)); then
    tests_bad=yes
  fi
done <"$junit/runs.tsv"

# -- benchmarks -----------------------------------------------------------------------------------
# parts DONE_JSON: the parts a benchmark's JSON says it finished.
parts() {
  "$python" -c 'import json, sys; print(", ".join(json.load(open(sys.argv[1])).get("done", [])) or "none")' "$1" 2>/dev/null ||
    echo "no JSON"
}

step "benchmarks"
if [[ $cuda != yes ]]; then
  outcome "benchmarks" "skipped: no CUDA device"
else
  benchmarks=ok
  cap=$(limit $(($(remaining) * 55 / 100)) 20)
  if ((cap < 45)); then
    outcome "gpu_inference_loop" "skipped: too little time left (${cap} s)"
    benchmarks=partial
  else
    status=0
    capped "$cap" "$python" benchmarks/gpu_inference_loop.py --out "$scratch/loop" --steps 60 --warmup 5 \
      --rounds 3 --pool-mib 128 --large-gib "$large_gib" --json "$out/gpu-inference-loop.json" || status=$?
    if ((status == 0)); then
      outcome "gpu_inference_loop" "ok (parts: $(parts "$out/gpu-inference-loop.json"))"
    else
      outcome "gpu_inference_loop" "$(stopped_or "$status" "failed (status $status)"); parts done: $(parts "$out/gpu-inference-loop.json")"
      benchmarks=partial
    fi
  fi
  cap=$(limit 240 15)
  if ((cap < 30)); then
    outcome "gpu_backends" "skipped: too little time left (${cap} s)"
    benchmarks=partial
  else
    status=0
    capped "$cap" "$python" benchmarks/gpu_backends.py --out "$scratch/backends" --outputs 16 --mib 32 \
      --rounds 3 --stall-outputs 32 --json "$out/gpu-backends.json" || status=$?
    if ((status == 0)); then
      outcome "gpu_backends" "ok (parts: $(parts "$out/gpu-backends.json"))"
    else
      outcome "gpu_backends" "$(stopped_or "$status" "failed (status $status)"); parts done: $(parts "$out/gpu-backends.json")"
      benchmarks=partial
    fi
  fi
fi

step "summary"
finished=yes
write_summary
if [[ $cuda != yes ]]; then
  say "no CUDA device: exit 0 (the GPU tests skipped, the benchmarks did not run)"
  exit 0
fi
if [[ $tests_ran != yes || $tests_bad == yes ]] || ((failed > 0)); then
  exit 1
fi
exit 0
