"""Build the native CPU kernels in place: `python -m tkr_embed.native.build`.

Runs CMake on tkr_embed/native/CMakeLists.txt (nanobind and MLX's own CMake package, both from
the virtual environment: requirements-native.txt) and writes `_attention*.so` plus the MLX version
it was built for into this package. The vectorised loop is compiled for AVX2 + FMA and for the
baseline, the copy picked when the library loads. Linux only: on macOS, MLX runs attention on the
GPU with its own fused kernel.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import ATTENTION_MODULE, PACKAGE_DIR, version_stamp


def _cmake() -> str:
    try:  # the pinned PyPI cmake first: a fresh machine may have none
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        found = shutil.which("cmake")
        if not found:
            raise SystemExit("cmake not found: pip install -r requirements-native.txt")
        return found


def up_to_date() -> Path | None:
    """The built library, if it was built for this MLX and after its sources last changed."""
    import mlx.core as mx

    stamp = version_stamp(ATTENTION_MODULE)
    built = sorted(PACKAGE_DIR.glob(f"{ATTENTION_MODULE}*.so"))
    if not built or not stamp.exists() or stamp.read_text().strip() != mx.__version__:
        return None
    sources = [PACKAGE_DIR / "attention.cpp", PACKAGE_DIR / "CMakeLists.txt"]
    return built[-1] if built[-1].stat().st_mtime >= max(p.stat().st_mtime for p in sources) else None


def build(verbose: bool = False) -> Path:
    import mlx.core as mx

    stamp = version_stamp(ATTENTION_MODULE)
    stamp.unlink(missing_ok=True)  # a half-finished build must not be loaded as a good one
    with tempfile.TemporaryDirectory(prefix="tkr-embed-native-") as build_dir:
        out = None if verbose else subprocess.DEVNULL
        cmake = _cmake()
        configure = [cmake, "-S", str(PACKAGE_DIR), "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DPython_EXECUTABLE={sys.executable}", f"-DOUTPUT_DIR={PACKAGE_DIR}"]
        for cmd in (configure, [cmake, "--build", build_dir, "-j", str(os.cpu_count() or 2)]):
            done = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd[:2])} ... failed:\n{done.stderr[-4000:]}")
    built = sorted(PACKAGE_DIR.glob(f"{ATTENTION_MODULE}*.so"))
    if not built:
        raise RuntimeError(f"the build wrote no {ATTENTION_MODULE}*.so into {PACKAGE_DIR}")
    stamp.write_text(mx.__version__ + "\n")
    return built[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    if platform.system() != "Linux":
        print("native CPU kernels: nothing to build here (Linux only)")
        return 0
    # setup.sh runs on every serve and test command: a build for this MLX and these sources stays.
    current = None if args.force else up_to_date()
    if current is not None:
        print(f"native CPU kernels: {current.name} is up to date")
        return 0
    try:
        path = build(args.verbose)
    except (RuntimeError, OSError) as exc:
        print(f"native CPU kernels: build failed, MLX ops will be used instead\n{exc}", file=sys.stderr)
        return 1
    print(f"native CPU kernels: built {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
