#!/usr/bin/env bash
# The official MAE, DINO and DeiT files that tools/gpu_suite.py --official and tools/cpu_pairs.py
# time, extracted from their git repositories into an ignored folder (official/ in .gitignore):
# read at run time, never committed (docs/performance.md § GPU suite).
#
#   tools/official_code.sh MAE_GIT DINO_GIT DEIT_GIT [DEST]
#   tools/official_code.sh /work/.mirror/facebookresearch+{mae,dino,deit}/repo official
#
# MAE_GIT, DINO_GIT, DEIT_GIT: a clone (its .git) or a bare repository of
# github.com/facebookresearch/mae, /dino and /deit; DEST (default official) gets mae/, dino/ and
# deit/, each with the files below, its LICENSE and COMMIT (the commit they were read from).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 MAE_GIT DINO_GIT DEIT_GIT [DEST]" >&2
    exit 2
fi
dest=${4:-official}

extract() {  # extract GIT_DIR NAME FILE...
    local git=$1 name=$2
    shift 2
    [ -d "$git/.git" ] && git="$git/.git"
    if ! commit=$(git --git-dir "$git" rev-parse --verify --quiet HEAD); then
        echo "error: $git: not a git repository of $name" >&2
        exit 2
    fi
    for f in "$@" LICENSE; do
        mkdir -p "$(dirname "$dest/$name/$f")"
        if ! git --git-dir "$git" show "HEAD:$f" > "$dest/$name/$f"; then
            echo "error: $git: no $f at HEAD (is it the $name repository?)" >&2
            exit 2
        fi
    done
    echo "$commit" > "$dest/$name/COMMIT"
    echo "$dest/$name: $* from $commit"
}

extract "$1" mae models_mae.py util/pos_embed.py util/misc.py util/lr_sched.py
extract "$2" dino vision_transformer.py utils.py main_dino.py
extract "$3" deit models.py losses.py
