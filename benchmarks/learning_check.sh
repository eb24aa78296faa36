#!/usr/bin/env bash
# The README's CPU learning check: every method for a few epochs on a CIFAR-10 image folder
# (DATA/train/<class>/*, DATA/test/<class>/*), a ResNet-18 of width 8, --gpu_aug, one seed; kNN
# top-1 after the last epoch, the negatives monitor after the first and the last, and the
# untrained network (--epochs 0) as the baseline. Prints the README's table.
#
#     bash benchmarks/learning_check.sh DATA [OUT] [EPOCHS] [SEED]
set -euo pipefail
DATA=${1:?usage: bash benchmarks/learning_check.sh DATA [OUT] [EPOCHS] [SEED]}
OUT=${2:-runs/learning_check}
EPOCHS=${3:-3}
SEED=${4:-0}
COMMON="--dataset folder --data_dir $DATA --arch resnet18 --width 8 --batch_size 128 --workers 0 --gpu_aug --seed $SEED"
run() {  # name script flags...
    local name=$1 script=$2; shift 2
    [ -f "$OUT/$name/metrics.csv" ] && return 0
    python "$script" $COMMON "$@" --out_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "$name failed"; tail -3 "$OUT/$name.log"; }
}
mkdir -p "$OUT"
RING="--ring_lower 0.01 --ring_upper 0.1"
MOCHI="--n_hard 256 --s1_hard 256 --s2_hard 128 --start1_hard 0 --start2_hard 0"
for spec in "SimCLR simclr_debiased.py --tau_plus 0 --beta 0" \
            "DCL simclr_debiased.py --tau_plus 0.1 --beta 0" \
            "HCL simclr_debiased.py --tau_plus 0.1 --beta 1" \
            "MoCo moco_mochi.py" \
            "MoCHi moco_mochi.py $MOCHI" \
            "IR ring_nce.py --method ir" \
            "Ring-IR ring_nce.py --method ir $RING" \
            "MoCo-ring ring_nce.py --method moco" \
            "Ring-MoCo ring_nce.py --method moco $RING" \
            "CMC ring_nce.py --method cmc" \
            "Ring-CMC ring_nce.py --method cmc $RING" \
            "NNCLR nnclr_kmclr.py --method nnclr --queue_size 1024" \
            "KMCLR nnclr_kmclr.py --method kmclr --num_prototypes 100 --reset_every 1"; do
    set -- $spec
    name=$1; shift
    run "$name-untrained" "$@" --epochs 0   # the same network untrained: the baseline
    run "$name" "$@" --epochs "$EPOCHS"
done
python - "$OUT" <<'EOF'
import csv, os, sys
out = sys.argv[1]
def rows(name):
    with open(os.path.join(out, name, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))
fmt = lambda v: f"{float(v):.3f}" if v not in ("", None) else ""
print("| method | kNN top-1 (untrained) | fn_rate, epoch 1 / last | fn_rate_hard, epoch 1 / last | "
      "method column, last epoch |")
print("|---|---|---|---|---|")
for name in ("SimCLR", "DCL", "HCL", "MoCo", "MoCHi", "IR", "Ring-IR", "MoCo-ring", "Ring-MoCo", "CMC",
             "Ring-CMC", "NNCLR", "KMCLR"):
    r = rows(name)
    extra = [k for k in ("fn_weight", "fn_rate_synth", "fn_rate_above", "nn_acc") if r[-1].get(k)]
    u = float(rows(name + "-untrained")[0]["knn_top1"])
    print(f"| {name} | {float(r[-1]['knn_top1']):.2f} ({u:.2f}) | {fmt(r[0]['fn_rate'])} / {fmt(r[-1]['fn_rate'])} | "
          f"{fmt(r[0]['fn_rate_hard'])} / {fmt(r[-1]['fn_rate_hard'])} | "
          + ", ".join(f"{k} {fmt(r[-1][k])}" for k in extra) + " |")
EOF
