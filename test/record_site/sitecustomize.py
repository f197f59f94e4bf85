"""Put this folder on PYTHONPATH (with SPECSA_RECORD_LAUNCHES and TRITON_INTERPRET=1) to record
the Triton launches of every Python process started under it, such as an SGLang server and its
scheduler subprocess, which never import the tests' conftest (test/launch_record.py)."""
import importlib.util
import os

if os.environ.get("SPECSA_RECORD_LAUNCHES"):
    # loaded by file: putting test/ on sys.path would let test/specsa shadow the package
    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "launch_record.py")
    _spec = importlib.util.spec_from_file_location("specsa_launch_record", _path)
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
    _mod.maybe_install()
