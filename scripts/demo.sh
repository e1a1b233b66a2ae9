#!/usr/bin/env bash
# The market demos, on this machine's loopback: a market over a fresh SQLite
# file, three providers renting out their "machines" and a renter that trains
# across the three through the market; then everyone's ledger summary
# (balanced: the renter paid what the providers earned) and the renter's jobs.
# The market serves its web dashboard on loopback while the demo runs (the
# address is printed; --keep leaves everything up afterwards, until Ctrl-C).
# Everything it starts is stopped when it ends, however it ends.
#
#   scripts/demo.sh                 (make demo) the Fashion-MNIST MLP, one epoch
#   scripts/demo.sh --lm            (make demo-lm) the gpt-5m language model: each
#                                   provider offers too little memory for the whole
#                                   model (--max-mem), so the plan splits it over the
#                                   three; then its validation loss and a text it writes
#   --steps N                       train N steps (MLP: one epoch, 469; LM: 300)
#   --data PATH                     MLP: a Fashion-MNIST IDX folder; LM: a text file
#                                   (default data/devils-dictionary.txt, public domain)
#   --tls, --keep                   see ARCEUS_DEMO_TLS and ARCEUS_DEMO_KEEP below
#   --nat                           (make demo-nat) the MLP demo behind home routers
#                                   (needs root, for network namespaces and nftables:
#                                   scripts/nat-scene.sh): the market and its relay in a
#                                   "public" namespace, each provider behind a NAT of its
#                                   own that lets nothing in, the renter behind another.
#                                   The market cannot dial the providers, so they keep a
#                                   connection to its relay, and every edge of the plan
#                                   is relayed. The namespaces go with everything else.
#
# Environment:
#   ARCEUS_BIN=PATH          use this binary (skips the build)
#   ARCEUS_DEMO_SKIP_DEPS=1  do not run scripts/install-deps.sh
#   ARCEUS_DEMO_STEPS=N      same as --steps N
#   ARCEUS_DEMO_OUT=DIR      the checkpoint folder (runs/demo, runs/demo-lm)
#   ARCEUS_DEMO_DATA=PATH    same as --data PATH (the MLP's default is train's:
#                            /usr/share/datasets/fashion-mnist)
#   ARCEUS_DEMO_EVAL_BATCHES=N  LM: validation batches per evaluation (20)
#   ARCEUS_DEMO_SAMPLE_TOKENS=N LM: characters the model writes at the end (400)
#   ARCEUS_DEMO_TLS=1        everything over TLS (same as --tls): a CA and a
#                            server pair from scripts/make-tls-cert.sh in the
#                            temporary folder; the market and the providers
#                            serve with --tls-cert/--tls-key, every client
#                            dials with --tls-ca
#   ARCEUS_DEMO_KEEP=1       same as --keep: after the run, keep the market,
#                            its dashboard and the providers up until Ctrl-C
set -euo pipefail

USE_TLS=${ARCEUS_DEMO_TLS:-0}
KEEP=${ARCEUS_DEMO_KEEP:-0}
LM=0
NAT=0
STEPS=${ARCEUS_DEMO_STEPS:-}
DATA=${ARCEUS_DEMO_DATA:-}
SAMPLE_TOKENS=${ARCEUS_DEMO_SAMPLE_TOKENS:-400}
usage() {
    echo "usage: scripts/demo.sh [--lm | --nat] [--steps N] [--data PATH] [--tls] [--keep]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case $1 in
    --tls) USE_TLS=1 ;;
    --keep) KEEP=1 ;;
    --lm) LM=1 ;;
    --nat) NAT=1 ;;
    --steps | --data)
        [ $# -ge 2 ] || usage
        if [ "$1" = --steps ]; then STEPS=$2; else DATA=$2; fi
        shift
        ;;
    --steps=*) STEPS=${1#--steps=} ;;
    --data=*) DATA=${1#--data=} ;;
    *) usage ;;
    esac
    shift
done
if [ -n "$STEPS" ] && ! [[ "$STEPS" =~ ^[1-9][0-9]{0,7}$ ]]; then
    echo "demo: error: --steps expects a positive number of steps, got \"$STEPS\"" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
ROOT=$PWD
PRICES=(1 1.5 2)            # the providers' prices, credits per TFLOP
NAMES=(ada grace linus)     # the providers' accounts
if [ "$LM" = 1 ]; then
    CREDITS=1000            # the renter's opening credits: gpt-5m costs ~0.1 per step
    MODEL=configs/gpt-5m.json
    DATA=${DATA:-data/devils-dictionary.txt}
    STEPS=${STEPS:-300}
    # Each provider offers less memory than the whole of gpt-5m needs (about
    # 150 MB at 8 micro-batches of 2 sequences: weights, gradients, AdamW's
    # moments and the activations in flight), so no single one can hold it
    # and the planner must split it; three together have room to spare.
    PROVIDER_MEM=80M
    PROVIDER_MEM_TEXT="80 MiB"
    OUT_DIR=${ARCEUS_DEMO_OUT:-runs/demo-lm}
    [ -f "$DATA" ] && [ -s "$DATA" ] || {
        echo "demo: error: no text to train on at $DATA (give one with --data FILE)" >&2
        exit 2
    }
else
    CREDITS=100             # the renter's opening credits
    MODEL=configs/mlp-fashion.json
    PROVIDER_MEM=""
    OUT_DIR=${ARCEUS_DEMO_OUT:-runs/demo}
fi

say() { printf '\n\033[1m== %s\033[0m\n' "$*" 2>/dev/null || printf '\n== %s\n' "$*"; }
[ -t 1 ] || say() { printf '\n== %s\n' "$*"; }
die() {
    echo "demo: error: $*" >&2
    exit 1
}

if [ "$NAT" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "--nat needs root: it builds network namespaces and NAT rules (sudo make demo-nat)"
    [ "$USE_TLS" = 1 ] && die "--nat and --tls: one at a time (the certificate would have to name the private addresses)"
    [ "$LM" = 1 ] && die "--nat and --lm: one at a time"
fi

# ---- every child is stopped on the way out ----------------------------------
PIDS=()
TMP=""
SCENE=""  # the NAT scene's prefix, once built
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # up to 10 s for a clean exit, then SIGKILL
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "demo: process $pid did not stop on SIGTERM: killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        local st=0
        wait "$pid" 2>/dev/null || st=$?
        # 127: already reaped (the renter); anything else is a failed exit
        if [ "$st" -ne 0 ] && [ "$st" -ne 127 ]; then
            echo "demo: process $pid exited with status $st" >&2
            [ "$rc" -eq 0 ] && rc=1
        fi
    done
    if [ "$rc" -ne 0 ] && [ -n "$TMP" ]; then
        for f in "$TMP"/*.err; do
            [ -s "$f" ] && { echo "--- $(basename "$f"):" >&2; tail -n 20 "$f" >&2; }
        done
    fi
    [ -n "$SCENE" ] && scripts/nat-scene.sh down "$SCENE" >/dev/null 2>&1 || true
    [ -n "$TMP" ] && rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- dependencies and the build ------------------------------------------------
if [ "${ARCEUS_DEMO_SKIP_DEPS:-0}" != 1 ]; then
    scripts/install-deps.sh --runtime   # no PyTorch, no Chromium: only the tests need them
fi
if [ -n "${ARCEUS_BIN:-}" ]; then
    BIN=$ARCEUS_BIN
else
    make -j"$(nproc 2>/dev/null || echo 2)" all
    BIN=$ROOT/bin/arceus
fi
[ -x "$BIN" ] || die "no arceus binary at $BIN"

# one thread per provider on a small machine, so that three of them and the
# renter share the cores instead of fighting over them
CORES=$(nproc 2>/dev/null || echo 2)
THREADS=1
[ "$CORES" -ge 8 ] && THREADS=2

TMP=$(mktemp -d "${TMPDIR:-/tmp}/arceus-demo.XXXXXX")
DB=$TMP/market.db

# where each one runs and listens: all on loopback, or --nat's namespaces
PUB=() RENT=()
MARKET_LISTEN=127.0.0.1:0
PLISTEN=(127.0.0.1:0 127.0.0.1:0 127.0.0.1:0)
RELAY=()
HTTP=(--http 127.0.0.1:0)
if [ "$NAT" = 1 ]; then
    say "the scene: namespaces behind NAT (scripts/nat-scene.sh)"
    scripts/nat-scene.sh check || die "this machine cannot play the NAT scene"
    SCENE=arcdemo$$
    SCENE=${SCENE:0:12}
    scripts/nat-scene.sh up "$SCENE" >"$TMP/scene.env" 2>"$TMP/scene.err" ||
        die "nat-scene.sh up failed: $(tail -n 5 "$TMP/scene.err")"
    # its NAME=VALUE lines as SC_NAME
    while IFS='=' read -r k v; do
        [[ "$k" =~ ^[A-Z0-9_]+$ ]] && printf -v "SC_$k" '%s' "$v"
    done <"$TMP/scene.env"
    PUB=(ip netns exec "$SC_PUB")
    RENT=(ip netns exec "$SC_RENTER")
    LANS=("$SC_P1_LAN" "$SC_P2_LAN" "$SC_P3_LAN")
    WANS=("$SC_P1_WAN" "$SC_P2_WAN" "$SC_P3_WAN")
    NSS=("$SC_P1" "$SC_P2" "$SC_P3")
    MARKET_LISTEN=$SC_PUBLIC_IP:7000
    PLISTEN=("${LANS[0]}:7001" "${LANS[1]}:7001" "${LANS[2]}:7001")
    RELAY=(--relay "$SC_PUBLIC_IP:7100" --offline-after 5)
    HTTP=()
    echo "the internet: namespace $SC_PUB, the market and its relay at $SC_PUBLIC_IP"
    for i in 0 1 2; do
        echo "${NAMES[$i]}'s machine: namespace ${NSS[$i]}, LAN address ${LANS[$i]}, behind a NAT whose public" \
            "address is ${WANS[$i]}: it lets nothing in"
    done
    echo "the renter: namespace $SC_RENTER, behind a NAT of its own"
fi
# pns I COMMAND...: provider I's command, in its namespace with --nat
pns() {
    local i=$1
    shift
    if [ "$NAT" = 1 ]; then ip netns exec "${NSS[$i]}" "$@"; else "$@"; fi
}

# TLS: SERVE_TLS for the market and the providers, CA for every client
SERVE_TLS=()
CA=()
if [ "$USE_TLS" = 1 ]; then
    say "TLS: a CA and a server certificate for 127.0.0.1 (scripts/make-tls-cert.sh)"
    scripts/make-tls-cert.sh "$TMP/tls" >"$TMP/tls.out" 2>"$TMP/tls.err" ||
        die "make-tls-cert.sh failed: $(tail -n 5 "$TMP/tls.err")"
    SERVE_TLS=(--tls-cert "$TMP/tls/server.pem" --tls-key "$TMP/tls/server-key.pem")
    CA=(--tls-ca "$TMP/tls/ca.pem")
    echo "CA $TMP/tls/ca.pem; servers use --tls-cert/--tls-key, clients --tls-ca"
fi

# wait_for FILE REGEX SECONDS PID: the first line of FILE matching REGEX
wait_for() {
    local file=$1 re=$2 secs=$3 pid=$4 line
    for _ in $(seq $((secs * 10))); do
        line=$(grep -m1 -E "$re" "$file" 2>/dev/null || true)
        if [ -n "$line" ]; then
            echo "$line"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "$(basename "$file" .out) exited before it was ready"
        sleep 0.1
    done
    die "$(basename "$file" .out) not ready after ${secs}s"
}

token_of() { sed -n 's/^token: \([0-9a-f]\{64\}\)$/\1/p'; }

# ---- the market and its accounts ------------------------------------------------
say "the market: accounts (a renter with $CREDITS credits, three providers)"
out=$("$BIN" market add-account renter --credits "$CREDITS" --db "$DB" 2>/dev/null)
echo "$out" | grep -v '^token:' || true
RENTER=$(echo "$out" | token_of)
[ -n "$RENTER" ] || die "add-account renter printed no token"
TOKENS=()
for name in "${NAMES[@]}"; do
    t=$("$BIN" market add-account "$name" --db "$DB" 2>/dev/null | token_of)
    [ -n "$t" ] || die "add-account $name printed no token"
    TOKENS+=("$t")
    echo "account $name created"
done

# --escrow-window 0: what the job paid is released to the providers as soon
# as it ends, so that their ledgers below show it (a real market holds it a
# while for audits to come in)
${PUB[@]+"${PUB[@]}"} "$BIN" market --listen "$MARKET_LISTEN" --db "$DB" ${HTTP[@]+"${HTTP[@]}"} --escrow-window 0 \
    ${RELAY[@]+"${RELAY[@]}"} ${SERVE_TLS[@]+"${SERVE_TLS[@]}"} ${CA[@]+"${CA[@]}"} \
    >"$TMP/market.out" 2>"$TMP/market.err" &
PIDS+=($!)
MARKET_PID=$!
line=$(wait_for "$TMP/market.out" 'listening on ' 60 "$MARKET_PID")
MARKET=${line##*listening on }
echo "market listening on $MARKET (pid $MARKET_PID, database $DB)${CA[@]+", TLS"}"
DASHBOARD=""
if [ "$NAT" = 1 ]; then
    line=$(wait_for "$TMP/market.out" 'relay on ' 60 "$MARKET_PID")
    echo "its relay on ${line##*relay on }, for providers it cannot dial"
else
    line=$(wait_for "$TMP/market.out" 'dashboard on ' 60 "$MARKET_PID")
    DASHBOARD=${line##*dashboard on }
    echo "dashboard: $DASHBOARD (the renter's view: $DASHBOARD#/jobs?token=$RENTER)"
fi

# ---- three providers -------------------------------------------------------------
MEM_ARGS=()
if [ -n "$PROVIDER_MEM" ]; then
    say "three providers rent out this machine (--max-threads $THREADS, --max-mem $PROVIDER_MEM each)"
    echo "each offers $PROVIDER_MEM_TEXT: too little for the whole of $MODEL, so the plan must split it"
    MEM_ARGS=(--max-mem "$PROVIDER_MEM")
else
    say "three providers rent out this machine (--max-threads $THREADS each)"
fi
# --when always --on-battery yes: these providers stand in for three other
# people's machines; this one's owner is at its keyboard, watching
PPIDS=()
for i in 0 1 2; do
    # (not through pns: a function in the background is a subshell, whose
    # pid would stand for the provider's)
    pfx=()
    [ "$NAT" = 1 ] && pfx=(ip netns exec "${NSS[$i]}")
    ${pfx[@]+"${pfx[@]}"} "$BIN" provide --market "$MARKET" --token "${TOKENS[$i]}" --listen "${PLISTEN[$i]}" \
        --when always --on-battery yes \
        --max-threads "$THREADS" --price "${PRICES[$i]}" ${MEM_ARGS[@]+"${MEM_ARGS[@]}"} \
        ${SERVE_TLS[@]+"${SERVE_TLS[@]}"} ${CA[@]+"${CA[@]}"} \
        >"$TMP/provider$i.out" 2>"$TMP/provider$i.err" &
    PIDS+=($!)
    PPIDS+=($!)
done
for i in 0 1 2; do
    line=$(wait_for "$TMP/provider$i.out" 'serving on ' 60 "${PPIDS[$i]}")
    echo "${NAMES[$i]} (pid ${PPIDS[$i]}): ${line#arceus provide: }"
done
if [ "$NAT" = 1 ]; then
    for i in 0 1 2; do
        line=$(wait_for "$TMP/provider$i.out" 'reaches this worker through its relay' 60 "${PPIDS[$i]}")
        echo "${NAMES[$i]}: ${line#arceus provide: }"
    done
    # what the NAT does: a dial of a provider from outside goes nowhere
    echo "a dial of ${NAMES[0]}'s worker from the internet: $("${PUB[@]}" /usr/bin/python3 -c "
import socket
try:
    socket.create_connection(('${LANS[0]}', 7001), timeout=2); print('connected (the NAT leaks!)')
except Exception as e:
    print('fails:', e)")"
fi
${RENT[@]+"${RENT[@]}"} "$BIN" providers --market "$MARKET" --token "$RENTER" ${CA[@]+"${CA[@]}"}

# ---- the renter trains through the market ----------------------------------------
if [ "$LM" = 1 ]; then
    say "the renter trains $MODEL on $DATA across 3 leased providers"
    echo "follow it on the dashboard: $DASHBOARD#/jobs?token=$RENTER"
    TRAIN=(--model "$MODEL" --data "$DATA" --market "$MARKET" --token "$RENTER" --devices 3
        --micro-batches 8 --steps "$STEPS" --eval-every 100
        --eval-batches "${ARCEUS_DEMO_EVAL_BATCHES:-20}" --out "$OUT_DIR" --threads "$THREADS")
else
    say "the renter trains $MODEL on 3 leased providers"
    TRAIN=(--model "$MODEL" --market "$MARKET" --token "$RENTER" --devices 3
        --plan 0,1,2 --micro-batches 4 --out "$OUT_DIR" --threads "$THREADS")
    [ -n "$STEPS" ] && TRAIN+=(--steps "$STEPS")
    [ -n "$DATA" ] && TRAIN+=(--data "$DATA")
fi
[ "$USE_TLS" = 1 ] && TRAIN+=("${CA[@]}")
echo "\$ arceus train ${TRAIN[*]/$RENTER/\$RENTER_TOKEN}"
T0=$SECONDS
${RENT[@]+"${RENT[@]}"} "$BIN" train "${TRAIN[@]}" &
TRAIN_PID=$!
PIDS+=("$TRAIN_PID")
wait "$TRAIN_PID" || die "training failed"
echo "trained in $((SECONDS - T0)) s"

if [ "$LM" = 1 ]; then
    PROMPT="POLITICS, n.  "
    say "what the model writes, given \"$PROMPT\" (arceus sample)"
    echo "\$ arceus sample --ckpt $OUT_DIR --prompt \"$PROMPT\" --tokens $SAMPLE_TOKENS --seed 7"
    "$BIN" sample --ckpt "$OUT_DIR" --prompt "$PROMPT" --tokens "$SAMPLE_TOKENS" --seed 7 --threads "$THREADS" ||
        die "sampling failed"
    echo
fi

# ---- the money ---------------------------------------------------------------------
# "balance: 12.345678 credits" -> micro-credits
micro() { sed -n 's/^balance: \(-\{0,1\}\)\([0-9]*\)\.\([0-9]\{6\}\) credits$/\1\2\3/p' | sed 's/^\(-\{0,1\}\)0*\([0-9]\)/\1\2/'; }
fmt() {
    local v=$1 sign=""
    [ "$v" -lt 0 ] && { sign=-; v=$((-v)); }
    printf '%s%d.%06d' "$sign" $((v / 1000000)) $((v % 1000000))
}

say "the ledger: the renter paid, the providers earned"
# each account's ledger as a summary: its rows by reason (one usage row per
# step and stage: hundreds) and its balance
${RENT[@]+"${RENT[@]}"} "$BIN" ledger --summary --market "$MARKET" --token "$RENTER" ${CA[@]+"${CA[@]}"} |
    tee "$TMP/ledger-renter.txt"
renter_bal=$(micro <"$TMP/ledger-renter.txt")
earned=0
for i in 0 1 2; do
    echo
    pns "$i" "$BIN" ledger --summary --market "$MARKET" --token "${TOKENS[$i]}" ${CA[@]+"${CA[@]}"} |
        tee "$TMP/ledger-$i.txt"
    earned=$((earned + $(micro <"$TMP/ledger-$i.txt")))
done
minted=$((CREDITS * 1000000))
paid=$((minted - renter_bal))
sum=$((-minted + renter_bal + earned))
echo
echo "renter paid $(fmt "$paid") credits; providers earned $(fmt "$earned") credits"
echo "ledger sum (mint $(fmt $((-minted))) + renter $(fmt "$renter_bal") + providers $(fmt "$earned")): $(fmt "$sum")"
[ "$sum" -eq 0 ] || die "the ledger does not balance"

say "the renter's jobs"
${RENT[@]+"${RENT[@]}"} "$BIN" jobs --market "$MARKET" --token "$RENTER" ${CA[@]+"${CA[@]}"} | tee "$TMP/jobs.txt"
JOB=$(awk 'NR > 1 { id = $1 } END { print id }' "$TMP/jobs.txt")
if [ -n "$JOB" ]; then
    echo
    ${RENT[@]+"${RENT[@]}"} "$BIN" job "$JOB" --market "$MARKET" --token "$RENTER" ${CA[@]+"${CA[@]}"}
fi

if [ "$KEEP" = 1 ]; then
    say "kept up until Ctrl-C${DASHBOARD:+: the dashboard at $DASHBOARD}"
    echo "the renter's view: $DASHBOARD#/jobs?token=$RENTER"
    while kill -0 "$MARKET_PID" 2>/dev/null; do sleep 1; done
fi

say "done: stopping the providers and the market"
