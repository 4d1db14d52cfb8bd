"""The GPU machine's quick look (about 30 s), before the tests: what is installed, how the SM clock moves,
what pinning costs, and two states a test run has tripped over.

Each check goes into the JSON (`--json`) as soon as it is done, as {"status": "pass" | "fail" |
"error" | "info" | "skipped", ...}: a check that raises is recorded as "error" with its text, and the
next one runs. Without CUDA it records the versions, says so, and exits 0; it exits 0 whatever the
checks found (gpu_check.sh reads the JSON).

  - versions: the distributions' versions (importlib.metadata, no import), then what imports.
  - sm_clock: torch.cuda._sleep's cycles per second idle and right after warm matmuls (the tests
    calibrate warm: tests/test_cuda.py's sleep_rates), and NVML's SM clock where torch reports it.
  - host_register: cudaHostRegister and cudaHostUnregister of `--register-gib` GiB of anonymous
    mapped memory, as the pinned pool does it (staging/pool.py), idle and while a ~1 s kernel is
    queued on a side stream and on the legacy default stream: pinning must not wait for the kernel.
  - cai_stream_1: an array whose __cuda_array_interface__ names stream 1 (the legacy default stream,
    as CuPy reports its null stream) through tensorsink.arrays.as_array must not raise.
  - stale_error_after_failed_register: a failed cudaHostRegister (the range registered already) must
    not leave its error for the next kernel launch, once through tensorsink's pinned_buffer.

    python benchmarks/gpu_smoke.py --json smoke.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import mmap
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from json_file import write_whole

REPO = Path(__file__).resolve().parent.parent

#: Distributions whose versions matter on the GPU machine (absent ones are reported absent).
DISTRIBUTIONS = [
    "torch",
    "numpy",
    "safetensors",
    "cupy-cuda13x",
    "cupy",
    "kvikio-cu13",
    "libkvikio-cu13",
    "kvikio",
    "rapids-logger",
    "cuda-pathfinder",
    "cuda-bindings",
    "cuda-core",
    "nvidia-cufile",
    "nvidia-cufile-cu13",
    "nvidia-cuda-runtime",
    "nvidia-ml-py",
    "setuptools",
    "pytest",
    "pytest-timeout",
    "hypothesis",
]


class Report:
    """The JSON, rewritten whole after each check (a kill keeps what was measured)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.data["checks"] = {}
        self.save()

    def save(self) -> None:
        if self.path is not None:
            write_whole(self.path, self.data)

    def check(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one check; its record has "status" ("ok": True pass, False fail, absent info)."""
        began = time.perf_counter()
        try:
            found = run()
            ok = found.pop("ok", None)
            status = "info" if ok is None else "pass" if ok else "fail"
            record = {"status": status, **found}
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            record = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
            record["traceback"] = traceback.format_exc(limit=6).splitlines()[-12:]
        record["seconds"] = round(time.perf_counter() - began, 3)
        self.data["checks"][name] = record
        self.save()
        print(f"{name}: {record['status']} ({record['seconds']} s)", flush=True)
        for key, value in record.items():
            if key not in ("status", "seconds", "traceback"):
                print(f"  {key}: {json.dumps(value, default=str)}", flush=True)
        return record

    def skip(self, name: str, why: str) -> None:
        self.data["checks"][name] = {"status": "skipped", "why": why}
        self.save()
        print(f"{name}: skipped: {why}", flush=True)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    distributions = {}
    for name in DISTRIBUTIONS:
        try:
            distributions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            distributions[name] = None
    found["distributions"] = {k: v for k, v in distributions.items() if v is not None}
    found["absent"] = [k for k, v in distributions.items() if v is None]
    imports: dict[str, str] = {}
    for module in ("torch", "numpy", "tensorsink"):
        try:
            imported = importlib.import_module(module)
            imports[module] = str(getattr(imported, "__version__", "imported"))
        except BaseException as exc:  # a broken library may raise anything at import
            imports[module] = "import failed: " + _error_text(exc)
    for module in ("cupy", "kvikio"):  # in a child each: a library that cannot load may crash it
        imports[module] = child_import(module)
    found["imports"] = imports
    with contextlib.suppress(Exception):
        from tensorsink.engine import available_engines

        found["tensorsink_engines"] = list(available_engines())
    return found


def child_import(module: str) -> str:
    """`module`'s version, imported in a child process, or the last lines of why it did not import."""
    code = f"import {module}; print(getattr({module}, '__version__', 'imported'))"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=90, check=False
        )
    except subprocess.TimeoutExpired:
        return "import failed: it took more than 90 s"
    if done.returncode == 0:
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "imported"
    why = " | ".join(done.stderr.strip().splitlines()[-3:])
    return f"import failed (exit {done.returncode}): {why}"


def cuda_facts(torch: Any) -> dict[str, Any]:
    found: dict[str, Any] = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if found["available"]:
        properties = torch.cuda.get_device_properties(0)
        found["device"] = torch.cuda.get_device_name(0)
        found["capability"] = list(torch.cuda.get_device_capability(0))
        found["memory_gib"] = round(properties.total_memory / 2**30, 1)
        found["multiprocessors"] = properties.multi_processor_count
    return found


def nvml_clock_mhz(torch: Any) -> int | str:
    """The SM clock now, from NVML through torch (nvidia-ml-py), or why it is not known."""
    try:
        return int(torch.cuda.clock_rate())
    except Exception as exc:
        return "unknown: " + _error_text(exc)


def sm_clock(torch: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Idle first (nothing has run on the device but the loading of the sleep kernel), then warm."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.test_cuda import sleep_rates

    found: dict[str, Any] = {"nvml_sm_mhz_before": nvml_clock_mhz(torch)}
    torch.cuda._sleep(1_000_000)  # the kernel loaded, then a pause for the clock to settle low
    torch.cuda.synchronize()
    time.sleep(1.0)
    idle = sleep_rates(warm=False, cycles=20_000_000)
    found["nvml_sm_mhz_after_idle_sleeps"] = nvml_clock_mhz(torch)
    warm = sleep_rates(warm=True)
    found["nvml_sm_mhz_warm"] = nvml_clock_mhz(torch)
    found["idle_mhz"] = [round(r / 1e6) for r in idle]
    found["warm_mhz"] = [round(r / 1e6) for r in warm]
    found["warm_over_idle"] = round(max(warm) / max(idle), 2)
    state["cycles_per_second"] = max(warm)
    return found


@contextlib.contextmanager
def anonymous_memory(nbytes: int) -> Iterator[tuple[mmap.mmap, int]]:
    """Private anonymous memory, mapped as the pinned pool maps it: (the mapping, its address)."""
    import torch

    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = torch.frombuffer(memory, dtype=torch.uint8)
    try:
        yield memory, buffer.data_ptr()
    finally:
        del buffer
        with contextlib.suppress(BufferError):  # a view still exported: unmapped when collected
            memory.close()


def host_register(torch: Any, state: dict[str, Any], gib: float, kernel_s: float) -> dict[str, Any]:
    cudart = torch.cuda.cudart()
    register, unregister = cudart.cudaHostRegister, cudart.cudaHostUnregister
    nbytes = int(gib * 2**30) // 4096 * 4096
    rate = state.get("cycles_per_second")
    found: dict[str, Any] = {"bytes": nbytes, "kernel_s_asked": kernel_s}
    if rate is None:
        rate = 2.0e9  # above any H100/H200 boost clock: the kernel lasts at least kernel_s
        found["kernel_cycles_from"] = "2 GHz (sm_clock did not measure)"
    ok = True
    with anonymous_memory(nbytes) as (_, address):
        began = time.perf_counter()
        error = int(register(address, nbytes, 1))
        found["idle_register_s"] = round(time.perf_counter() - began, 4)
        if error:
            return {"ok": False, "idle_register_error": error}
        began = time.perf_counter()
        error = int(unregister(address))
        found["idle_unregister_s"] = round(time.perf_counter() - began, 4)
        ok = ok and error == 0
        for where in ("side", "default"):
            stream = torch.cuda.Stream() if where == "side" else torch.cuda.default_stream()
            with torch.cuda.stream(stream):
                torch.cuda._sleep(int(kernel_s * rate))
            began = time.perf_counter()
            error = int(register(address, nbytes, 1))
            registered = time.perf_counter() - began
            busy_after_register = not stream.query()
            began = time.perf_counter()
            error_out = int(unregister(address)) if error == 0 else None
            unregistered = time.perf_counter() - began
            busy_after_unregister = not stream.query()
            began = time.perf_counter()
            stream.synchronize()
            found[f"{where}_stream"] = {
                "register_s": round(registered, 4),
                "register_error": error,
                "unregister_s": round(unregistered, 4),
                "unregister_error": error_out,
                "kernel_busy_after_register": busy_after_register,
                "kernel_busy_after_unregister": busy_after_unregister,
                "kernel_left_s": round(time.perf_counter() - began, 3),
            }
            # pinning must not wait for the device: the kernel still runs once both have returned
            ok = ok and error == 0 and error_out == 0 and busy_after_register and busy_after_unregister
    found["ok"] = ok
    return found


class InterfaceOnly:
    """An object known only through a __cuda_array_interface__ dict (CuPy's, or a tensor's)."""

    def __init__(self, interface: dict[str, Any], keep: object) -> None:
        self.__cuda_array_interface__ = interface
        self._keep = keep


def cai_stream_1(torch: Any) -> dict[str, Any]:
    from tensorsink.arrays import as_array

    found: dict[str, Any] = {}
    ok = True

    def attempt(name: str, make: Callable[[], tuple[object, Any]]) -> None:
        nonlocal ok
        try:
            value, expected = make()
            interface = getattr(value, "__cuda_array_interface__", None)
            stream = interface.get("stream") if isinstance(interface, dict) else None
            tensor = as_array(value)
            torch.cuda.synchronize()
            same = tensor is not None and bool(torch.equal(tensor.cpu(), expected))
            found[name] = {"reported_stream": stream, "raised": None, "values_equal": same}
            ok = ok and same
        except Exception as exc:
            found[name] = {"raised": _error_text(exc)}
            ok = False

    def from_tensor() -> tuple[object, Any]:
        tensor = torch.arange(1024, dtype=torch.int32, device="cuda")
        interface = dict(tensor.__cuda_array_interface__, version=3, stream=1)
        return InterfaceOnly(interface, tensor), tensor.cpu()

    attempt("tensor_interface_stream_1", from_tensor)
    try:
        import cupy
    except BaseException as exc:
        found["cupy"] = "not importable: " + _error_text(exc)
    else:

        def cupy_interface() -> tuple[object, Any]:
            with cupy.cuda.Stream.null:  # CuPy reports its null stream as 1, the legacy default stream
                array = cupy.arange(1024, dtype=cupy.int32) * 3
                interface = dict(array.__cuda_array_interface__)
            return InterfaceOnly(interface, array), torch.arange(1024, dtype=torch.int32) * 3

        def cupy_itself() -> tuple[object, Any]:  # through DLPack
            with cupy.cuda.Stream.null:
                array = cupy.arange(1024, dtype=cupy.int32) * 5
            return array, torch.arange(1024, dtype=torch.int32) * 5

        attempt("cupy_interface_null_stream", cupy_interface)
        attempt("cupy_array_null_stream", cupy_itself)
    found["ok"] = ok
    return found


def stale_error(torch: Any) -> dict[str, Any]:
    """Raw first (is there a stale error to clear at all, in this torch?), then through pinned_buffer."""
    from tensorsink.staging import pool as pool_module

    cudart = torch.cuda.cudart()
    error_name = getattr(cudart, "cudaGetErrorString", None)
    nbytes = 4 << 20
    found: dict[str, Any] = {}

    def launch() -> str | None:
        try:
            torch.ones(4, device="cuda").sum().item()
        except Exception as exc:
            return _error_text(exc)
        return None

    with anonymous_memory(nbytes) as (_, address):
        first = int(cudart.cudaHostRegister(address, nbytes, 1))
        second = int(cudart.cudaHostRegister(address, nbytes, 1))
        found["raw"] = {
            "first_register": first,
            "second_register": second,
            "second_register_text": str(error_name(second)) if error_name and second else None,
            "next_launch_raised": launch(),  # info: whether the hazard exists in this torch
        }
        cudart.cudaHostUnregister(address)
    launch()  # whatever was left is consumed here, before the check proper
    if second == 0:
        raise RuntimeError(f"registering a range twice did not fail ({found['raw']}): nothing to check")
    if found["raw"]["next_launch_raised"] is None:
        found["note"] = (
            "a launch after a raw failed registration did not raise in this torch: the check below "
            "passes whether or not tensorsink clears the error"
        )

    with anonymous_memory(nbytes) as (memory, address):
        if int(cudart.cudaHostRegister(address, nbytes, 1)) != 0:
            raise RuntimeError("the range could not be registered the first time: nothing to check")
        try:
            found["through_pinned_buffer"] = _through_pinned_buffer(pool_module, memory, address, launch)
        finally:
            cudart.cudaHostUnregister(address)
    launch()
    found["ok"] = found["through_pinned_buffer"]["next_launch_raised"] is None
    return found


def _through_pinned_buffer(
    pool_module: Any, memory: mmap.mmap, address: int, launch: Callable[[], str | None]
) -> dict[str, Any]:
    """pinned_buffer() of `memory`'s size, the memory it maps being `memory`, registered already (its
    module's `mmap.mmap` made to return it): its registration fails; then one kernel launch."""
    mapped: list[int] = []

    class SameMemory:
        MAP_PRIVATE, MAP_ANONYMOUS = mmap.MAP_PRIVATE, mmap.MAP_ANONYMOUS

        @staticmethod
        def mmap(*args: object, **kwargs: object) -> mmap.mmap:
            mapped.append(1)
            return memory

    saved = pool_module.mmap
    pool_module.mmap = SameMemory
    unpin: Callable[[], object] | None = None
    try:
        buffer, unpin = pool_module.pinned_buffer(len(memory))
        found: dict[str, Any] = {"raised": None, "fell_back": buffer.data_ptr() != address}
        found["buffer_pinned"] = bool(buffer.is_pinned())
    except Exception as exc:
        found = {"raised": _error_text(exc)}
    finally:
        pool_module.mmap = saved
    found["next_launch_raised"] = launch()
    if unpin is not None:
        with contextlib.suppress(Exception):
            unpin()
    if not mapped:
        raise RuntimeError(
            "pinned_buffer mapped no memory through its module's mmap.mmap: no failed registration "
            f"was provoked ({found})"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the checks here, after each")
    parser.add_argument("--register-gib", type=float, default=1.0)
    parser.add_argument("--kernel-s", type=float, default=1.0, help="the kernel queued while pinning")
    args = parser.parse_args()

    report = Report(args.json)
    report.check("versions", versions)
    try:
        import torch
    except BaseException as exc:
        report.data["cuda"] = False
        report.data["note"] = "torch does not import: " + _error_text(exc)
        report.save()
        print(report.data["note"])
        return
    facts = report.check("cuda", lambda: cuda_facts(torch))
    if not facts.get("available"):
        report.data["cuda"] = False
        report.data["note"] = (
            "no CUDA device: the GPU checks are skipped"
            if facts["status"] != "error"
            else f"CUDA could not be queried ({facts['error']}): the GPU checks are skipped"
        )
        for name in ("sm_clock", "host_register", "cai_stream_1", "stale_error_after_failed_register"):
            report.skip(name, "no CUDA device")
        print(report.data["note"])
        return
    report.data["cuda"] = True
    state: dict[str, Any] = {}
    report.check("sm_clock", lambda: sm_clock(torch, state))
    report.check("host_register", lambda: host_register(torch, state, args.register_gib, args.kernel_s))
    report.check("cai_stream_1", lambda: cai_stream_1(torch))
    report.check("stale_error_after_failed_register", lambda: stale_error(torch))  # last: it provokes errors
    statuses = [check["status"] for check in report.data["checks"].values()]
    report.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report.data["counts"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    report.save()


if __name__ == "__main__":
    main()
