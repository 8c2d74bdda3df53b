#!/usr/bin/env bash
# Debian's chromium, which tests/test_web.py drives through Playwright: a browser download
# (`playwright install`) is not possible offline. Does nothing when chromium is there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "installing Debian's chromium for the browser test ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
