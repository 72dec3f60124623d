#!/usr/bin/env bash
# Few-shot fine-tuning with the commands a user would type: write 13 annotated synthetic 512² frames of a
# kind the default model was not trained on, evaluate the default model on 10 of them, fine-tune it on
# the other 3, and evaluate the fine-tuned weights on the same 10.
#
#   bash scripts/fewshot-demo.sh [WORKDIR] [KIND] [CELLS] [STEPS]
#
# KIND: dic (held out of training; default), stained, membrane (both held out), or inverted (fluorescent
# nuclei with an inverted lookup table: dark on bright). Defaults: ./fewshot-KIND, 80 cells, 100 steps.
#
# Any annotated images work the same way: TIFF/PNG images and label images (napari: File > Save Layer
# on a Labels layer), `cellsam-stream finetune --images ... --labels ... -o tuned.pt`, then
# `cellsam-stream segment --weights tuned.pt` or `serve --weights tuned.pt`.
set -euo pipefail
kind=${2:-dic}
dir=${1:-fewshot-$kind}
cells=${3:-80}
steps=${4:-100}
case "$kind" in
  dic | stained | membrane) style=(--modality "$kind") ;;
  inverted) style=(--modality nuclear --invert) ;;
  *) echo "unknown KIND $kind (dic, stained, membrane, inverted)" >&2; exit 2 ;;
esac
mkdir -p "$dir"
for i in $(seq 0 12); do
  cellsam-stream sample "$dir/img_$i.tif" --labels "$dir/lab_$i.tif" "${style[@]}" --size 512 \
    --cells "$cells" --seed $((700 + i)) > /dev/null
done
test_images=() test_labels=()
for i in $(seq 3 12); do test_images+=("$dir/img_$i.tif"); test_labels+=("$dir/lab_$i.tif"); done

echo "== before: default model on 10 $kind frames"
cellsam-stream evaluate --images "${test_images[@]}" --labels "${test_labels[@]}"
start=$(date +%s)
cellsam-stream finetune --images "$dir"/img_{0,1,2}.tif --labels "$dir"/lab_{0,1,2}.tif \
  -o "$dir/tuned.pt" --steps "$steps"
echo "fine-tuning on 3 frames took $(( $(date +%s) - start )) s"
echo "== after: fine-tuned model on the same 10 frames"
cellsam-stream evaluate --weights "$dir/tuned.pt" --images "${test_images[@]}" --labels "${test_labels[@]}"
