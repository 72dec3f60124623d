#!/usr/bin/env bash
# Few-shot fine-tuning with the commands a user would type: write 13 annotated synthetic 512² frames of a
# kind the default model was not trained on, evaluate the default model on 10 of them, fine-tune it on
# the other 3, and evaluate the fine-tuned weights on the same 10.
#
#   bash scripts/fewshot-demo.sh [WORKDIR] [KIND] [CELLS] [STEPS]
#
# KIND: dic (held out of training; default), stained, membrane (both held out), dic-large (DIC at about
# three times the magnification of the training data: cell radius 40-60 px; 14 cells by default), or
# inverted (fluorescent nuclei with an inverted lookup table: dark on bright). Defaults: ./fewshot-KIND,
# 80 cells, 100 steps.
#
# Any annotated images work the same way: TIFF/PNG images and label images (napari: File > Save Layer
# on a Labels layer), `cellsam-stream finetune --images ... --labels ... -o tuned.pt`, then
# `cellsam-stream segment --weights tuned.pt` or `serve --weights tuned.pt`.
set -euo pipefail
kind=${2:-dic}
dir=${1:-fewshot-$kind}
default_cells=80
case "$kind" in
  dic | stained | membrane) style=(--modality "$kind") ;;
  dic-large) style=(--modality dic --cell-radius 40 60) default_cells=14 ;;
  inverted) style=(--modality nuclear --invert) ;;
  *) echo "unknown KIND $kind (dic, stained, membrane, dic-large, inverted)" >&2; exit 2 ;;
esac
cells=${3:-$default_cells}
steps=${4:-100}
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
