#!/usr/bin/env bash
# Unpacks Debian's tuxpaint-stamps-default (GPL-2, ~160 MB) without root into
# ${1:-~/.cache/petune/tuxpaint}; petune.vision.tuxpaint() finds it there. Never commit these files.
set -euo pipefail
dest=${1:-$HOME/.cache/petune/tuxpaint}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download tuxpaint-stamps-default)
dpkg -x "$tmp"/tuxpaint-stamps-default_*.deb "$dest"
echo "Tux Paint stamps in $dest/usr/share/tuxpaint/stamps"
