"""Long real English text for long-context runs, offline (Debian archive only).

    python scripts/fetch_text.py --out data/text

Downloads the Debian package python3.11-doc with `apt-get download` (no install), unpacks its
Sphinx sources (`*.rst.txt`, technical prose) and writes a few concatenated files:
data/text/pydoc_<name>.txt. Falls back to the CPython stdlib sources if apt is unavailable.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sysconfig
import tempfile

PICKS = ["tutorial/classes.rst.txt", "library/functools.rst.txt", "reference/datamodel.rst.txt",
         "howto/logging.rst.txt", "library/asyncio-task.rst.txt"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/text")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, check=True,
                           capture_output=True)
            deb = glob.glob(os.path.join(tmp, "python3.11-doc_*.deb"))[0]
            subprocess.run(["dpkg", "-x", deb, os.path.join(tmp, "x")], check=True)
            src = glob.glob(os.path.join(tmp, "x/usr/share/doc/python3*/html/_sources"))[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            src = None
        if src:
            for rel in PICKS:
                p = os.path.join(src, rel)
                if os.path.exists(p):
                    name = rel.replace("/", "_").replace(".rst.txt", "")
                    with open(p, encoding="utf-8", errors="replace") as f, \
                            open(os.path.join(args.out, f"pydoc_{name}.txt"), "w") as g:
                        g.write(f.read())
        else:  # fallback: real Python source from the running interpreter's stdlib
            lib = sysconfig.get_paths()["stdlib"]
            for name in ["argparse.py", "dataclasses.py", "functools.py"]:
                with open(os.path.join(lib, name)) as f, \
                        open(os.path.join(args.out, f"stdlib_{name}.txt"), "w") as g:
                    g.write(f.read())
    print("\n".join(sorted(glob.glob(os.path.join(args.out, "*.txt")))))


if __name__ == "__main__":
    main()
