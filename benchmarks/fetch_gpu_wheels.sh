#!/usr/bin/env bash
# Fetch, on a machine with the package registry, what benchmarks/gpu_check.sh needs on a GPU
# machine that has none, into the ignored folder .gpu/ (about 12 MiB; the device call carries
# at most 64 MiB with the working tree):
#
#   .gpu/wheels/   the peers the GPU image lacks, for CPython 3.12 manylinux x86_64, --no-deps:
#                  TRL and its datasets stack, Liger-Kernel, and the openai client (serve's check)
#   .gpu/smollm2/  SmolLM2-135M-Instruct's config.json and tokenizer files (`minidpo fetch-default`):
#                  the smoke gives that shape random weights, since its 98 MB GGUF does not fit
#
# Then, from a session with the device tool, in one call:
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600)
#
# What the image has (torch 2.11 cu130, triton 3.6, transformers 5.17, peft, accelerate,
# pandas, pyarrow, ...: /work/.library/device/KINDS.md, read 2026-11) is not fetched. The list
# below is the closure of trl, liger-kernel and openai over their Requires-Dist minus that
# image, at the versions the CPU test environment (.venv) uses; `--check` re-derives the
# closure from the fetched wheels and names any requirement that neither has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

WHEELS=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  liger-kernel==0.8.5
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
# Distributions in the GPU image (KINDS.md's list, names only).
IMAGE="accelerate aiohttp anyio attrs certifi charset-normalizer click filelock fsspec h11 httpcore httpx
huggingface-hub idna jinja2 markupsafe numpy packaging pandas peft psutil pyarrow pyyaml regex requests
safetensors sentencepiece setuptools tokenizers torch tqdm transformers triton typing-extensions urllib3
xxhash"

rm -rf .gpu/wheels
mkdir -p .gpu/wheels .gpu/smollm2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .gpu/wheels "${WHEELS[@]}"

model_dir=$("$PY" -m minidpo fetch-default | tail -n 1)
cp "$model_dir"/config.json "$model_dir"/tokenizer.json "$model_dir"/tokenizer_config.json .gpu/smollm2/

# Every requirement of a fetched wheel (no extras, Linux, Python 3.12) is fetched or in the image.
"$PY" - "$IMAGE" <<'EOF'
import re, sys, zipfile
from pathlib import Path
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(n) for n in sys.argv[1].split()}
wheels = sorted(Path(".gpu/wheels").glob("*.whl"))
have |= {norm(w.name.split("-")[0]) for w in wheels}
missing = set()
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        name = norm(re.match(r"Requires-Dist:\s*([A-Za-z0-9_.\-]+)", line).group(1))
        marker = line.partition(";")[2]
        if "extra ==" in marker or "emscripten' and" in marker or "win32" in marker:
            continue
        if name not in have:
            missing.add(f"{name} (for {wheel.name})")
if missing:
    sys.exit("fetch_gpu_wheels: not fetched and not in the image: " + ", ".join(sorted(missing)))
print(f"fetch_gpu_wheels: {len(wheels)} wheels, every requirement fetched or in the image")
EOF
du -sh .gpu
