#!/bin/sh
# The 64x64 anime-faces recipe, as it is for GPUs of 24 GB or more, one or several (an estimated 14 GiB a GPU;
# 12-16 GB: add --microbatch 32; 8 GB: --microbatch 16 or --checkpointing; see the README):
#
#     python util.py prepare ~/Downloads/animefacedataset --out AnimeFaces64 --size 64    # once
#     sh train.sh [more train.py flags, which override the ones below]
#     tail -f runs/anime64/train.log
#
# It trains in the background, in a session of its own (closing the terminal does not stop it), and writes its pid
# to OUT/train.pid. Running it again stops that run with SIGTERM, waits for it to save OUT/ckpt.pt, and starts
# again, which resumes. It only ever signals the pid it wrote itself. One process a GPU (NPROC=N: N processes;
# NPROC=2 sh train.sh --device cpu rehearses the two-GPU launch on a CPU).
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# OUT is train.py's --out_dir: the default below, or the last one among the extra flags (as argparse reads them).
OUT=runs/anime64
DEVICE=""
previous=""
for arg in "$@"; do
    case "$arg" in --out_dir=*) OUT=${arg#--out_dir=} ;; --device=*) DEVICE=${arg#--device=} ;; esac
    if [ "$previous" = "--out_dir" ]; then OUT=$arg; fi
    if [ "$previous" = "--device" ]; then DEVICE=$arg; fi
    previous=$arg
done

# The recipe is a GPU's: without one it would run for months on the CPU. --device says otherwise.
GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -eq 0 ] && [ -z "$DEVICE" ]; then
    msg="error: no CUDA GPU here, and train.sh is the GPU recipe; for the CPU demo run python train.py,"
    echo "$msg or force the recipe with: sh train.sh --device cpu" >&2
    exit 1
fi
mkdir -p "$OUT"
PIDFILE="$OUT/train.pid"

# Stop the run this script started before, if it is still alive. Pids are reused, so the pid must also still
# belong to a train.py command line (an exited, unreaped process shows as "[python] <defunct>": not ours).
is_our_run() {
    ps -p "$1" -o args= 2>/dev/null | grep -q "train.py"
}
if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if is_our_run "$pid"; then
        echo "stopping the run started before (pid $pid); it saves $OUT/ckpt.pt first"
        kill -TERM "$pid"
        waited=0
        while is_our_run "$pid"; do
            if [ "$waited" -ge 300 ]; then
                echo "pid $pid did not stop in 300 s; look at $OUT/train.log, stop it yourself, run this again" >&2
                exit 1
            fi
            sleep 1
            waited=$((waited + 1))
        done
    fi
    rm -f "$PIDFILE"
fi

# One process per visible GPU, or one on the --device given. torchrun forwards SIGTERM to every rank and kills
# them PET_SHUTDOWN_TIMEOUT seconds later (its default, 30, is short for writing 1.5 GB on a slow disk; it is also
# how long a rank stuck behind another's crash can linger).
if [ -z "$DEVICE" ]; then
    NPROC=${NPROC:-$GPUS}
fi
if [ "${NPROC:-1}" -gt 1 ]; then
    LAUNCH="$PYTHON -m torch.distributed.run --standalone --nproc_per_node=$NPROC"
else
    LAUNCH=$PYTHON
fi

# Improved DDPM's ImageNet 64x64 U-Net (App. A of the paper) with 2 residual blocks a level instead of 3 (92M
# parameters), T = 1000 instead of 4000 and batch 64 per GPU instead of 128; the hybrid loss, cosine schedule and
# learned variances. On a smaller GPU keep the recipe and add --microbatch 32 (or 16) or --checkpointing: the
# same steps in less memory. Extra flags are not remembered: a restart runs with the flags it is given.
touch "$OUT/train.log"
log_start=$(($(wc -l < "$OUT/train.log") + 1))  # the log is appended to: this run's lines start here
# setsid: a session of its own has no terminal whose closing could stop it (nohup is not enough: torchrun answers
# SIGHUP itself, whatever nohup set). Where there is no setsid (macOS), nohup: enough for one process.
SESSION=setsid
if ! command -v setsid > /dev/null; then
    SESSION=nohup
fi
PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-50} $SESSION $LAUNCH train.py \
    --data_dir AnimeFaces64 --out_dir runs/anime64 --image_size 64 \
    --base_channels 128 --channel_mult 1,2,3,4 --num_res_blocks 2 --attention_resolutions 16,8 --num_heads 4 \
    --dropout 0.1 --num_timesteps 1000 --noise_schedule cosine --loss_type hybrid --learn_sigma \
    --batch_size 64 --lr 1e-4 --warmup_steps 1000 --ema_rate 0.9999 --max_steps 500000 \
    --save_every 2000 --sample_every 5000 --num_samples 64 --log_every 100 --num_workers 8 --precision auto \
    "$@" >> "$OUT/train.log" 2>&1 &
pid=$!
echo $pid > "$PIDFILE"

# Wait until train.py writes OUT/log.csv anew, as it does once the data is checked and the model built, so that a
# mistake shows here, not only in the log.
waited=0
until [ -n "$(find "$OUT/log.csv" -newer "$PIDFILE" 2>/dev/null)" ]; do
    if ! is_our_run "$pid"; then
        echo "train.py stopped before training; the end of $OUT/train.log:" >&2
        tail -n +"$log_start" "$OUT/train.log" | tail -n 5 >&2
        rm -f "$PIDFILE"
        exit 1
    fi
    if [ "$waited" -ge 120 ]; then
        break  # still starting (a slow disk, or torchrun waiting for its ranks): it goes on in the background
    fi
    sleep 1
    waited=$((waited + 1))
done
echo "training in the background with $LAUNCH (pid $pid); follow it with: tail -f $OUT/train.log"
