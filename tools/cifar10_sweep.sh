#!/bin/bash
# Submit the paper's CIFAR-10 experiments (He et al. 2016, sec. 4.2: Table 6 and Fig. 6) as Slurm training
# jobs, one run directory each, through `python -m launch submit train` and conf/cifar10_resnet20.yaml.
#
#   tools/cifar10_sweep.sh [--depths "20 32 44 56 110"] [--plain] [--seeds N] [--root DIR] [--runs DIR] \
#       -- LAUNCH_OPTIONS... [-- TRAINER_OPTIONS...]
#
#   --depths   CIFAR ResNet depths (default "20 32 44 56 110", the rows of Table 6; 1202 also exists)
#   --plain    also the plain nets of the same depths (Fig. 6 left: plain nets get worse with depth)
#   --seeds    runs per network, seeds 0..N-1 (default 1; the paper reports ResNet-110 over 5 runs): run k has
#              --seed_everything k (initialisation) and --data.seed k (data order, augmentation)
#   --root     the shards (default data/cifar10: data_prep's OUT with splits train and test)
#   --runs     parent of the run directories (default runs/cifar10): RUNS/<arch>-seed<k>
# Everything after `--` goes to `launch submit train` for every job (--time is required there; e.g.
# --time 1-00:00:00 --partition gpu, --dry-run to print the scripts and submit nothing); after a second `--`,
# trainer settings for every run (e.g. --trainer.precision 32-true), after the sweep's own.
# Depths 110 and 1202 (plain and residual) start at lr 0.01 for 400 steps, as the paper did for 110
# (--model.warmup_steps 400 --model.warmup_factor 0.1).
# Run again (more --seeds, more --depths): finished runs end at once, stopped ones resume, and a run whose job
# is still queued or running is skipped with a note (launch refuses a second job in a run directory); any
# other refusal stops the sweep.
# docs/cifar10.md: what to compare the results with.
set -euo pipefail  # empty arrays are expanded as ${a[@]+"${a[@]}"}: bash < 4.4 (RHEL 7) calls "${a[@]}" unbound

depths="20 32 44 56 110"
plain=0
seeds=1
root=data/cifar10
runs=runs/cifar10
launch_args=()
trainer_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --depths|--seeds|--root|--runs)
      # (a value that is the next option, `--depths -- ...`, was taken as the value and the rest called unknown)
      { [ $# -ge 2 ] && [ "$2" != "--" ] && [ "$2" != "--plain" ] && [ "${2#--}" = "$2" ]; } ||
        { echo "cifar10_sweep: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --depths) depths="$2"; shift 2 ;;
    --plain) plain=1; shift ;;
    --seeds) seeds="$2"; shift 2 ;;
    --root) root="$2"; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --) shift
        while [ $# -gt 0 ] && [ "$1" != "--" ]; do launch_args+=("$1"); shift; done
        [ $# -gt 0 ] && shift  # a second --: what follows goes to every trainer
        trainer_args=("$@"); break ;;
    *) echo "cifar10_sweep: unknown option $1 (options: --depths, --plain, --seeds, --root, --runs, then -- and launch's)" >&2
       exit 2 ;;
  esac
done
case "$seeds" in ''|*[!0-9]*|0) echo "cifar10_sweep: --seeds $seeds: a positive count" >&2; exit 2 ;; esac
for d in $depths; do
  case "$d" in 20|32|44|56|110|1202) ;;
    *) echo "cifar10_sweep: --depths: $d is not one of the paper's depths 20 32 44 56 110 1202" >&2; exit 2 ;;
  esac
done
[ -n "${depths// /}" ] || { echo "cifar10_sweep: --depths: none given" >&2; exit 2; }

python="${PYTHON:-python}"
archs=()
for d in $depths; do
  archs+=("cifar_resnet$d")
  [ "$plain" = 1 ] && archs+=("plain_cifar_resnet$d")
done
said=$(mktemp)
trap 'rm -f "$said"' EXIT
skipped=()
for arch in "${archs[@]}"; do
  extra=()
  case "$arch" in *resnet110|*resnet1202) extra=(--model.warmup_steps 400 --model.warmup_factor 0.1) ;; esac
  for ((seed = 0; seed < seeds; seed++)); do
    run="$runs/$arch-seed$seed"
    echo "== $arch seed $seed: $run" >&2
    status=0
    "$python" -m launch submit train --config conf/cifar10_resnet20.yaml --run-dir "$run" \
      --job-name "c10-${arch//cifar_/}-s$seed" ${launch_args[@]+"${launch_args[@]}"} -- --model.arch "$arch" \
      --seed_everything "$seed" --data.seed "$seed" --data.root "$root" --tracking.name "$arch-seed$seed" \
      ${extra[@]+"${extra[@]}"} ${trainer_args[@]+"${trainer_args[@]}"} 2>"$said" || status=$?
    cat "$said" >&2
    if [ "$status" != 0 ]; then
      # its job still queued or running: that job trains it; the sweep goes on with the others
      # (one job: "train job 5 RUNNING"; more: "train jobs 5 RUNNING, 6 PENDING")
      if grep -qE "^launch: error: run directory .* is in use by train jobs? " "$said"; then skipped+=("$run"); continue; fi
      exit "$status"
    fi
  done
done
if [ ${#skipped[@]} -gt 0 ]; then
  echo "cifar10_sweep: not submitted again, their jobs still queued or running (python -m launch status RUN):" \
       "${skipped[*]}" >&2
fi
