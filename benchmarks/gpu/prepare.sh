#!/usr/bin/env bash
# GPU suite, step 1 (on a machine with a package registry): download into .whl/ the wheels the GPU machine
# lacks (benchmarks/gpu/wheels.txt), built for its Python 3.12 on x86-64. The GPU machine reaches no
# registry, and the device tool carries the working tree plus named ignored paths within 64 MiB, so the
# wheels must be fetched here, in advance, and stay small: this fails above 60 MiB.
#
#   bash benchmarks/gpu/prepare.sh        # then run the suite with carry [".whl"] (README, "GPU")
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl
limit_mib=60
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' benchmarks/gpu/wheels.txt | grep -v '^$')
# a fresh folder: two versions of one package would stop the install there
rm -rf "$dest" && mkdir -p "$dest"
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dest" "${pins[@]}"
count=$(find "$dest" -type f -name '*.whl' | wc -l)
if [[ "$count" -ne "${#pins[@]}" ]]; then
    echo "expected ${#pins[@]} wheels, got $count in $dest" >&2
    exit 1
fi
ls -l "$dest"
bytes=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
awk -v b="$bytes" -v t="$tree" 'BEGIN { printf "%d wheels: %.1f MiB (tracked files: %.1f MiB; the device tool carries 64 MiB in all)\n", '"$count"', b / 1048576, t / 1048576 }'
if (( bytes > limit_mib * 1024 * 1024 )); then
    echo "over ${limit_mib} MiB: carry fewer wheels" >&2
    exit 1
fi
echo "carry: [\".whl\"]; on the GPU machine: bash benchmarks/gpu/run.sh \"\$OUT\""
