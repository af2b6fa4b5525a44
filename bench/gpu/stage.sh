#!/usr/bin/env bash
# Stage what a lent GPU machine lacks, for bench/gpu/run.sh, into .gpu/ (git-excluded).
#
#   bash bench/gpu/stage.sh            # here, on the development machine (PyPI reachable)
#
# The device image has CUDA torch, pyarrow, numpy, pillow, OpenCV, safetensors and pytest
# for Python 3.12, but not Ray, s3fs or tenacity, and it reaches no network: their Python
# 3.12 wheels are resolved here, installed into .gpu/site, pruned of what a benchmark never
# loads (Ray's dashboard web build, tests), and packed as .gpu/site.tar.zst so that the
# working tree that travels stays under the device's 64 MiB (Ray alone is a 79 MB wheel; Java,
# Serve and LLM parts go). The benchmark runs on local disk there, so s3fs stays behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/site .gpu/site.tar.zst && mkdir -p .gpu
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$tag"); done
# Already on the device (its image's package list): leave them out so its own versions stay.
present='torch|numpy|pyarrow|pillow|opencv-python-headless|safetensors|pytest|pandas|fsspec|aiohttp|pyyaml|'\
'requests|protobuf|grpcio|packaging|filelock|msgpack|tqdm|psutil|prometheus-client|attrs|yarl|multidict|'\
'frozenlist|aiosignal|idna|certifi|urllib3|charset-normalizer|typing-extensions|click|jinja2|markupsafe'
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d .gpu/wheels "ray[data,train,default]==2.60.0" "tenacity>=8.2" "nvidia-ml-py" 2>/dev/null  # local disk: no s3fs
find .gpu/wheels -name '*.whl' | grep -Ev "/($present)-[0-9]" | while read -r wheel; do
    python3 -m pip install --quiet --no-deps --no-compile --target .gpu/site --python-version 3.12 \
        --implementation cp --only-binary=:all: "${platforms[@]}" "$wheel" 2>/dev/null
done
rm -rf .gpu/site/ray/dashboard/client/build .gpu/site/ray/tests .gpu/site/ray/rllib .gpu/site/ray/jars \
       .gpu/site/ray/serve .gpu/site/ray/llm .gpu/site/*.dist-info/RECORD
tar -C .gpu -cf - site | zstd -q -19 -T0 -o .gpu/site.tar.zst
rm -rf .gpu/wheels .gpu/data && mkdir -p .gpu/data  # the benchmark images: ../shared does not travel
cp -r "${RESFLOW_SHARED_DATA:-../shared/data}/BSD68" "${RESFLOW_SHARED_DATA:-../shared/data}/Set12" .gpu/data/
du -sh .gpu/site.tar.zst .gpu/data
