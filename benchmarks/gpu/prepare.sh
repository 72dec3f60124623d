#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels (git-ignored) with what the GPU machine lacks, for Python 3.12 x86_64:
# segment-anything, pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, at the
# versions installed here. Run it on this machine (it needs the package registry) right before the GPU
# call, and carry the folder: run(command='bash benchmarks/gpu/run.sh "$OUT"', carry=["benchmarks/gpu/wheels"]).
# About 2.7 MB. If segment-anything has no wheel on the registry, the installed package is zipped instead.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-$here/../../.venv/bin/python}"
dest="$here/wheels"
rm -rf "$dest"
mkdir -p "$dest"
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pins=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions; do
  pins+=("$name==$(version "$name")")
done
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${pins[@]}"
sam="segment-anything==$(version segment-anything)"
if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$dest" "$sam"; then
  echo "no wheel for $sam: zipping the installed package" >&2
  "$py" - "$dest" <<'PY'
import pathlib, sys, zipfile
import segment_anything
root = pathlib.Path(segment_anything.__file__).parent
with zipfile.ZipFile(pathlib.Path(sys.argv[1]) / "segment_anything.zip", "w") as z:
    for f in root.rglob("*.py"):
        z.write(f, f.relative_to(root.parent))
PY
fi
ls -l "$dest"
du -sh "$dest"
