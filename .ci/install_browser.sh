#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the feature browser's tests
# (tests/browse/test_browse_chromium.py). Idempotent and quiet; never fails the build: without a
# browser those tests skip and say why.
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; the browser tests will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "install_browser: not root and no sudo; the browser tests will skip" >&2
        exit 0
    fi
fi
log="$(mktemp)"
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$log" 2>&1 &&
   $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >>"$log" 2>&1; then
    echo "install_browser: installed $(chromium --version 2>/dev/null || echo chromium)"
else
    echo "install_browser: could not install chromium (the browser tests will skip); last lines:" >&2
    tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
