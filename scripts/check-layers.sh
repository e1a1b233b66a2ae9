#!/usr/bin/env bash
# The layers of src/ and which of them each may include (docs/DESIGN.md,
# "The parts"). From the top: cli → run → net → market → train → nn →
# {ops, data} → core. A file may include headers of its own folder and of
# the folders listed for it; anything else is an include that goes up (or
# sideways) and fails this check. The generated protobuf header belongs to
# the network layer only. Run by `make test`.
set -u
cd "$(dirname "$0")/.."

declare -A allowed=(
    [core]=""
    [ops]="core"
    [data]="core"
    [nn]="ops core"
    [train]="nn ops data core"
    [market]="train nn ops data core"
    [net]="market train nn ops data core"
    [run]="net market train nn ops data core"
    [cli]="run net market train nn ops data core"
)

bad=0
for dir in src/*/; do
    layer=$(basename "$dir")
    if [[ -z ${allowed[$layer]+set} ]]; then
        echo "check-layers: src/$layer is not a known layer (add it to scripts/check-layers.sh)"
        bad=1
        continue
    fi
    while IFS=: read -r file line text; do
        target=$(sed -E 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"([^"]+)".*/\1/' <<<"$text")
        case "$target" in
        arceus.h) continue ;; # the public conventions header, for everyone
        arceus.pb-c.h)
            [[ $layer == net ]] && continue
            echo "$file:$line: includes the generated wire header; only src/net may ($text)"
            bad=1
            continue ;;
        */*) ;;
        *) continue ;; # a header beside the file
        esac
        up=${target%%/*}
        [[ $up == "$layer" ]] && continue
        if [[ " ${allowed[$layer]} " != *" $up "* ]]; then
            echo "$file:$line: src/$layer may not include $target (allowed: ${allowed[$layer]:-nothing outside src/$layer})"
            bad=1
        fi
    done < <(grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"' "$dir"*.[ch] /dev/null)
done
if [[ $bad -ne 0 ]]; then
    echo "check-layers: FAILED (see docs/DESIGN.md for the layers)"
    exit 1
fi
echo "check-layers: every #include in src/ goes down the layers"
