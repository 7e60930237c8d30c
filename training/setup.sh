#!/usr/bin/env bash
# System packages for regenerating a2e-lite's training data (Debian 12), as root.
# MBROLA and its voices live in contrib/non-free.
set -euo pipefail
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ] && ! grep -q "contrib" "$src"; then
  sed -i 's/^Components: main$/Components: main contrib non-free/' "$src"
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng mbrola \
  mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 mbrola-de1 mbrola-de2 mbrola-de4 \
  mbrola-fr1 mbrola-fr4 mbrola-es1 mbrola-es2 mbrola-mx1 mbrola-jp1 mbrola-jp2 mbrola-jp3 \
  mbrola-it3 mbrola-nl2 mbrola-pt1 \
  wamerican wngerman wfrench wspanish witalian wdutch wportuguese
