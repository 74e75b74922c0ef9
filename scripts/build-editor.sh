#!/usr/bin/env bash
# Bundles the New job page's editor (CodeMirror 6, proxy/editor/) into
# proxy/static/editor.bundle.js, served by the proxy itself: no CDN.
# Packages come from the npm registry at the versions pinned in
# proxy/editor/package-lock.json (`npm ci`). Quick when nothing changed: the
# install is redone only when the lock file changes, the bundle only when its
# sources do. Without node/npm, or when the install fails (no registry: offline,
# a proxy), it says so and leaves the page on its plain textarea, or on the
# bundle built before (exit 0): the proxy works without the bundle, and
# `make run`/`make test` must not fail for it. The browser tests need the
# bundle: they skip without it, and fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/../proxy/editor"
OUT=../static/editor.bundle.js

if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
    echo "build-editor: node/npm not found (apt-get install nodejs npm): the New job page" \
         "falls back to a plain text area" >&2
    exit 0
fi
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
    if ! npm ci --no-audit --no-fund --loglevel=error; then
        echo "build-editor: npm ci failed (is the npm registry reachable?): the New job page" \
             "keeps $([[ -f $OUT ]] && echo "the bundle built before" || echo "a plain text area")" >&2
        exit 0
    fi
fi
if [[ -f $OUT && $OUT -nt package-lock.json && -z $(find src -newer "$OUT" -print -quit) ]]; then
    exit 0
fi
# The licenses of the bundled packages (all MIT) stay in the bundle's comments.
node_modules/.bin/esbuild src/editor.js --bundle --minify --format=iife --target=es2020 \
    --legal-comments=eof --log-level=warning --outfile="$OUT"
echo "build-editor: wrote proxy/static/editor.bundle.js ($(wc -c <"$OUT") bytes)"
