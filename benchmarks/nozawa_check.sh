#!/usr/bin/env bash
# The README's small CPU run of Nozawa & Sato's analysis: SimCLR as their CIFAR-10 code (their
# head, LARC, warm-up + cosine, four chunk losses, no normalisation, no blur) for K+1 in {16, 32, 64,
# 128} on 1,024 images of a CIFAR-10 image folder, 3 epochs, ResNet-18 of width 8; then their mean
# classifier and linear probe (linear_eval.py --protocol nozawa) and the bound (bound.py evaluate)
# on 1,000 training and 1,000 test images; Table 2 and Figure 1 from bound.py plot. With AG_DIR
# (train.csv, test.csv) also their text experiment for K+1 in {16, ..., 256}, 5 epochs.
#
#     bash benchmarks/nozawa_check.sh CIFAR_FOLDER [AG_DIR] [OUT]
set -euo pipefail
DATA=${1:?usage: bash benchmarks/nozawa_check.sh CIFAR_FOLDER [AG_DIR] [OUT]}
AG=${2:-}
OUT=${3:-runs/nozawa_check}
for K in 16 32 64 128; do R=$OUT/cifar/k$K
    [ -f "$R/bounds.json" ] && continue
    python simclr_debiased.py --dataset folder --data_dir "$DATA" --arch resnet18 --width 8 \
        --stem_padding 3 --head nozawa --norm none --blur_p 0 --tau_plus 0 --beta 0 \
        --optimizer larc --lr "$(python -c "print($K / 256)")" --weight_decay 1e-4 \
        --warmup_epochs 1 --num_chunks 4 --batch_size $((4 * K)) --subset 1024 --epochs 3 \
        --workers 0 --eval_every 0 --out_dir "$R"
    python linear_eval.py "$R/last.pt" --protocol nozawa --subset 1000 --test_subset 1000 \
        --epochs 5 --batch_size 256 --workers 0
    python bound.py evaluate --checkpoint "$R/last.pt" --train_subset 1000 --test_subset 1000 \
        --num_augmentations 1 --passes 2 --workers 0
done
python bound.py plot "$OUT"/cifar/k* --out "$OUT/cifar.png" --markdown "$OUT/cifar.md"
[ -n "$AG" ] || exit 0
for K in 16 32 64 128 256; do R=$OUT/ag/k$K
    [ -f "$R/bounds_sub2.json" ] && continue
    python nlp_similar_words.py --data_dir "$AG" --augmentation erase --batch_size $K --epochs 5 \
        --workers 0 --out_dir "$R"
    python linear_eval.py "$R/last.pt" --protocol nozawa --workers 0
    python bound.py evaluate --checkpoint "$R/last.pt" --workers 0
    python bound.py evaluate --checkpoint "$R/last.pt" --workers 0 --sub_classes 2
done
python bound.py plot "$OUT"/ag/k* --out "$OUT/ag.png" --markdown "$OUT/ag.md"
