#!/usr/bin/env bash
# Makes sure an MNIST-format data set is available: the one named by DEEPSHRINK_DATA, or else
# Fashion-MNIST from the Debian package dataset-fashion-mnist, installed here when we are root.
set -euo pipefail
default_dir=/usr/share/datasets/fashion-mnist
if [ -n "${DEEPSHRINK_DATA:-}" ]; then
  if [ -d "$DEEPSHRINK_DATA" ]; then exit 0; fi
  echo "DEEPSHRINK_DATA=$DEEPSHRINK_DATA is not a directory; point it at MNIST-format IDX files" >&2
  exit 1
fi
if [ -f "$default_dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist) ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  exit 0
fi
cat >&2 <<MSG
No data set found. Searched: \$DEEPSHRINK_DATA (unset), $default_dir.
To fix: sudo apt-get install dataset-fashion-mnist, or set DEEPSHRINK_DATA to a directory
of MNIST-format IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]).
MSG
exit 1
