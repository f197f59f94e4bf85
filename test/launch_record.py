"""Record every Triton kernel launch the interpreter runs, so the same configurations can be
compiled for a real GPU target on a machine without one (test_sm90_compile.py).

The interpreter executes kernels as Python: it never type-checks a kernel the way the compiler
does (a name re-bound with another type inside a run-time `if` passes here and fails to compile
on the GPU). Each record names the kernel (module, name), the compiler signature of every
run-time argument (pointer dtypes, scalar types), the constexpr values and the launch options.
"""
from __future__ import annotations

import inspect
import json
import os

import torch

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
        torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64", torch.int16: "*i16",
        torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _is_constexpr(param: inspect.Parameter) -> bool:
    return "constexpr" in str(param.annotation)


def describe(fn, args: tuple, kwargs: dict) -> dict | None:
    """The compile-time description of one launch of the @triton.jit function `fn`."""
    signature = inspect.signature(fn)
    params = signature.parameters
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    sig, const = {}, {}
    for name, value in bound.arguments.items():
        value = getattr(value, "value", value) if type(value).__name__ == "constexpr" else value
        if _is_constexpr(params[name]) or value is None:
            if not isinstance(value, (bool, int, float, str, type(None))):
                return None                    # a constexpr this recorder cannot serialise
            sig[name], const[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            return None
    return {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": const,
            "options": options}


# install(..., gated=True) records only while this is True (conftest turns it on around the
# tests whose launches the sm_90 check covers)
recording = {"on": True}


def install(path: str, gated: bool = False) -> None:
    """Append one JSON line per distinct launch to `path` (interpreter mode only); with `gated`,
    only while `recording["on"]`."""
    from triton.runtime.interpreter import InterpretedFunction
    seen: set[str] = set()
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        if gated and not recording["on"]:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        rec = describe(self.fn, args, dict(kwargs))
        if rec is not None:
            line = json.dumps(rec, sort_keys=True)
            if line not in seen:
                seen.add(line)
                with open(path, "a") as f:
                    f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


def maybe_install() -> None:
    path = os.environ.get("SPECSA_RECORD_LAUNCHES")
    if path and os.environ.get("TRITON_INTERPRET") == "1":
        install(path)


def compile_record(rec: dict, full: bool = True, arch: int = 90) -> str | None:
    """Compile one recorded launch for CUDA sm_`arch` (no GPU needed: Triton ships ptxas): all
    the way to a cubin (`full`), or only the front end (Python AST -> Triton IR, where the
    compiler type-checks the kernel; a fraction of a second). None when it compiles, else the
    error. Run without TRITON_INTERPRET."""
    import importlib

    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    sig = {a: rec["signature"][a] for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*")}     # torch allocations are 16-byte aligned
    src = ASTSource(fn=fn, signature=sig, constexprs=rec["constexprs"], attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    try:
        if full:
            triton.compile(src, target=target, options=rec["options"])
        else:          # the first stage of triton.compile, nothing after it
            backend = make_backend(target)
            options = backend.parse_options(dict(rec["options"], **src.parse_options()))
            context = ir.context()
            ir.load_dialects(context)
            backend.load_dialects(context)
            src.make_ir(target, options, backend.get_codegen_implementation(options),
                        backend.get_module_map(), context)
    except Exception as e:  # noqa: BLE001 - the error is the result
        return f"{type(e).__name__}: {e}"[-2500:]
    return None


def compile_records(recs: list[dict], full_per_kernel: int = 1) -> list[dict]:
    """Front end for every record; a full compile for the first `full_per_kernel` records of
    each kernel (the later passes rarely depend on constexprs, and each costs seconds).
    Returns the failures."""
    done: dict[str, int] = {}
    bad = []
    for r in recs:
        full = done.get(r["name"], 0) < full_per_kernel
        done[r["name"]] = done.get(r["name"], 0) + full
        err = compile_record(r, full=full)
        if err:
            bad.append({"name": r["name"], "full": full, "constexprs": r["constexprs"],
                        "signature": r["signature"], "error": err})
    return bad


def assert_records_compile(path, full_per_kernel: int = 1) -> None:
    """Test helper: compile the distinct records of `path` in a fresh process without
    TRITON_INTERPRET (this one may have it set); fail the test with each error, skip it when the
    environment has no sm_90 assembler."""
    import subprocess
    import sys

    import pytest
    lines = sorted(set(open(path).read().splitlines()))      # several processes append
    distinct = f"{path}.distinct"
    with open(distinct, "w") as f:
        f.write("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    c = subprocess.run([sys.executable, os.path.abspath(__file__), distinct,
                        str(full_per_kernel)], env=env, capture_output=True, text=True,
                       timeout=1800, cwd=os.path.dirname(os.path.abspath(__file__)))
    out = json.loads(c.stdout.strip().splitlines()[-1]) if c.stdout.strip() else None
    assert out is not None, f"compile run printed nothing:\n{c.stderr[-3000:]}"
    bad = out["failed"]
    if bad and all(b["full"] and "ptxas" in b["error"] for b in bad):
        pytest.skip("no sm_90 assembler in this environment")
    assert not bad, "\n\n".join(f"{b['name']} {b['constexprs']}:\n{b['error'][-1500:]}"
                                for b in bad)


if __name__ == "__main__":
    # python launch_record.py RECORDS.jsonl [FULL_PER_KERNEL]: compile the records (sm_90), print
    # {"compiled": n, "failed": [...]} and exit 1 if any failed
    import sys
    recs = [json.loads(line) for line in open(sys.argv[1])]
    bad = compile_records(recs, int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    print(json.dumps({"compiled": len(recs), "failed": bad}))
    sys.exit(1 if bad else 0)
