#!/usr/bin/env bash
# Command 1: set up, generate a phantom CT, segment and classify it with the shipped model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=outputs/demo-$(date +%Y%m%d-%H%M%S)
.venv/bin/liverlesionai demo --output "$out" "$@"
echo "Outputs in $out (open the .seg.nrrd in 3D Slicer together with phantom_*/image.nii.gz)"
